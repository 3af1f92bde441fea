"""06_eval.py by example: each benchmark's official rule on hand-made cases, then whole runs (tiny model,
scripted backends), resume after a kill, and bad benchmark files."""

import importlib
import json
import os

import pytest
from conftest import solid_image

import toy
from vlaa import backends, jsonl, qwen

E = importlib.import_module("06_eval")


# ----------------------------------------------------------------------------------------------------
# Extraction: <answer>, then the last \boxed{}, then the benchmark's own pattern


def test_extract_answer_block_then_boxed_then_own_pattern():
    mv = {"question_type": "multi_choice", "choices": ["3", "4", "5"]}
    assert E.mathvista_extract(mv, "<think>hmm</think> <answer>\\boxed{B}</answer>") == "B"
    assert E.mathvista_extract(mv, "first \\boxed{3}, then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert E.mathvista_extract(mv, "So the answer is (C).") == "(C)"
    assert E.mathvista_extract(mv, "Counting again, I pick B") == "B"  # VLMEvalKit's can_infer: a lone letter
    assert E.mathvista_extract(mv, "A or B, hard to say, let me think more") is None
    dyna = {"answer_type": "float"}
    assert E.dynamath_extract(dyna, 'Sure! {"solution": "r = 1, so pi r^2", "short answer": "3.142"}') == "3.142"
    assert E.dynamath_extract(dyna, "<answer>3.14</answer> {\"short answer\": \"9\"}") == "3.14"
    assert E.dynamath_extract(dyna, "no JSON here") is None
    assert E.wemath_extract({}, "<Thought process>: <<A is too big>> <Answer>: <<B>>") == "B"
    assert E.rule_answer({}, "the answer is 12 cm.") == "12 cm"


# ----------------------------------------------------------------------------------------------------
# is_correct: each benchmark's official rule


def test_mathvista_rounds_floats_to_the_items_precision_and_compares_integers_as_integers():
    two_places = {"question_type": "free_form", "answer_type": "float", "precision": 2.0, "answer": "1.45"}
    assert [E.mathvista_is_correct(two_places, a) for a in ("1.449", "1.4549", "1.46", "about 1.45 m")] == \
        [True, True, False, True]
    one_place = dict(two_places, precision=1.0, answer="2.5")
    assert [E.mathvista_is_correct(one_place, a) for a in ("2.54", "2.56")] == [True, False]
    integer = {"question_type": "free_form", "answer_type": "integer", "precision": None, "answer": "3"}
    assert [E.mathvista_is_correct(integer, a) for a in ("3", "3.0", "3.4", "4", None)] == \
        [True, True, True, False, False]  # official str(int(float(x))): 3.4 counts as 3


def test_mathvista_maps_letters_to_choices_and_anything_else_to_the_nearest_choice():
    rec = {"question_type": "multi_choice", "answer_type": "text", "answer": "blue square",
           "choices": ["red circle", "blue square", "green triangle"]}
    assert E.mathvista_is_correct(rec, "B") and E.mathvista_is_correct(rec, "(B) the blue one")
    assert E.mathvista_is_correct(rec, "blue squares")  # edit distance 1 to "blue square"
    assert not E.mathvista_is_correct(rec, "A")
    assert not E.mathvista_is_correct(rec, "green")  # a tie (9, 10, 9): the first nearest, "red circle"


def test_mathvision_letter_or_option_text_numbers_to_two_places_and_never_eval():
    mc = {"answer": "A", "options": ["1/2", "3", "5"]}
    assert [E.mathvision_is_correct(mc, a) for a in ("A", "(a)", "\\frac{1}{2}", "0.5", "B")] == \
        [True, True, True, True, False]
    free = {"answer": "2.5", "options": []}
    assert [E.mathvision_is_correct(free, a) for a in ("2.499", "x = 2.50", "\\frac{5}{2}", "2.6")] == \
        [True, True, True, False]
    assert not E.mathvision_is_correct(free, "__import__('os').system('touch /tmp/pwned')")


def test_mathverse_letters_for_multi_choice_and_units_tolerated_for_free_form():
    assert E.mathverse_is_correct({"question_type": "multi-choice", "answer": "B"}, "(B) 12")
    assert not E.mathverse_is_correct({"question_type": "multi-choice", "answer": "B"}, "C")
    free = {"question_type": "free-form", "answer": "2191.7 metres"}
    assert [E.mathverse_is_correct(free, a) for a in ("2191.7", "2191.7 m", "2000")] == [True, True, False]


def test_dynamath_float_within_a_thousandth_letters_and_text():
    f = {"answer_type": "float", "ground_truth": "3.142"}
    assert [E.dynamath_is_correct(f, a) for a in ("3.1416", "1π", "3.142 cm", "3.14")] == [True, True, True, False]
    mc = {"answer_type": "multiple choice", "ground_truth": "B"}
    assert [E.dynamath_is_correct(mc, a) for a in ("B", "(B) 7", "b", "C")] == [True, True, False, False]
    text = {"answer_type": "text", "ground_truth": "yes"}
    assert [E.dynamath_is_correct(text, a) for a in ("yes", "yes, it is", "no")] == [True, True, False]


def test_dynamath_worst_case_counts_a_seed_only_if_all_ten_variants_are_right():
    rows = [{"id": "1", "variant": v, "correct": True} for v in range(1, 11)]
    rows += [{"id": "2", "variant": v, "correct": v != 7} for v in range(1, 11)]
    assert E.dynamath_aggregate(rows) == {"average": 0.95, "worst_case": 0.5, "n": 20, "n_seeds": 2}


def test_wemath_four_dimensional_metrics_on_a_constructed_table():
    table = {  # problem ID: (sub-problem verdicts, composite verdict)
        "2steps_1": ((1, 1), 1),     # CM (strict and loose)
        "2steps_2": ((1, 1), 0),     # IG
        "2steps_3": ((1, 0), 1),     # RM strict, CM loose
        "2steps_4": ((0, 0), 1),     # RM strict and loose
        "2steps_5": ((0, 1), 0),     # IK
        "3steps_1": ((1, 1, 1), 1),  # CM
        "3steps_2": ((1, 0, 1), 0),  # IK
        "3steps_3": ((0, 0, 0), 0),  # IK
    }
    rows = []
    for pid, (subs, multi) in table.items():
        steps = pid[0]
        rows += [{"ID": pid, "key": f"{steps}steps_{i}", "correct": bool(c)} for i, c in enumerate(subs, 1)]
        rows.append({"ID": pid, "key": f"{steps}steps_multi", "correct": bool(multi)})
    rows += [{"ID": "2steps_9", "key": "2steps_1", "correct": True}]  # incomplete: left out
    m = E.wemath_aggregate(rows)
    # n = 8; IK 3, IG 1, CM strict 2 / loose 3, RM strict 2 / loose 1
    assert m["score_strict"] == (8 - 0.5 * 1 - 2 - 3) / 8 == 0.3125
    assert m["score_loose"] == (8 - 0.5 * 1 - 1 - 3) / 8 == 0.4375
    assert (m["IK"], m["IG"], m["CM_strict"], m["CM_loose"]) == (0.375, 0.125, 0.25, 0.375)
    assert (m["RM_strict"], m["RM_loose"]) == (0.5, 0.25)  # RM / (CM + RM), as the official
    assert m["n_problems"] == 8 and m["n"] == 5 * 3 + 3 * 4 + 1
    assert E.wemath_is_correct({"answer": "B"}, "B") and E.wemath_is_correct({"answer": "B"}, "(B) 400, 300")
    assert not E.wemath_is_correct({"answer": "B"}, "C")


def test_logicvista_multi_letter_answers_compare_as_sets():
    rec = {"answer": "B, D"}
    assert [E.logicvista_is_correct(rec, a) for a in ("D, B", "B and D", "(B) (D)", "B", "B, C, D", None)] == \
        [True, True, True, False, False, False]
    assert not E.logicvista_is_correct({"answer": ""}, "A")  # the one item with an empty gold is never right


# ----------------------------------------------------------------------------------------------------
# Whole runs


def scripted(responses, judge_reply="A"):
    """A stand-in for backends.make_backend: the model answers by a tag in the prompt, the judge always the same."""
    calls = {"model": 0, "judge": 0, "systems": set()}

    def make_backend(name, model, **opts):
        def gen(requests, n=1, max_new_tokens=256, temperature=0.0, **_):
            assert n == 1 and temperature == 0.0
            if model == "gpt-4o-mini":
                calls["judge"] += len(requests)
                return [["Yes" if "groundtruth" in r["prompt"] else judge_reply] for r in requests]
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
    assert calls["systems"] == {qwen.SYSTEM_PROMPT}
    # with a judge, the open record is graded (the paper's verify prompt) instead of dropped
    monkeypatch.setattr(backends, "make_backend", scripted(responses)[0])
    scores = E.main(["--model", "m", "--bench", "jsonl", "--data-dir", str(tmp_path), "--out", str(tmp_path / "j"),
                     "--backend", "hf", "--judge-backend", "openai", "--no-system-prompt"])
    assert scores["benchmarks"]["jsonl"]["n"] == 7 and scores["benchmarks"]["jsonl"]["metrics"]["task/open"] == 1.0


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
        # 100: the letter, and a number with its unit
        "mathverse": [{"sample_index": 1, "question": "q", "query_cot": "[r1] see the image", "answer": "A",
                       "question_type": "multi-choice"},
                      {"sample_index": 2, "question": "q", "query_cot": "[r2] see the image", "answer": "12 cm",
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
    responses = {"v1": "<answer>B</answer>", "v2": "<answer>1.54</answer>", "m1": "\\boxed{B}", "m2": "\\boxed{1/3}",
                 "r1": "<answer>A</answer>", "r2": "<answer>12</answer>", "l1": "<answer>D, B</answer>",
                 "l2": "I would go with the first one.", "w1": "<Answer>: <<B>>", "w2": "<answer>B</answer>",
                 "wmulti": "<answer>B. 400</answer>"}
    responses |= {f"d{s}{v}": '{"solution": "...", "short answer": "%s"}' % ("2.5" if (s, v) == ("s2", 2) else "2.0004")
                  for s in ("s1", "s2") for v in (1, 2)}
    return responses


def test_six_benchmarks_from_local_copies_then_the_side_by_side_report(tmp_path, monkeypatch, capsys):
    responses = write_six(tmp_path / "data")
    make_backend, calls = scripted(responses, judge_reply="A")
    monkeypatch.setattr(backends, "make_backend", make_backend)
    scores = E.main(["--model", "m", "--bench", ",".join(E.SIX), "--data-dir", str(tmp_path / "data"),
                     "--out", str(tmp_path / "mine"), "--backend", "vllm", "--judge-backend", "openai"])
    got = {name: b["score"] for name, b in scores["benchmarks"].items()}
    assert got == {"mathvista": 100.0, "mathvision": 50.0, "mathverse": 100.0, "dynamath": 50.0, "wemath": 100.0,
                   "logicvista": 100.0}
    assert scores["benchmarks"]["dynamath"]["metrics"]["average"] == 0.75 and scores["avg"] == 500 / 6
    assert calls["judge"] == 1  # only LogicVista's second answer needed it (VLMEvalKit's prefetch)
    scored = [r for _, r in jsonl.read_jsonl(tmp_path / "mine" / "scored-logicvista.jsonl")]
    assert [(r["extracted"], r["extracted_by"]) for r in scored] == [("D, B", "rule"), ("A", "judge")]
    _, first = next(jsonl.read_jsonl(tmp_path / "mine" / "scored-mathvista.jsonl"))
    assert {"pid", "choices", "precision", "response", "correct"} <= set(first)  # the benchmark's own fields kept
    assert os.path.exists(tmp_path / "mine" / "report.md")
    # a second run with only some benchmarks: no Avg; report puts both next to the paper's rows
    monkeypatch.setattr(backends, "make_backend", scripted(responses)[0])
    E.main(["--model", "m", "--bench", "mathvista,wemath", "--data-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "base"), "--backend", "vllm"])
    capsys.readouterr()
    table = E.main(["report", str(tmp_path / "mine"), str(tmp_path / "base")])
    rows = table.splitlines()
    assert rows[0] == "| model | MathVista | MathVision | MathVerse | DynaMath | WeMath | LogicVista | Avg |"
    assert "| VLAA-Thinker-Qwen2.5VL-7B (paper) | 68.0 | 26.4 | 48.2 | 22.4 | 41.5 | 48.5 | 42.5 |" in rows
    assert "| **mine** | 100.0 | 50.0 | 100.0 | 50.0 | 100.0 | 100.0 | 83.3 |" in rows
    assert "| **base** | 100.0 | – | – | – | 100.0 | – | – |" in rows
    assert capsys.readouterr().out.strip() == table


def test_prompts_keep_each_benchmarks_own_instructions():
    dyna = {"question": "What is x?", "answer_type": "float"}
    assert E.BENCHMARKS["dynamath"].prompt(dyna).startswith("## Question\n What is x?\n## Answer Instruction")
    assert '"short answer": "[Concise Answer]"' in E.BENCHMARKS["dynamath"].prompt(dyna)
    we = {"question": "OA = ( ) m", "option": "A. 300, 400;B. 400, 300; C. No correct answer"}
    assert E.BENCHMARKS["wemath"].prompt(we) == \
        "Question: OA = ( ) m\nOptions:\nA. 300, 400\nB. 400, 300\nC. No correct answer"
    assert E.BENCHMARKS["mathvision"].prompt({"question": "Which?", "options": ["1", "2"]}) == \
        "Which?\nChoices:\n(A) 1\n(B) 2"


def test_toy_end_to_end_with_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    toy.make_data(str(tmp_path / "toy"), n=0, test_n=6, seed=0)
    scores = E.main(["--model", tiny_model_dir, "--bench", "toy", "--data-dir", str(tmp_path / "toy"),
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
    path.write_text(json.dumps(good) + "\n" + json.dumps({k: v for k, v in good.items() if k != "answer_type"}) + "\n")
    with pytest.raises(ValueError, match=r"mathvista\.jsonl:2: missing field 'answer_type'"):
        E.main(argv)
    path.write_text(json.dumps(good) + "\n" + '{"pid": "2", "question": \n')
    with pytest.raises(ValueError, match=r"mathvista\.jsonl:2: bad JSON"):
        E.main(argv)
    path.write_text(json.dumps(good | {"image": "nope.png"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"mathvista\.jsonl:1: field 'image': no such file .*nope\.png"):
        E.main(argv)
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match="mathvista: duplicate question '1'"):
        E.main(argv)
    with pytest.raises(SystemExit, match="unknown benchmark"):
        E.main(argv[:3] + ["mathvista,mmmu"])
