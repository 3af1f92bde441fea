"""06's judge (vlaa/judge.py, vlaa/judge_prompts.py) by example, under --rules vlmevalkit: where VLMEvalKit d9fe347b
asks the judge and where it does not, how it reads each shape of reply, its retries, its prompts read from its
source (a small fake vlmeval/ tree made here, in the shape of the real files, so no VLMEvalKit text ships with
the tests), and what a run folder keeps: replies as they arrive, identical prompts once, one refused request one
counted bad record. Each expected verdict is what the VLMEvalKit function named beside it returns."""

import importlib
import json
import os
import textwrap

import pytest
from conftest import solid_image

from vlaa import backends, judge, judge_prompts
from vlaa import benchmarks as B

E = importlib.import_module("06_eval")


def fake_asker(replies, log=None):
    """A judge for judge_rows: the reply for the first key of `replies` found in the prompt (a reply list is one
    reply per try); None for a refused request. accept rejects a reply as `ask` does, up to judge.TRIES tries."""
    def asker(prompts, accept):
        got, failed = {}, {}
        for p in dict.fromkeys(prompts):
            tries = next((v for k, v in replies.items() if k in p), None)
            tries = tries if isinstance(tries, list) else [tries] * judge.TRIES
            if log is not None:
                log.append(p)
            good = [r for r in tries[:judge.TRIES] if r is not None and (accept is None or accept(r))]
            if good:
                got[p] = good[0]
            else:
                failed[p] = "refused" if tries[-1] is None else "not in the form asked"
        return got, failed
    return asker


def judged(name, recs, replies, log=None):
    """Score `recs` ({..., "response"}) as 06 does under --rules vlmevalkit with a judge -> {qid: (correct, by)}."""
    recs = [dict(r, qid=f"{name}/{i}") for i, r in enumerate(recs)]
    rows, failed = E.score_benchmark(name, E.BENCHMARKS[name], recs, {r["qid"]: r["response"] for r in recs},
                                     fake_asker(replies, log), {}, exact=True)
    return [(r["correct"], r["extracted_by"]) for r in rows], failed


# ----------------------------------------------------------------------------------------------------
# MathVista: mathvista.py MathVista_auxeval (prefetch: post_check(prefetch=True) on the whole prediction), then
# post_check(prefetch=False) on the prefetched answer or the judge's reply


def mc(response, answer="4"):
    return {"pid": "1", "question_type": "multi_choice", "answer_type": "text", "choices": ["3", "4", "5"],
            "answer": answer, "query": "Q", "response": response}


def free(response, answer, kind="integer"):
    return {"pid": "2", "question_type": "free_form", "answer_type": kind, "choices": None, "answer": answer,
            "query": "Q", "response": response}


def test_mathvista_the_judge_is_asked_where_post_check_prefetch_fails_on_the_whole_prediction():
    log = []
    verdicts, _ = judged("mathvista", [
        mc("The answer is B"),  # can_infer finds the one letter B: prefetch, no judge; B is "4": right
        mc("I pick (C)"),  # prefetch C, wrong, judge never asked
        mc("B or C [x1]"),  # two letters, and no option text inside: can_infer fails -> judge
        free("14", "14"),  # int("14") == 14: prefetch
        free("The area is \\boxed{14}. [x2]", "14"),  # int() of the whole text fails: judge (06 used to read it)
        free("0", "0"),  # int("0") == 0, but post_check returns 0, falsy: the judge is asked
        free("3.0", "3"),  # int("3.0") raises ValueError: judge
        free("1.50", "1.5", "float"),  # float("1.50") == 1.5: prefetch
        free("[1, 2] [x5]", "[1, 2]", "list"),  # lists: post_check compares str(None): always asked, never right
    ], {"[x1]": "C", "\\boxed{14}": "14", "Model response: 0": "0", "3.0": "3", "[x5]": "[1, 2]"}, log)
    assert verdicts == [(True, "prefetch"), (False, "prefetch"), (False, "judge"), (True, "prefetch"),
                        (True, "judge"), (True, "judge"), (True, "judge"), (True, "prefetch"), (False, "judge")]
    assert len(log) == 5  # the judge saw exactly the five rows VLMEvalKit sends it


@pytest.mark.parametrize("reply, right", [
    ("14", True), (" 14 ", True),  # int() reads surrounding space
    ("14 cm", False), ("1,4", False), ("$14", False), ("14.0", False), ("fourteen", False), ("", False),
])
def test_mathvista_integer_replies_are_read_by_int(reply, right):  # post_check: int(res) == int(answer)
    verdicts, _ = judged("mathvista", [free("it is fourteen", "14")], {"fourteen": reply})
    assert verdicts[0][0] is right


@pytest.mark.parametrize("reply, right", [
    ("3.5", True), ("3.50", True), ("3.5e0", True), ("$3.5", False), ("3.5 m", False), ("3,5", False),
    ("3.49", False),  # float(res) == float(answer), exactly: no rounding to the precision
])
def test_mathvista_float_replies_are_read_by_float(reply, right):
    verdicts, _ = judged("mathvista", [free("about three and a half", "3.5", "float")], {"three": reply})
    assert verdicts[0][0] is right


@pytest.mark.parametrize("reply, right", [
    ("B", True), ("(B) 4", True), ("The answer is B", True), ("4", True),  # can_infer: a letter, else option text
    ("B, C", False), ("C", False), ("", False), (None, False),  # two letters; wrong; empty; refused 5 times
])
def test_mathvista_choice_replies_are_read_by_can_infer(reply, right):
    verdicts, failed = judged("mathvista", [mc("hmm, hard to say")], {"hard": reply})
    assert verdicts[0][0] is right and failed == (reply is None)


# ----------------------------------------------------------------------------------------------------
# MathVision: mathv.py MATH_V_auxeval, post_check: can_infer for options, is_equal for free form


def test_mathvision_prefetch_and_replies():
    opts = {"question": "Q", "options": ["1", "2", "3"], "answer": "B"}
    form = {"question": "Q", "options": [], "answer": "1/2"}
    log = []
    verdicts, _ = judged("mathvision", [
        opts | {"response": "so B"},  # can_infer: B, prefetch, right
        opts | {"response": "A or C [ya]"},  # two letters: judge; reply "2" is option B's text: right
        form | {"response": "0.5"},  # is_equal("0.5", "1/2"): eval gives 0.5 both: prefetch
        form | {"response": "the ratio is \\boxed{0.5} [y2]"},  # is_equal on the whole text fails: judge
        form | {"response": "half [y3]"},  # judge replies "0.5 cm": is_equal fails
    ], {"[ya]": "2", "[y2]": "0.5", "[y3]": "0.5 cm"}, log)
    assert verdicts == [(True, "prefetch"), (True, "judge"), (True, "prefetch"), (True, "judge"), (False, "judge")]
    assert len(log) == 3


# ----------------------------------------------------------------------------------------------------
# LogicVista: logicvista.py LogicVista_auxeval: always asked; res.isupper() and res.isalpha() or another try;
# hit when the sorted letters equal the gold split on ", "


@pytest.mark.parametrize("gold, replies, right", [
    ("B, D", ["BD"], True), ("B, D", ["DB"], True), ("B", ["B"], True),
    ("B, D", ["B, D"] * 5, False),  # a comma and a space: not isalpha, five tries, then hit 0
    ("B", ["The answer is B"] * 4 + ["B"], True),  # tries 1-4 malformed, the fifth reads
    ("B", ["The answer is B"] * 5, False), ("B", ["b"] * 5, False),  # lower case is not isupper
    ("B,D", ["BD"], False),  # the gold split on ", " stays "b,d"
    ("3", ["C"], False), ("", ["Z"], False),  # a digit or an empty gold is never right
])
def test_logicvista_replies(gold, replies, right):
    verdicts, _ = judged("logicvista", [{"question": "which? [z]", "answer": gold, "id": "1",
                                         "response": "I think it is fine"}], {"[z]": replies})
    assert verdicts[0][0] is right


# ----------------------------------------------------------------------------------------------------
# MathVerse: mathverse.py: extraction always; post_check_score (the extraction equals the gold, stripped)
# else the grader, whose reply must be "0" or "1" (5 tries, then False)


@pytest.mark.parametrize("extract, grades, right, graded", [
    ("12 cm", ["0"], True, False),  # exact match: the grader is not asked
    ("12", ["1"], True, True), ("12", ["0"], False, True),
    ("12", ["Judgement: 1"] * 4 + ["1"], True, True),  # not "0"/"1": tried again
    ("12", ["yes"] * 5, False, True), ("", ["1"], True, True),  # a failed extraction is still graded
])
def test_mathverse_extraction_then_the_grader(extract, grades, right, graded):
    log = []
    verdicts, _ = judged("mathverse", [{"sample_index": 1, "question_type": "free-form", "answer": "12 cm",
                                        "question_for_eval": "how long?", "response": "x is 12 [v]"}],
                         {"Model_answer": grades, "[v]": extract}, log)
    assert verdicts[0][0] is right and len(log) == 1 + graded


@pytest.mark.parametrize("response, reply, right, asked", [
    ('{"short answer": "2.0004"}', None, True, False),  # the JSON reads: no judge
    ("no idea [d]", "2.0 cm", True, True),  # parse_answer: the first word as a float
    ("no idea [d]", "\\2.0", False, True),  # the reply as it is: float("\\2.0") fails (no backslash dropping)
    ("no idea [d]", "about 2", False, True),
])
def test_dynamath_the_judge_where_nothing_reads_and_its_reply_by_parse_answer(response, reply, right, asked):
    log = []  # dynamath.py DynaMath_auxeval
    verdicts, _ = judged("dynamath", [{"id": "1", "variant": 1, "question": "area?", "answer_type": "float",
                                       "ground_truth": "2.0", "response": response}], {"[d]": reply}, log)
    assert verdicts[0][0] is right and len(log) == asked


# ----------------------------------------------------------------------------------------------------
# Small rules: dynamath.py parse_answer does not strip; LogicVista's gold is split on ", "


def test_dynamath_short_answers_are_read_as_written():
    text = {"answer_type": "text", "ground_truth": "Sep"}
    for short, right in ((" Sep", False), ("Sep", True), ("sep", True)):  # " sep" is not inside "sep"
        answer = B.dynamath_extract(text, json.dumps({"solution": "...", "short answer": short}))
        assert B.dynamath_vlmevalkit(text, answer) is right
    choice = {"answer_type": "multiple choice", "ground_truth": "B"}  # one of A-E in " B": B
    assert B.dynamath_extract(choice, '{"short answer": " B"}') == "B"
    assert B.logicvista_vlmevalkit({"answer": "B,D"}, "BD") is False
    assert B.logicvista_vlmevalkit({"answer": "B, D"}, "B, D") is True  # the rules' own reading, no judge


# ----------------------------------------------------------------------------------------------------
# Asking: retries, storage, reuse


def scripted_judge(reply):
    """gen(requests, ...) -> reply(prompt, temperature): a text, or an Exception for a refused request."""
    calls = []

    def gen(requests, n=1, max_new_tokens=128, temperature=0.0, on_error="raise", **_):
        assert on_error == "return"
        calls.append((temperature, [r["prompt"] for r in requests]))
        outs = [reply(r["prompt"], temperature) for r in requests]
        return [out if isinstance(out, Exception) else [out] for out in outs]
    return gen, calls


def test_ask_keeps_replies_as_they_arrive_asks_identical_prompts_once_and_a_rerun_only_what_failed(tmp_path):
    path = str(tmp_path / "judge.jsonl")
    down = {"on": True}

    def reply(prompt, temperature):
        if prompt == "p3" and down["on"]:
            return RuntimeError("refused by the server: 400")
        return "B" if temperature == 0 or prompt != "p2" else "C"

    gen, calls = scripted_judge(reply)
    accept = str.isalpha
    got, failed = judge.ask(gen, "m", path, ["p1", "p2", "p1", "p3"], accept)
    assert got == {"p1": "B", "p2": "B"} and list(failed) == ["p3"]
    assert calls[0] == (0.0, ["p1", "p2", "p3"])  # p1 once; p3 retried at 0.5, 1.0, 1.5, 2.0
    assert [t for t, _ in calls] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert len(open(path).read().splitlines()) == 2  # the two replies; the refusal is not kept
    down["on"] = False
    got, failed = judge.ask(gen, "m", path, ["p1", "p2", "p3"], accept)
    assert got == {"p1": "B", "p2": "B", "p3": "B"} and not failed and calls[5] == (0.0, ["p3"])
    assert len(calls) == 6  # the rerun asked only p3
    got, _ = judge.ask(gen, "another-judge", path, ["p1"], accept)  # another judge model: asked anew
    assert len(calls) == 7


def test_ask_walks_the_tries_and_a_rerun_reuses_malformed_replies(tmp_path):
    path = str(tmp_path / "judge.jsonl")
    gen, calls = scripted_judge(lambda p, t: "B, D" if t < 1 else "BD")
    got, _ = judge.ask(gen, "m", path, ["q"], judge.logicvista_form)
    assert got == {"q": "BD"} and [t for t, _ in calls] == [0.0, 0.5, 1.0]
    got, _ = judge.ask(gen, "m", path, ["q"], judge.logicvista_form)
    assert got == {"q": "BD"} and len(calls) == 3


# ----------------------------------------------------------------------------------------------------
# VLMEvalKit's prompts, read from its source (a fake tree in the shape of the real files), never run

FAKE_VLMEVAL = {
    "dataset/utils/mathvista.py": '''
        from ...smp import *


        def get_gpt4_ICE():
            example_1 = """
        Q: one? A: 1
        """
            example_2 = """
        Q: two? A: {2}
        """
            return [example_1, example_2]


        def build_mathvista_gpt4_prompt(line):
            task_description = """Extract.\\n"""
            question = line['question']
            prediction = str(line['prediction'])
            prompt = task_description
            examples = get_gpt4_ICE()
            for example in examples:
                prompt += example + '\\n'
            prompt += question + '\\n'
            prompt += 'Model respone: ' + prediction
            prompt += 'Extracted answer:'
            return prompt
        ''',
    "dataset/utils/mathv.py": '''
        def build_mathv_gpt4_prompt(line):
            prompt = "MV " + line['question'] + " / " + str(line['prediction'])
            return prompt
        ''',
    "dataset/utils/mathverse.py": '''
        def get_gpt4_extract_ICE():
            example_1 = "E1"
            return [example_1]


        def build_mathverse_gpt4_extract_prompt(line):
            prediction = str(line['prediction'])
            demo_prompt = "Extract:"
            for example in get_gpt4_extract_ICE():
                demo_prompt += example + '\\n\\n'
            test_prompt = f"Model response: '{prediction}'\\nExtracted Answer: "
            full_prompt = f'{demo_prompt}7.\\n{test_prompt}'
            return full_prompt


        def build_mathverse_gpt4_score_prompt(line):
            test_prompt = f"""
            [Question]: {line['question_for_eval']}
            [Standard Answer]: {line['answer']}
            [Model_answer] : {line['extract']}
            Judgement:"""
            return test_prompt
        ''',
    "dataset/utils/logicvista.py": '''
        def build_prompt_logicvista(line):
            question = line['question']
            prediction = str(line['prediction'])
            tmpl = (
                "Letters only.\\n"
                'Question: <start>\\n{}\\n<end>\\nAnswer: <start>\\n{}\\n<end>\\nYour output: '
            )
            print(tmpl)
            return tmpl.format(question, prediction)
        ''',
    "dataset/utils/multiple_choice.py": '''
        def build_prompt_wemath(question, options, prediction):
            tmpl = 'Match. Question: {}\\nOptions: {}\\nAnswer: {}\\nYour output: '
            question = question.replace("FORMAT", '')
            return tmpl.format(question, options, prediction)
        ''',
}


def write_vlmeval(root, files=FAKE_VLMEVAL):
    for name, text in files.items():
        os.makedirs(os.path.dirname(root / "vlmeval" / name), exist_ok=True)
        (root / "vlmeval" / name).write_text(textwrap.dedent(text))
    return str(root)


def test_prompts_are_built_from_vlmevalkits_source_without_running_it(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMEVALKIT_DIR", write_vlmeval(tmp_path))
    build = judge_prompts.vlmevalkit_builders()
    fields = {"question": "How many? FORMAT", "prediction": "It is {3}", "answer": "3", "extract": "3",
              "question_for_eval": "How many?", "options": "A. 2 B. 3"}
    assert build["mathvista"](fields) == ("Extract.\n\nQ: one? A: 1\n\n\nQ: two? A: {2}\n\nHow many? FORMAT\n"
                                          "Model respone: It is {3}Extracted answer:")
    assert build["mathvision"](fields) == "MV How many? FORMAT / It is {3}"
    assert build["mathverse"](fields) == "Extract:E1\n\n7.\nModel response: 'It is {3}'\nExtracted Answer: "
    assert build["mathverse/grade"](fields) == ("\n    [Question]: How many?\n    [Standard Answer]: 3\n"
                                                "    [Model_answer] : 3\n    Judgement:")
    assert build["logicvista"](fields).endswith("<start>\nHow many? FORMAT\n<end>\nAnswer: <start>\nIt is {3}\n"
                                                "<end>\nYour output: ")
    assert build["wemath"](fields) == ("Match. Question: How many? \nOptions: A. 2 B. 3\nAnswer: It is {3}\n"
                                       "Your output: ")
    # anything but string building is refused, never run
    hostile = FAKE_VLMEVAL | {"dataset/utils/mathv.py": '''
        def build_mathv_gpt4_prompt(line):
            prompt = __import__("os").system("touch pwned")
            return prompt
        '''}
    monkeypatch.setenv("VLMEVALKIT_DIR", write_vlmeval(tmp_path / "h", hostile))
    with pytest.raises(judge_prompts.SourceError, match=r"mathv\.py build_mathv_gpt4_prompt"):
        judge_prompts.vlmevalkit_builders()  # checked when read, before any model runs
    assert not os.path.exists("pwned")
    monkeypatch.setenv("VLMEVALKIT_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="VLMEVALKIT_DIR=.*nowhere: no vlmeval/dataset/utils/mathvista.py"):
        judge_prompts.vlmevalkit_builders()


def test_offline_without_a_copy_the_projects_prompts(tmp_path, monkeypatch):
    monkeypatch.delenv("VLMEVALKIT_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert judge_prompts.vlmevalkit_builders() == {}


# ----------------------------------------------------------------------------------------------------
# Run folders: the judge's label per benchmark, the backend in the identity, one refused request


def write_two(root):
    os.makedirs(root)
    solid_image(56).save(root / "a.png")
    (root / "mathvista.jsonl").write_text("".join(json.dumps(
        {"pid": str(i), "query": f"[v{i}] how many?", "question": "q", "question_type": "free_form",
         "answer_type": "integer", "choices": None, "answer": "3", "image": "a.png"}) + "\n" for i in range(3)))
    (root / "logicvista.jsonl").write_text("".join(json.dumps(
        {"question": "[l] which?", "answer": "B", "image": "a.png"}) + "\n" for i in range(2)))
    return {"v0": "3", "v1": "the answer is \\boxed{3}", "v2": "3 objects", "l": "B"}


def scripted(responses, refuse=(), judge_reply="B"):
    calls = {"model": 0, "judge": []}

    def make_backend(name, model, **opts):
        def gen(requests, n=1, max_new_tokens=256, temperature=0.0, on_error="raise", **_):
            assert on_error == "return"
            if model == "gpt-4o-mini":
                calls["judge"] += [r["prompt"] for r in requests]
                return [["3" if "how many" in r["prompt"] else judge_reply] for r in requests]
            calls["model"] += len(requests)
            tags = [next(k for k in responses if f"[{k}]" in r["prompt"]) for r in requests]
            return [RuntimeError("openai backend: refused by server: 400") if t in refuse else [responses[t]]
                    for t in tags]
        return gen
    return make_backend, calls


def test_a_refused_request_is_one_bad_record_and_labels_stay_per_benchmark(tmp_path, monkeypatch, capsys):
    responses = write_two(tmp_path / "data")
    make_backend, calls = scripted(responses, refuse={"v2"})
    monkeypatch.setattr(backends, "make_backend", make_backend)
    monkeypatch.setenv("VLMEVALKIT_DIR", write_vlmeval(tmp_path / "vk"))
    argv = ["--model", "m", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--backend", "openai"]
    scores = E.main(argv + ["--bench", "mathvista"])
    b = scores["benchmarks"]["mathvista"]
    assert b["metrics"]["generation_failed"] == 1 and b["n"] == 3 and b["score"] == pytest.approx(200 / 3)
    assert "mathvista/2: openai backend: refused" in capsys.readouterr().out
    assert len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()) == 2  # the others kept
    # the server takes it now: only the refused one is asked again; LogicVista is judged, MathVista keeps its label
    make_backend, calls = scripted(responses)
    monkeypatch.setattr(backends, "make_backend", make_backend)
    scores = E.main(argv + ["--bench", "mathvista"])
    assert calls["model"] == 1 and scores["benchmarks"]["mathvista"]["metrics"]["generation_failed"] == 0
    scores = E.main(argv + ["--bench", "logicvista", "--judge-backend", "openai"])
    assert calls["judge"] == ["Letters only.\nQuestion: <start>\n[l] which?\n<end>\nAnswer: <start>\nB\n<end>\n"
                              "Your output: "]  # the two identical prompts, asked once, VLMEvalKit's builder
    labels = {name: b["judge"] for name, b in scores["benchmarks"].items()}
    assert labels["mathvista"].startswith("none") and "VLMEvalKit d9fe347b's prompts" in labels["logicvista"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "judge none (our rules stand in" in report and "(MathVista)" in report and "(LogicVista)" in report
    with pytest.raises(SystemExit, match="backend"):  # another backend: refused, nothing reused
        E.main(argv[:-1] + ["hf", "--bench", "mathvista"])


def test_openai_one_refused_request_is_one_bad_record_for_the_model_and_the_judge(tmp_path, monkeypatch, serve):
    """A real HTTP server (tests/fake_openai.py) refuses one question with a 400, then one judge prompt."""
    responses = write_two(tmp_path / "data")

    def text(payload):
        content = payload["messages"][-1]["content"]
        return content if isinstance(content, str) else " ".join(c.get("text", "") for c in content)

    refused = {"[v2]"}
    server = serve(reply=lambda p: "B" if "Your output" in text(p) else next(
                       v for k, v in responses.items() if f"[{k}]" in text(p)),
                   rule=lambda p: 400 if any(tag in text(p) for tag in refused) else None)
    monkeypatch.setenv("VLMEVALKIT_DIR", write_vlmeval(tmp_path / "vk"))
    argv = ["--model", "m", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--backend",
            "openai", "--base-url", server.url, "--bench", "mathvista,logicvista", "--judge-backend", "openai",
            "--judge-base-url", server.url]
    scores = E.main(argv)
    assert scores["benchmarks"]["mathvista"]["metrics"]["generation_failed"] == 1
    assert len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()) == 4  # the other four kept
    assert scores["benchmarks"]["logicvista"]["score"] == 100.0
    refused.clear()
    refused.add("<start>\n[l] which?")  # now the judge's prompt is refused, the model's question is not
    (tmp_path / "run" / "judge.jsonl").unlink()
    scores = E.main(argv)
    assert scores["benchmarks"]["mathvista"]["metrics"]["generation_failed"] == 0
    b = scores["benchmarks"]["logicvista"]
    assert b["metrics"]["judge_failed"] == 2 and b["score"] == 0.0  # one prompt, two rows: both counted


def test_without_a_local_copy_the_source_is_downloaded_once_and_cached(tmp_path, monkeypatch):
    import functools
    import http.server
    import threading

    write_vlmeval(tmp_path / "site" / judge_prompts.VLMEVALKIT_COMMIT)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    served = []
    monkeypatch.setattr(http.server.SimpleHTTPRequestHandler, "log_message",
                        lambda self, fmt, *args: served.append(self.path))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(judge_prompts, "VLMEVALKIT_URL",
                            f"http://127.0.0.1:{server.server_address[1]}/{{commit}}/vlmeval/{{file}}")
        monkeypatch.delenv("VLMEVALKIT_DIR", raising=False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        first = judge_prompts.vlmevalkit_builders()
        assert first["mathvision"]({"question": "Q", "prediction": "P"}) == "MV Q / P"
        assert len(served) == len(set(f for f, _ in judge_prompts.VLMEVALKIT_BUILDERS.values())) == 5
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline now: the cached copy serves
        assert sorted(judge_prompts.vlmevalkit_builders()) == sorted(first) and len(served) == 5
    finally:
        server.shutdown()


def test_published_rows_take_vlmevalkits_path_to_its_verdict(monkeypatch):
    """Rows of published outputs (tests/fixtures/eval/judge_path.jsonl, each naming its file and id): the raw
    response is the prediction, the published extraction the judge's reply. `vlmevalkit` and `vlmevalkit_asks`
    come from VLMEvalKit d9fe347b's MathVista_auxeval / MATH_V_auxeval and post_check run on the same row
    (outside this repository); docs/eval.md has the counts over whole files."""
    cases = [json.loads(line) for line in open(os.path.join(os.path.dirname(__file__), "fixtures", "eval",
                                                            "judge_path.jsonl"))]
    monkeypatch.setattr(judge, "build", lambda name, row, prediction, builders: row["qid"])
    for name in ("mathvista", "mathvision"):
        mine = [c for c in cases if c["bench"] == name]
        recs = [dict(c["record"], qid=f"{name}/{i}") for i, c in enumerate(mine)]
        replies = {r["qid"]: c["reply"] for r, c in zip(recs, mine)}
        responses = {r["qid"]: c["response"] for r, c in zip(recs, mine)}
        asked = []

        def asker(prompts, accept):
            asked.extend(prompts)
            return {p: replies[p] for p in prompts}, {}
        rows, _ = E.score_benchmark(name, E.BENCHMARKS[name], recs, responses, asker, {}, exact=True)
        assert [r["correct"] for r in rows] == [c["vlmevalkit"] for c in mine], name
        assert [r["qid"] in asked for r in rows] == [c["vlmevalkit_asks"] for c in mine], name
        assert len(mine) >= 14 and {True, False} <= {c["vlmevalkit_asks"] for c in mine}
