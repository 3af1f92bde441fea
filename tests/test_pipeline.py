"""The data pipeline by example: 01 caption -> 02 distill -> 03 rewrite/verify/split on toy data, with the toy teacher.

Each stage runs through its main(argv), exactly as on the command line.
"""

import importlib
import json
import os

import pytest
from conftest import rows

import rewards
import toy
from vlaa import backends, jsonl, records

caption = importlib.import_module("01_caption")
distill = importlib.import_module("02_distill")
rewrite_verify = importlib.import_module("03_rewrite_verify")

# tasks whose prompts rarely repeat: the toy teacher is deterministic per prompt, so a task with
# four distinct images (colour) would be all right or all wrong, all hesitant or none
KINDS = "count,remove,largest,shapes,sum,box"


def read(path):
    with open(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """240 toy records, captioned once for the whole module (the output lives in another folder)."""
    root = tmp_path_factory.mktemp("pipeline")
    toy.make_data(str(root / "data"), 240, test_n=0, seed=1, kinds=KINDS)
    out = str(root / "work" / "captioned.jsonl")
    caption.main(["--in", str(root / "data" / "train.jsonl"), "--out", out, "--backend", "toy", "--model", "captioner"])
    return out


def distill_and_split(tmp_path, captioned, reasoner, judge="judge", name="final"):
    distilled = str(tmp_path / f"{name}-distilled.jsonl")
    distill.main(["--in", captioned, "--out", distilled, "--backend", "toy", "--model", reasoner])
    extra = ["--judge-model", judge] if judge else []
    summary = rewrite_verify.main(["--in", distilled, "--out", str(tmp_path / name), "--backend", "toy"] + extra)
    return summary, rows(str(tmp_path / name / "all.jsonl"))


def teacher_is_right(rec):
    """Ground truth for the test, independent of 03's verdict: the reasoner's own final answer vs `answer`."""
    answer = rewrite_verify.split_reasoning(rec["reasoning"])[1]
    if rec["verifier_type"] == "open":
        return toy.normalise(answer) == toy.normalise(rec["answer"])
    return rewards.mixed_reward(f"<answer>{answer}</answer>", rec) >= 0.5


def test_chain_writes_every_field_and_the_counts_add_up(tmp_path, captioned):
    summary, all_rows = distill_and_split(tmp_path, captioned, "reasoner:error_rate=0.1,hesitation_rate=0.3")
    sft, rl = rows(str(tmp_path / "final" / "sft.jsonl")), rows(str(tmp_path / "final" / "rl.jsonl"))

    assert len(all_rows) == summary["total"] == 240
    assert len({r["id"] for r in all_rows}) == 240
    assert summary["kept"] == len(sft) + len(rl) == summary["sft"] + summary["rl"]
    assert summary["kept"] + sum(summary["dropped"].values()) == summary["total"]
    for group in ("by_source", "by_verifier_type"):
        assert sum(c["total"] for c in summary[group].values()) == 240
        assert sum(c["kept"] for c in summary[group].values()) == summary["kept"]
    with open(tmp_path / "final" / "summary.json") as f:
        assert json.load(f) == summary

    for r in all_rows:  # every field of every stage, and an image path that still resolves from final/
        fields = {"id", "question", "answer", "caption", "reasoning", "response", "verified", "aha", "drop_reason"}
        assert fields <= set(r)
        assert os.path.exists(os.path.join(tmp_path / "final", r["image"]))
    for r in sft + rl:
        assert r["drop_reason"] is None and r["verified"] is True
        assert r["response"].startswith("<think>") and r["response"].endswith("</answer>")
        assert rewards.extract_answer(r["response"])
        assert "caption" not in r["response"].lower()  # the toy R1 says "The caption says" 30% of the time
    assert not any(records.has_aha(r["response"]) for r in sft) and all(records.has_aha(r["response"]) for r in rl)


def test_sft_rl_split_follows_the_teachers_hesitation_rate(tmp_path, captioned):
    fractions = {}
    for rate in (0.0, 0.3, 1.0):
        summary, _ = distill_and_split(tmp_path, captioned, f"reasoner:error_rate=0,hesitation_rate={rate}",
                                       name=f"h{rate}")
        fractions[rate] = summary["rl"] / summary["kept"]
    assert fractions[0.0] == 0.0 and fractions[1.0] == 1.0
    assert 0.2 < fractions[0.3] < 0.4


def test_verification_drops_exactly_the_wrong_teacher_answers(tmp_path, captioned):
    summary, all_rows = distill_and_split(tmp_path, captioned, "reasoner:error_rate=0.3,hesitation_rate=0.3")
    assert 0.2 < summary["dropped"]["wrong"] / summary["total"] < 0.4
    for r in all_rows:
        assert (r["drop_reason"] == "wrong") == (not teacher_is_right(r)), r["id"]
    assert summary["by_verifier_type"]["open"]["dropped"]["wrong"] > 0  # the LLM judge said No somewhere

    summary, _ = distill_and_split(tmp_path, captioned, "reasoner:error_rate=0", name="right")
    assert summary["dropped"]["wrong"] == 0


def test_open_answers_without_a_judge_are_dropped_and_counted(tmp_path, captioned):
    summary, all_rows = distill_and_split(tmp_path, captioned, "reasoner:error_rate=0", judge=None)
    n_open = sum(r["verifier_type"] == "open" for r in all_rows)
    assert n_open > 0 and summary["dropped"]["no_judge"] == n_open
    assert summary["by_verifier_type"]["open"]["kept"] == 0


@pytest.mark.parametrize("text, think, answer", [
    ("<think> I count 3. </think> 3", "I count 3.", "3"),
    ("I count 3.\n</think>\n\nThe answer is 3.", "I count 3.", "3"),  # R1-distill: the template opened <think>
    ("<think>x</think>\nSo the area is $\\boxed{\\frac{1}{2}}$.", "x", "\\frac{1}{2}"),
    ("<think>x</think> **Final Answer:** B", "x", "B"),
    ("<think>x</think> <answer> [0.1, 0.2, 0.5, 0.6] </answer>", "x", "[0.1, 0.2, 0.5, 0.6]"),
    ("I see two cats.\nAnswer: 2", "I see two cats.\nAnswer: 2", "2"),  # no tags: all thinking, last line answers
    ("<think>only thinking, cut off", "only thinking, cut off", ""),  # truncated by max_new_tokens: no answer
    ("", "", ""),
])
def test_split_reasoning_reads_r1_outputs_with_and_without_tags(text, think, answer):
    assert rewrite_verify.split_reasoning(text) == (think, answer)


def test_rule_rewriter_speaks_of_the_image_and_keeps_the_case():
    text = "The caption says two cats. According to the description, the CAPTION is clear. Rationale: none."
    assert rewrite_verify.rule_rewrite(text) == \
        "The image shows two cats. According to the image, the IMAGE is clear. Image: none."
    assert rewrite_verify.word_change("a b c", "a b c d e") == 2


def test_a_rewrite_that_changes_more_than_15_words_is_dropped(tmp_path, captioned, monkeypatch):
    real = backends.make_backend

    def chatty_rewriter(name, model, **opts):  # an LLM rewriter that adds 16 words to every third text
        if model != "chatty":
            return real(name, model, **opts)

        def gen(requests, n=1, **kw):
            texts = [r["prompt"].rpartition("Text:\n")[2] for r in requests]
            return [[t.replace("</think>", " extra" * 16 + " </think>") if i % 3 == 0 else t] for i, t in
                    enumerate(texts)]
        return gen

    monkeypatch.setattr(backends, "make_backend", chatty_rewriter)
    distilled = str(tmp_path / "d.jsonl")
    distill.main(["--in", captioned, "--out", distilled, "--limit", "30", "--model", "reasoner:error_rate=0"])
    summary = rewrite_verify.main(["--in", distilled, "--out", str(tmp_path / "f"), "--rewriter-model", "chatty",
                                   "--judge-model", "judge", "--batch-size", "30"])
    assert summary["dropped"]["word_change"] == 10 and summary["kept"] == 20
    summary = rewrite_verify.main(["--in", distilled, "--out", str(tmp_path / "g"), "--rewriter-model", "chatty",
                                   "--judge-model", "judge", "--batch-size", "30", "--max-word-change", "16"])
    assert summary["dropped"]["word_change"] == 0


def test_aha_words_flag_changes_the_split(tmp_path, captioned):
    distilled = str(tmp_path / "d.jsonl")
    distill.main(["--in", captioned, "--out", distilled, "--limit", "60", "--model", "reasoner:hesitation_rate=1"])
    summary = rewrite_verify.main(["--in", distilled, "--out", str(tmp_path / "f"), "--judge-model", "judge",
                                   "--aha-words", "no such word"])
    assert summary["rl"] == 0 and summary["sft"] == summary["kept"] > 0


def test_a_kept_caption_is_reused_unless_overwrite(tmp_path, captioned):
    src = tmp_path / "in.jsonl"
    recs = rows(captioned)[:3]
    recs[0]["caption"] = "from ALLaVA"
    for r in recs:
        r["image"] = os.path.join(os.path.dirname(captioned), r["image"])  # absolute paths are accepted too
    jsonl.write_jsonl(str(src), recs)
    caption.main(["--in", str(src), "--out", str(tmp_path / "a.jsonl")])
    caption.main(["--in", str(src), "--out", str(tmp_path / "b.jsonl"), "--overwrite"])
    assert rows(str(tmp_path / "a.jsonl"))[0]["caption"] == "from ALLaVA"
    assert rows(str(tmp_path / "b.jsonl"))[0]["caption"].startswith("Setting:")


# ----------------------------------------------------------------------------------------------------
# Resume: a run killed mid-way (a backend error, then a torn last line) and re-run gives the same bytes


def interrupt_after(monkeypatch, calls):
    """Make the backend die on its `calls`+1-th call, like a kill in the middle of a run."""
    real, count = backends.make_backend, [0]

    def make(name, model, **opts):
        gen = real(name, model, **opts)

        def dying(requests, **kw):
            count[0] += 1
            if count[0] > calls:
                raise KeyboardInterrupt("killed")
            return gen(requests, **kw)
        return dying
    monkeypatch.setattr(backends, "make_backend", make)


@pytest.mark.parametrize("stage", ["01", "02", "03"])
def test_resume_after_a_kill_gives_the_same_output_as_one_run(tmp_path, captioned, monkeypatch, stage):
    src = str(tmp_path / "in.jsonl")
    jsonl.write_jsonl(src, [dict(r, image=os.path.join(os.path.dirname(captioned), r["image"]))
                          for r in rows(captioned)[:50]])
    if stage == "03":
        distill.main(["--in", src, "--out", str(tmp_path / "d.jsonl"), "--model", "reasoner"])
        src = str(tmp_path / "d.jsonl")
    module, model = {"01": (caption, ["--model", "captioner", "--overwrite"]), "02": (distill, ["--model", "reasoner"]),
                     "03": (rewrite_verify, ["--judge-model", "judge"])}[stage]
    out = {s: str(tmp_path / s / ("out" if stage == "03" else "out.jsonl")) for s in ("once", "killed")}
    argv = lambda s: ["--in", src, "--out", out[s], "--batch-size", "8"] + model

    module.main(argv("once"))
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            module.main(argv("killed"))
    written = os.path.join(out["killed"], "all.jsonl") if stage == "03" else out["killed"]
    assert 0 < len(rows(written)) < 50
    with open(written, "a") as f:
        f.write('{"id": "half a rec')  # the kill came in the middle of a write
    module.main(argv("killed"))

    files = ["all.jsonl", "sft.jsonl", "rl.jsonl", "summary.json"] if stage == "03" else [""]
    for name in files:
        once, killed = (read(os.path.join(out[s], name) if name else out[s]) for s in ("once", "killed"))
        assert once == killed
    ids = [r["id"] for r in rows(written)]
    assert len(ids) == len(set(ids)) == 50


# ----------------------------------------------------------------------------------------------------
# Bad input: named by file, line and field; --skip-bad counts and reports instead of stopping


def test_a_bad_line_names_the_file_and_line(tmp_path, captioned):
    lines = read(captioned).splitlines()[:4]
    lines[2] = lines[2][:40]  # a truncated record in the middle of the file
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: bad JSON"):
        distill.main(["--in", str(bad), "--out", str(tmp_path / "out.jsonl")])
    assert not os.path.exists(tmp_path / "out.jsonl")  # nothing ran: the file is checked before any model call

    recs = rows(captioned)[:3]
    del recs[1]["caption"]
    jsonl.write_jsonl(str(bad), recs)
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 \(id 'train-000001'\): missing field 'caption'"):
        distill.main(["--in", str(bad), "--out", str(tmp_path / "out2.jsonl")])


def test_a_missing_image_names_file_line_and_path_or_is_skipped_and_counted(tmp_path, captioned, capsys):
    recs = rows(captioned)[:4]
    for r in recs:
        r["image"] = os.path.join(os.path.dirname(captioned), r["image"])
    recs[2]["image"] = str(tmp_path / "nowhere.png")
    src = tmp_path / "in.jsonl"
    jsonl.write_jsonl(str(src), recs)
    argv = ["--in", str(src), "--out", str(tmp_path / "out.jsonl"), "--overwrite"]
    where = r"in\.jsonl:3 \(id 'train-000002'\): field 'image'"
    with pytest.raises(FileNotFoundError, match=where + r": image not found: .*nowhere\.png"):
        caption.main(argv)

    stats = caption.main(argv + ["--skip-bad"])
    assert stats["written"] == 3 and len(stats["bad"]) == 1 and "nowhere.png" in stats["bad"][0]
    assert "skipped 1 bad record(s)" in capsys.readouterr().out


def test_a_gold_answer_the_verifier_cannot_read_is_an_error(tmp_path, captioned):
    distilled = str(tmp_path / "d.jsonl")
    distill.main(["--in", captioned, "--out", distilled, "--limit", "3"])
    recs = rows(distilled)
    recs[1].update(verifier_type="digit", answer="many")
    jsonl.write_jsonl(distilled, recs)
    where = r"d\.jsonl:2 \(id 'train-000001'\): field 'answer'"
    with pytest.raises(ValueError, match=where + ": digit answer 'many' is not one integer"):
        rewrite_verify.main(["--in", distilled, "--out", str(tmp_path / "f")])
