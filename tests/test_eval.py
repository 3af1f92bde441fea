"""06_eval.py and vlaa/benchmarks.py by example: each benchmark's rules under VLMEvalKit's code and the official
code, checked against cases drawn from published outputs (tests/fixtures/eval/, each line naming its source), then
whole runs (tiny model, scripted backends), run identity, resume, and bad benchmark files."""

import importlib
import json
import os

import pytest
from conftest import solid_image

import toy
from vlaa import backends, jsonl
from vlaa import benchmarks as B

E = importlib.import_module("06_eval")
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "eval")


def fixture(name):
    return [rec for _, rec in jsonl.read_jsonl(os.path.join(FIXTURES, name))]


def extract(name, rec, response, rules=E.BENCHMARKS):
    """The rules' answer as 06 reads it: the <answer> block (or the whole response), its \\boxed{}, its phrase."""
    return E.rule_answer(rules[name], rec, B.answer_block(response))


# ----------------------------------------------------------------------------------------------------
# Agreement with the reference code on published outputs (the counts over whole files are in docs/eval.md)


@pytest.mark.parametrize("name, correct", [("mathvista", (B.mathvista_vlmevalkit, B.mathvista_official)),
                                           ("mathvision", (B.mathvision_vlmevalkit, B.mathvision_official)),
                                           ("logicvista", (B.logicvista_vlmevalkit, B.logicvista_official))])
def test_verdicts_agree_with_vlmevalkit_and_the_official_code_on_published_answers(name, correct):
    cases = fixture(f"{name}.jsonl")
    for case in cases:
        rec, answer = case["record"], case["answer"]
        if name == "mathvision" and answer == "a" and not rec["options"]:
            # VLMEvalKit's is_equal eval()s "a" to its own local variable a (the gold's value): a bug not copied
            assert case["vlmevalkit"] and not correct[0](rec, answer)
            continue
        assert correct[0](rec, answer) == case["vlmevalkit"], case["source"]
        assert correct[1](rec, answer) == case["official"], case["source"]
    published = sum(correct[1](c["record"], c["answer"]) == c["published"] for c in cases)
    assert len(cases) - published == {"mathvista": 36, "mathvision": 0, "logicvista": 0}[name]  # explained below


def test_mathvista_integers_written_as_floats_the_files_predate_the_official_script():
    stale = [c for c in fixture("mathvista.jsonl") if c["official"] != c["published"]]
    assert len(stale) == 36 and {c["record"]["answer_type"] for c in stale} == {"integer"}
    assert all("." in c["answer"] and not c["published"] for c in stale)  # "5.0": wrong in the file, right today


def json_number(text):
    """The "short answer" of a JSON text when it is a number rather than a string, else None."""
    try:
        short = json.loads(text).get("short answer")
    except (ValueError, AttributeError, RecursionError):
        return None
    return short if isinstance(short, float) else None


def test_dynamath_json_letters_text_and_int_as_vlmevalkit_and_the_official_code_read_them():
    for case in fixture("dynamath.jsonl"):
        if "table" in case:  # a published result table: worst case = seeds whose 10 variants are all right
            rows = [{"id": seed, "variant": v, "correct": c == "1"}
                    for seed, verdicts in enumerate(case["table"]) for v, c in enumerate(verdicts, 1)]
            metrics = E.dynamath_aggregate(rows)
            assert metrics["worst_case"] == pytest.approx(case["worst_case"]), case["source"]
            assert metrics["average"] == pytest.approx(case["average"]), case["source"]
            continue
        rec, text = case["record"], case["prediction"]
        answer = B.dynamath_extract(rec, text)
        number = json_number(text)
        if number is not None:  # a JSON number: VLMEvalKit's parser fails and its judge returns the number
            assert case["vlmevalkit_judge_asked"] and answer == repr(number)
        elif case["vlmevalkit_judge_asked"]:  # VLMEvalKit's parser fails here and asks its judge; ours asks too
            assert answer is None, case
        elif B._short_answer(text)[1] == "":
            assert case["vlmevalkit"] and answer is None  # an empty short answer: VLMEvalKit's "" in gold; ours asks
        else:
            assert B.dynamath_vlmevalkit(rec, answer) == case["vlmevalkit"], case
        official = B.dynamath_official(rec, B.dynamath_official_extract(rec, text))
        if rec["answer_type"] == "int":  # floats in the official data; its code would read the hub's kind as text
            assert official and not case["official"], case
        else:
            assert official == case["official"], case


def test_dynamath_the_issue_cases():
    free = {"answer_type": "float", "ground_truth": "3.1416"}
    json_in_block = '<think>r = 1</think> <answer>{"solution": "pi r^2", "short answer": "3.142"}</answer>'
    assert extract("dynamath", free, json_in_block) == "3.142" and E.BENCHMARKS["dynamath"].is_correct(free, "3.142")
    mc = {"answer_type": "multiple choice", "ground_truth": "B"}
    assert [extract("dynamath", mc, f'<answer>{{"short answer": "{s}"}}</answer>') for s in ("b", "B. 45", "(B)")] == \
        ["B", "B", "B"]
    assert not B.dynamath_official(mc, "b")  # the official code: one character, case counts
    text = {"answer_type": "text", "ground_truth": "Odd"}
    assert B.dynamath_vlmevalkit(text, "odd") and not B.dynamath_official(text, "odd")
    assert B.dynamath_official(text, "Odd function") and not B.dynamath_vlmevalkit(text, "Odd function")
    whole = {"answer_type": "int", "ground_truth": "5.000000000000001"}
    assert B.dynamath_vlmevalkit(whole, "5") and B.dynamath_official(whole, "5")
    nested = '{"solution": ' + "[" * 100_000 + "]" * 100_000 + ', "short answer": "3.142"}'
    assert B.dynamath_extract(free, nested) is None  # no crash: the judge is asked


def test_dynamath_worst_case_needs_every_variant_of_every_seed(tmp_path):
    rows = [{"id": "1", "variant": v, "correct": True} for v in range(1, 11)]
    rows += [{"id": "2", "variant": v, "correct": v != 7} for v in range(1, 11)]
    assert E.dynamath_aggregate(rows) == {"average": 0.95, "worst_case": 0.5, "n": 20, "n_seeds": 2}
    with pytest.raises(ValueError, match="the full set is 501 seeds x 10 variants"):
        E.check_dynamath([{"id": "1", "variant": v} for v in range(1, 11)], full=True)
    with pytest.raises(ValueError, match="different numbers of variants"):
        E.check_dynamath([{"id": "1", "variant": 1}, {"id": "1", "variant": 2}, {"id": "2", "variant": 1}], full=False)


def test_wemath_options_letters_and_the_official_answer_rule():
    for case in fixture("wemath.jsonl"):
        if "table" in case:  # the four dimensions, against VLMEvalKit's vendored official code
            rows = [{"ID": pid, "key": f"{pid.split('_')[0]}_{part}", "correct": c == "1"}
                    for pid, verdicts in case["table"].items()
                    for part, c in zip([str(i) for i in range(1, len(verdicts))] + ["multi"], verdicts)]
            m = E.wemath_aggregate(rows)
            assert m["n_problems"] == 525 and m["IG"] * 525 == pytest.approx(case["counts"]["InadequateGeneralization"])
            assert m["score_strict"] == pytest.approx(case["score_strict"])
            assert m["score_loose"] == pytest.approx(case["score_loose"])
            continue
        rec, text = case["record"], case["prediction"]
        assert B.wemath_extract(rec, text) == case["vlmevalkit_prefetch"], case
        assert B.wemath_vlmevalkit(rec, text) == case["vlmevalkit"], case
        assert B.wemath_official(rec, B.wemath_official_extract(rec, text)) == case["official"], case
    assert B.wemath_options("A. ①;B．②;C. ③; D. Cannot be determined; E. No correct answer")["B"] == "②"
    odd = B.wemath_options("A. Yes, around point ;O.;B. Yes, counterclockwise around point ;O.;C. No.; F. None")
    assert odd == {"A": "Yes, around point ;O.", "B": "Yes, counterclockwise around point ;O.", "C": "No.", "F": "None"}


def test_mathverse_exact_match_then_whole_letter_sets():
    for case in fixture("mathverse.jsonl"):
        assert B.mathverse_exact(case["record"], case["answer"]) == case["vlmevalkit_post_check"], case
    two = {"question_type": "multi-choice", "answer": "C\nD"}
    assert [B.mathverse_grade(two, a) for a in ("C", "C, D", "D, C", "CD")] == [False, True, True, True]
    assert B.mathverse_grade({"question_type": "multi-choice", "answer": "(C)"}, "C")
    area = {"question_type": "free-form", "answer": "Area $=113.1 \\mathrm{~cm}^{2}$"}
    assert B.mathverse_grade(area, "113.1") and not B.mathverse_grade(area, "113")
    assert E.BENCHMARKS["mathverse"].prompt({"question": "", "query_wo": "directly", "query_cot": "reason"}) == \
        "directly"
    assert E.OFFICIAL["mathverse"].prompt({"question": "", "query_wo": "directly", "query_cot": "reason"}) == "reason"


# ----------------------------------------------------------------------------------------------------
# Extraction for reasoning models: the <answer> block, can_infer, the bare response, never a crash


def test_letters_inside_the_answer_block_as_can_infer_reads_them():
    vision = {"id": "1", "options": ["3", "45", "7", "9"], "answer": "B"}
    we = {"option": "A. 3;B. 45;C. 7;D. 9", "answer": "B"}
    logic = {"answer": "B"}
    for said in ("The answer is B", "B. 45", "Option B", "B)", "(B)", "45"):
        response = f"<think>...</think> <answer>{said}</answer>"
        assert E.BENCHMARKS["mathvision"].is_correct(vision, extract("mathvision", vision, response)), said
        assert E.BENCHMARKS["wemath"].is_correct(we, extract("wemath", we, response)), said
        if said != "45":
            assert E.BENCHMARKS["logicvista"].is_correct(logic, extract("logicvista", logic, response)), said
    assert extract("logicvista", logic, "<answer>BD</answer>") == "B, D"
    assert extract("mathvision", vision, "<answer>B or C</answer>") is None  # two letters: the judge decides


def test_a_bare_response_is_its_own_answer_and_nothing_crashes():
    assert extract("logicvista", {"answer": "B, D"}, "B, D") == "B, D"
    mv = {"pid": "1", "question_type": "free_form", "answer_type": "integer", "answer": "2", "precision": None}
    assert extract("mathvista", mv, "2") == "2" and extract("mathvista", mv, "x = 2") == "2"
    assert extract("mathvista", mv, "so the answer is 2 cm.") == "2"
    assert extract("mathvista", mv, "<answer>1:4</answer>") is None  # "1:4", "40-50" are not one number
    assert extract("mathvista", mv, "<answer>40-50</answer>") is None
    for junk in ("", "<answer></answer>", "{" * 5000, "\\boxed{" * 300, "<answer>" * 50):
        for name, bench in E.BENCHMARKS.items():
            if bench.hub is not None:
                rec = {"question_type": "multi-choice", "answer": "B", "options": ["1", "2"], "choices": ["1", "2"],
                       "answer_type": "float", "ground_truth": "1", "option": "A. 1;B. 2"}
                bench.is_correct(rec, E.rule_answer(bench, rec, B.answer_block(junk)))


def test_mathvision_option_values_and_free_form_rounding_differ_between_the_rule_sets():
    mc = {"options": ["$\\frac{1}{2}$", "3", "5"], "answer": "A"}
    assert B.mathvision_official(mc, "0.5") and not B.mathvision_vlmevalkit(mc, "0.5")  # option value: official only
    free = {"options": [], "answer": "2.5"}
    assert B.mathvision_official(free, "2.501") and not B.mathvision_vlmevalkit(free, "2.501")  # 2 places vs 1e-6
    assert B.mathvision_vlmevalkit(free, "5/2") and B.mathvision_official(free, "\\frac{5}{2}")
    assert not B.mathvision_official(free, "__import__('os').system('touch /tmp/pwned')")  # read, never run
    assert B.numeric_value("\\frac{3^{1008}-1}{3^{1009}}") == pytest.approx(1 / 3)
    assert B.numeric_value("12cm") is None and B.numeric_value("\\frac{1}{4}}.the answer is") == 0.25


def test_mathvista_rules():
    rec = {"question_type": "multi_choice", "answer_type": "text", "answer": "blue square", "precision": None,
           "choices": ["red circle", "blue square", "green triangle"]}
    assert B.mathvista_official(rec, "bleu square") and not B.mathvista_vlmevalkit(rec, "bleu square")
    assert B.mathvista_vlmevalkit(rec, "B") and B.mathvista_vlmevalkit(rec, "The blue square")  # option text
    floats = {"question_type": "free_form", "answer_type": "float", "precision": 2.0, "answer": "1.45"}
    assert B.mathvista_official(floats, "1.449") and not B.mathvista_vlmevalkit(floats, "1.449")
    integer = {"question_type": "free_form", "answer_type": "integer", "precision": None, "answer": "3"}
    assert B.mathvista_official(integer, "3.0") and not B.mathvista_vlmevalkit(integer, "3.0")


# ----------------------------------------------------------------------------------------------------
# Whole runs


def scripted(responses, judge_reply="A"):
    """A stand-in for backends.make_backend: the model answers by a tag in the prompt, the judge always the same."""
    calls = {"model": 0, "judge": 0, "systems": set(), "opts": []}

    def make_backend(name, model, **opts):
        calls["opts"].append((name, model, opts))

        def gen(requests, n=1, max_new_tokens=256, temperature=0.0, **_):
            assert n == 1 and temperature == 0.0
            if model == "gpt-4o-mini":
                calls["judge"] += len(requests)
                return [["Yes" if "groundtruth" in r["prompt"] else "0" if "[Model_answer]" in r["prompt"] else
                         judge_reply] for r in requests]
            calls["model"] += len(requests)
            calls["systems"] |= {r["system"] for r in requests}
            return [[next(v for k, v in responses.items() if f"[{k}]" in r["prompt"])] for r in requests]
        return gen
    return make_backend, calls


def write_schema_file(tmp_path):
    """A test file in our record schema, one record per verifier type (questions tagged for the scripted model)."""
    solid_image(56).save(tmp_path / "img.png")
    recs = [("digit", "3", {}), ("mcq", "B", {"choices": ["red", "green"]}), ("math", "\\frac{1}{2}", {}),
            ("iou", "[0.25, 0.25, 0.75, 0.75]", {}), ("iou", "[0.25, 0.25, 0.75, 0.75]", {}), ("digit", "2", {}),
            ("open", "circle", {})]
    lines = [json.dumps({"id": f"t{i}", "image": "img.png", "question": f"[t{i}] question {i}", "answer": answer,
                         "verifier_type": vtype, "task": vtype} | extra)
             for i, (vtype, answer, extra) in enumerate(recs)]
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    return {"t0": "<think>3 objects</think> <answer>3</answer>", "t1": "<answer>A</answer>",
            "t2": "<answer>0.5</answer>", "t3": "<answer>[0.25, 0.25, 0.75, 0.70]</answer>",  # IoU 0.9
            "t4": "<answer>[0.0, 0.0, 0.3, 0.3]</answer>",  # IoU 0.0025 / 0.3375
            "t5": "<think>wait, let me check again</think> it is 2", "t6": "<answer>circle</answer>"}


def test_toy_scoring_with_rewards_and_open_records_dropped_without_a_judge(tmp_path, monkeypatch, capsys):
    responses = write_schema_file(tmp_path)
    make_backend, calls = scripted(responses)
    monkeypatch.setattr(backends, "make_backend", make_backend)
    scores = E.main(["--model", "m", "--bench", "jsonl", "--data-dir", str(tmp_path / "test.jsonl"),
                     "--out", str(tmp_path / "run"), "--backend", "hf"])
    out = capsys.readouterr().out
    assert "jsonl: dropped 1 open-ended records" in out and "| **run** |" in out
    b = scores["benchmarks"]["jsonl"]
    # right: the digit 3, the math 0.5 = 1/2, the box with IoU 0.9; wrong: letter A, IoU 0.007, no <answer>
    assert b["n"] == 6 and b["score"] == 50.0
    assert b["metrics"]["verifier_type/iou"] == 0.5
    assert b["metrics"]["mean_iou"] == pytest.approx((0.9 + 0.0025 / 0.3375) / 2)
    assert b["trace"] == {"mean_words": pytest.approx(21 / 6), "aha": 1 / 6, "no_answer": 1 / 6}
    assert calls["systems"] == {E.qwen.SYSTEM_PROMPT}
    # with a judge, the open record is graded (the paper's verify prompt) instead of dropped
    monkeypatch.setattr(backends, "make_backend", scripted(responses)[0])
    scores = E.main(["--model", "m", "--bench", "jsonl", "--data-dir", str(tmp_path), "--out", str(tmp_path / "j"),
                     "--backend", "hf", "--judge-backend", "openai", "--no-system-prompt"])
    assert scores["benchmarks"]["jsonl"]["n"] == 7 and scores["benchmarks"]["jsonl"]["metrics"]["task/open"] == 1.0


def test_a_gold_its_verifier_cannot_read_fails_at_load_naming_file_line_id_and_field(tmp_path):
    solid_image(56).save(tmp_path / "img.png")
    good = {"id": "a", "image": "img.png", "question": "how many?", "answer": "3", "verifier_type": "digit"}
    (tmp_path / "test.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good | {"id": "b", "answer": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"test\.jsonl:2 \(id 'b'\): field 'answer'"):
        E.main(["--model", "m", "--bench", "jsonl", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])


def test_resume_after_interruption_redoes_only_missing_and_torn_lines(tmp_path, monkeypatch):
    responses = write_schema_file(tmp_path)
    argv = ["--model", "m", "--bench", "jsonl", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"),
            "--backend", "hf", "--batch-size", "2"]
    make_backend, calls = scripted(responses)
    monkeypatch.setattr(backends, "make_backend", make_backend)
    first = E.main(argv)
    path = tmp_path / "run" / "predictions.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert calls["model"] == len(lines) == 6
    path.write_text("".join(lines[:2]) + lines[2][:15])  # killed while writing the third line
    second = E.main(argv)
    assert calls["model"] == 6 + 4  # the torn one and the three after it
    assert path.read_text() == "".join(lines)  # nothing lost, nothing duplicated, same order
    assert second["benchmarks"] == first["benchmarks"]
    E.main(argv)
    assert calls["model"] == 10  # all there: the model is not even loaded


def test_another_model_or_setting_never_reuses_a_run_and_default_folders_differ_per_model(tmp_path, monkeypatch):
    responses = write_schema_file(tmp_path)
    monkeypatch.setattr(backends, "make_backend", scripted(responses)[0])
    argv = ["--bench", "jsonl", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), "--backend", "hf"]
    E.main(["--model", "first"] + argv)
    with pytest.raises(SystemExit, match=r'model.path: "first" there, "second" now'):
        E.main(["--model", "second"] + argv)
    with pytest.raises(SystemExit, match=r"max_new_tokens: 800 there, 2048 now(.|\n)*preset"):
        E.main(["--model", "first", "--preset", "vlmevalkit"] + argv)
    E.main(["--model", "second", "--overwrite"] + argv)  # starts afresh
    assert json.loads((tmp_path / "run" / "run.json").read_text())["model"] == {"path": "second"}
    for name in ("a", "b"):
        os.makedirs(tmp_path / name / "model")
    outs = {E.default_out(E.parse_args(["--model", str(tmp_path / n / "model")])) for n in ("a", "b")}
    assert len(outs) == 2 and all(os.path.basename(o).startswith("model-") for o in outs)
    assert E.default_out(E.parse_args(["--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--rules", "official"])) == \
        os.path.join("runs", "eval", "Qwen--Qwen2.5-VL-3B-Instruct-official")


def write_six(root):
    """Local copies of the six benchmarks in the --data-dir layout, two or three questions each, with the
    scripted model's response per tag. Each benchmark's expected score is in the comment."""
    os.makedirs(root / "images")
    solid_image(56).save(root / "images" / "a.png")
    img = {"image": "images/a.png"}
    data = {  # 100: both right
        "mathvista": [{"pid": "1", "query": "[v1] Hint: pick one", "question": "q", "question_type": "multi_choice",
                       "answer_type": "text", "choices": ["3", "4", "5"], "answer": "4", "precision": None},
                      {"pid": "2", "query": "[v2] how long?", "question": "q", "question_type": "free_form",
                       "answer_type": "float", "choices": None, "answer": "1.5", "precision": 1.0}],
        # 50: the letter is right, 1/3 is not 1/2
        "mathvision": [{"id": "1", "question": "[m1] <image1> which?", "options": ["1", "2"], "answer": "B"},
                       {"id": "2", "question": "[m2] <image1> ratio?", "options": [], "answer": "\\frac{1}{2}"}],
        # 100: the letter, and a number with its unit (our stand-in for the judge's grading)
        "mathverse": [{"sample_index": 1, "question": "", "query_wo": "[r1] see the image", "answer": "A",
                       "question_type": "multi-choice"},
                      {"sample_index": 2, "question": "", "query_wo": "[r2] see the image", "answer": "12 cm",
                       "question_type": "free-form"}],
        # worst case 50: seed s2 fails its second variant (average 75)
        "dynamath": [{"id": s, "variant": v, "question": f"[d{s}{v}] area?", "answer_type": "float",
                      "ground_truth": "2.000"} for s in ("s1", "s2") for v in (1, 2)],
        # Score (Strict) 100: one 2-step problem, both steps and the composite right
        "wemath": [{"ID": "2steps_1", "key": f"2steps_{k}", "question": f"[w{k}] length?",
                    "option": "A. 300;B. 400; C. No correct answer", "answer": "B"} for k in ("1", "2", "multi")],
        # 100: letters as a set, and one answer found only by the judge
        "logicvista": [{"question": "[l1] which two?", "answer": "B, D"}, {"question": "[l2] which?", "answer": "A"}],
    }
    for name, recs in data.items():
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r | img) + "\n" for r in recs)
    responses = {"v1": "<answer>B</answer>", "v2": "<answer>1.5</answer>", "m1": "\\boxed{B}", "m2": "\\boxed{1/3}",
                 "r1": "<answer>A</answer>", "r2": "<answer>12</answer>", "l1": "<answer>D, B</answer>",
                 "l2": "I would go with the first one.", "w1": "<answer>B</answer>", "w2": "<answer>B</answer>",
                 "wmulti": "<answer>B. 400</answer>"}
    responses |= {f"d{s}{v}": '{"solution": "...", "short answer": "%s"}' % ("2.5" if (s, v) == ("s2", 2) else "2.0004")
                  for s in ("s1", "s2") for v in (1, 2)}
    return responses


def test_six_benchmarks_from_local_copies_then_the_side_by_side_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    responses = write_six(tmp_path / "data")
    make_backend, calls = scripted(responses)
    monkeypatch.setattr(backends, "make_backend", make_backend)
    scores = E.main(["--model", "m", "--bench", "six", "--data-dir", str(tmp_path / "data"), "--limit", "5",
                     "--out", str(tmp_path / "mine"), "--backend", "vllm"])
    got = {name: b["score"] for name, b in scores["benchmarks"].items()}
    assert got == {"mathvista": 100.0, "mathvision": 50.0, "mathverse": 100.0, "dynamath": 50.0, "wemath": 100.0,
                   "logicvista": 50.0}  # no judge: "I would go with the first one." has no letter
    assert scores["benchmarks"]["dynamath"]["metrics"]["average"] == 0.75 and calls["judge"] == 0
    _, first = next(jsonl.read_jsonl(tmp_path / "mine" / "scored-mathvista.jsonl"))
    assert {"pid", "choices", "precision", "response", "correct"} <= set(first)  # the benchmark's own fields kept
    report = (tmp_path / "mine" / "report.md").read_text()
    assert "rules vlmevalkit, preset paper, max_new_tokens 800" in report and "judge none" in report
    # the same predictions, judged: VLMEvalKit's policy asks the judge for LogicVista and MathVerse every time,
    # for the others only where the rules find nothing (or, free form, nothing right)
    make_backend, calls = scripted(responses, judge_reply="A")
    monkeypatch.setattr(backends, "make_backend", make_backend)
    judged = E.main(["--model", "m", "--bench", "logicvista,mathverse", "--data-dir", str(tmp_path / "data"),
                     "--out", str(tmp_path / "mine"), "--backend", "vllm", "--judge-backend", "openai", "--limit", "5"])
    assert calls["model"] == 0 and judged["benchmarks"]["logicvista"]["score"] == 50.0  # the judge said A to both
    for name in ("logicvista", "mathverse"):  # the trace counts what the rules read, whoever gave the answer
        assert judged["benchmarks"][name]["trace"] == scores["benchmarks"][name]["trace"]
    assert judged["benchmarks"]["logicvista"]["trace"]["no_answer"] == 0.5  # l2 has no letter
    assert ("openai", "gpt-4o-mini", {"base_url": None, "api_key": "sk-openai"}) in calls["opts"]  # OpenAI's own
    capsys.readouterr()
    table = E.main(["report", str(tmp_path / "mine")])
    rows = table.splitlines()
    assert rows[0] == "| model | MathVista | MathVision | MathVerse | DynaMath | WeMath | LogicVista | Avg |"
    assert "| VLAA-Thinker-Qwen2.5VL-7B (paper) | 68.0 | 26.4 | 48.2 | 22.4 | 41.5 | 48.5 | 42.5 |" in rows
    assert capsys.readouterr().out.strip() == table


def test_toy_end_to_end_with_the_tiny_model(each_model_dir, tmp_path, capsys):
    toy.make_data(str(tmp_path / "toy"), n=0, test_n=6, seed=0)
    scores = E.main(["--model", each_model_dir, "--bench", "toy", "--data-dir", str(tmp_path / "toy"),
                     "--out", str(tmp_path / "tiny"), "--backend", "hf", "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    n = scores["benchmarks"]["toy"]["n"]
    assert "| **tiny** |" in out and f"| tiny | Toy | {n} |" in out
    assert n == sum(r["verifier_type"] != "open" for _, r in jsonl.read_jsonl(tmp_path / "toy" / "test.jsonl"))
    assert len((tmp_path / "tiny" / "predictions.jsonl").read_text().splitlines()) == n
    assert scores["settings"]["max_pixels"] == 256 * 32 * 32 and scores["settings"]["max_new_tokens"] == 8


# ----------------------------------------------------------------------------------------------------
# Bad benchmark files: the message names the file, the line and the field


def test_missing_or_malformed_benchmark_files(tmp_path):
    argv = ["--model", "m", "--bench", "mathvista", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")]
    with pytest.raises(FileNotFoundError, match=r"mathvista: no such file .*mathvista\.jsonl(.|\n)*pid question_type"):
        E.main(argv)
    solid_image(56).save(tmp_path / "a.png")
    good = {"pid": "1", "question": "q", "question_type": "free_form", "answer_type": "integer", "answer": "3",
            "image": "a.png"}
    path = tmp_path / "mathvista.jsonl"
    cases = [(json.dumps(good) + "\n" + json.dumps({k: v for k, v in good.items() if k != "answer_type"}) + "\n",
              ValueError, r"mathvista\.jsonl:2: missing field 'answer_type'"),
             (json.dumps(good) + "\n" + '{"pid": "2", "question": \n', ValueError, r"mathvista\.jsonl:2: bad JSON"),
             (json.dumps(good | {"image": "nope.png"}) + "\n", FileNotFoundError,
              r"mathvista\.jsonl:1: field 'image': image not found: .*nope\.png"),
             (json.dumps(good) + "\n" + json.dumps(good) + "\n", ValueError, "mathvista: duplicate question '1'")]
    for text, error, message in cases:
        path.write_text(text)
        with pytest.raises(error, match=message):
            E.main(argv + ["--overwrite"])  # each case edits the data: a new run identity
    with pytest.raises(SystemExit, match="unknown benchmark"):
        E.main(argv[:3] + ["mathvista,mmmu"])


BAD_ROWS = {  # case -> (benchmark, the bad row: its first row changed (None: field removed), what the error says)
    "a text file as image": ("mathvista", {"pid": "9", "image": "images/note.png"},
                             r"field 'image': not an image: .*note\.png"),
    "a PNG cut short": ("mathvision", {"id": "9", "image": "images/cut.png"},
                        r"field 'image': unreadable image .*cut\.png: image file is truncated"),
    "a JPEG cut short, in image_path": ("logicvista", {"image": None, "image_path": "images/cut.jpg"},
                                        r"field 'image_path': unreadable image .*cut\.jpg"),
    "no image at all": ("mathverse", {"sample_index": 9, "image": "images/nope.png"},
                        r"field 'image': image not found"),
    "a 100,000-character question": ("logicvista", {"question": "Which? " + "x" * 99_993},
                                     r"field 'question' is 100000 characters \(limit 32000\)"),
    "options over the limit together": ("mathvision", {"id": "9", "options": ["1" * 20_000, "2" * 20_000]},
                                        r"field 'options' is 40000 characters \(limit 32000\)"),
    "a missing field": ("wemath", {"key": "2steps_9", "option": None}, r"missing field 'option'"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_of_a_local_copy_is_named_before_any_model_runs_or_skipped(tmp_path, monkeypatch, capsys, case):
    """06 checks a --data-dir copy as 01-05 check records: fields present, text bounded, every image decoded.
    It used to find a bad image mid-generation, and send any question."""
    import numpy as np
    from PIL import Image

    name, change, why = BAD_ROWS[case]
    responses = write_six(tmp_path / "data")
    (tmp_path / "data" / "images" / "note.png").write_text("not an image\n")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for ext in ("png", "jpg"):
        noise.save(tmp_path / "data" / "images" / f"cut.{ext}")
        data = (tmp_path / "data" / "images" / f"cut.{ext}").read_bytes()
        (tmp_path / "data" / "images" / f"cut.{ext}").write_bytes(data[:len(data) // 2])
    path = tmp_path / "data" / f"{name}.jsonl"
    lines = path.read_text().splitlines()
    bad = {k: v for k, v in (json.loads(lines[0]) | change).items() if v is not None}
    path.write_text("\n".join(lines + [json.dumps(bad)]) + "\n")
    make_backend, calls = scripted(responses)
    monkeypatch.setattr(backends, "make_backend", make_backend)
    argv = ["--model", "m", "--bench", name, "--data-dir", str(tmp_path / "data"), "--backend", "vllm"]
    error = FileNotFoundError if case == "no image at all" else ValueError
    with pytest.raises(error, match=rf"{name}\.jsonl:{len(lines) + 1}: {why}"):
        E.main(argv + ["--out", str(tmp_path / "run")])
    assert calls["model"] == 0  # found at load, before any model runs
    scores = E.main(argv + ["--out", str(tmp_path / "skip"), "--skip-bad"])
    assert scores["benchmarks"][name]["n"] == len(lines) and calls["model"] == len(lines)
    assert f"{name}.jsonl: skipped 1 bad record(s) (--skip-bad):\n  " in capsys.readouterr().out
