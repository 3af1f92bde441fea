"""The LLM judge of 06_eval.py: when it is asked, what it is asked, how its reply is read, how replies are kept.

Under --rules vlmevalkit the judge is asked exactly where VLMEvalKit d9fe347b asks it, with its prompts (read
from its source by vlaa/judge_prompts.py; the project's own when no copy can be had) and its retries, and each
reply is read as its code reads it (vlmeval/dataset/utils/{mathvista,mathv,mathverse,logicvista}.py):

    MathVista   prefetch post_check(prefetch=True) on the whole prediction: a letter can_infer finds, or int()/
                float() of the whole text equal to the gold (a value 0 is falsy there: asked); the reply read
                by can_infer / int() / float() ("14 cm", "1,234", "$3.5" are wrong)
    MathVision  prefetch can_infer (options) / is_equal (free form) on the whole prediction; the reply the same
    MathVerse   always: extraction, then exact match, else the grader, whose reply must be "0" or "1"
    LogicVista  always; a reply of capital letters only ("BD"; "B, D" is retried), the gold split on ", "
    DynaMath, WeMath  as under the rules: the judge only where the rules read nothing

A try that fails (the server refused the request, or the reply is not in the form asked) is tried again, up to
5 tries at temperature 0, 0.5, 1.0, ... (VLMEvalKit's *_auxeval); after the 5th the row has no answer and
counts as wrong, as there. Other rule sets, toy and jsonl ask where the rules find nothing (06's Benchmark.judge).

RUN_DIR/judge.jsonl keeps every reply as it arrives ({"id": hash of judge model and prompt, "try", "reply"}):
a rerun asks only what this judge has not answered; identical prompts are asked once. A request that fails
for good is not kept, so a rerun asks it again; until then it is a counted bad record (`judge_failed`).
"""

import hashlib
import os

from vlaa import benchmarks as B
from vlaa import jsonl, judge_prompts
from vlaa.parsing import can_infer

TRIES = 5  # VLMEvalKit *_auxeval: `retry = 5`, temperature i * 0.5
CHUNK = 64  # prompts per judge call: replies reach judge.jsonl a chunk at a time
MAX_TOKENS = 128


def prompt_id(model, prompt):
    return hashlib.sha256(f"{model}\n{prompt}".encode()).hexdigest()[:16]


def ask(judge, model, path, prompts, accept=None):
    """prompts (repeats allowed) -> ({prompt: the first reply `accept` takes}, {prompt: why it has none}).
    Replies already in `path` are used first; the rest are asked, each reply appended as its chunk returns."""
    accept = accept or (lambda reply: True)
    stored = {}
    if os.path.exists(path):
        for r in jsonl.read_output(path)[0]:
            stored.setdefault((r["id"], r.get("try", 0)), r["reply"])
    ids = {p: prompt_id(model, p) for p in prompts}
    replies, why = {}, {}
    for p in ids:  # a reply kept by an earlier run, at any try
        good = [stored[(ids[p], t)] for t in range(TRIES) if (ids[p], t) in stored and accept(stored[(ids[p], t)])]
        if good:
            replies[p] = good[0]
    for t in range(TRIES):
        todo = [p for p in ids if p not in replies and (ids[p], t) not in stored]
        for s in range(0, len(todo), CHUNK):
            chunk = todo[s:s + CHUNK]
            outs = judge([{"prompt": p, "image": None, "system": None} for p in chunk], n=1, max_new_tokens=MAX_TOKENS,
                         temperature=0.5 * t, on_error="return")
            with jsonl.open_output(path)[1] as f:
                for p, out in zip(chunk, outs):
                    if isinstance(out, Exception):
                        why[p] = str(out)
                        continue
                    stored[(ids[p], t)] = out[0].strip()  # VLMEvalKit's OpenAI wrapper strips the content
                    jsonl.append_jsonl(f, {"id": ids[p], "try": t, "reply": stored[(ids[p], t)]})
        for p in ids:
            reply = stored.get((ids[p], t))
            if p not in replies and reply is not None:
                if accept(reply):
                    replies[p] = reply
                    why.pop(p, None)
                else:
                    why[p] = f"reply not in the form asked: {reply[:80]!r}"
    return replies, {p: w for p, w in why.items() if p not in replies}


# ----------------------------------------------------------------------------------------------------
# VLMEvalKit's post_check of each benchmark: prefetch=True -> the answer it settles on without the judge (or
# None: ask); prefetch=False -> the verdict on `res` (the prefetched answer, or the judge's reply)


def vlmevalkit_number(kind, text):
    """int(text) / float(text) as Python reads the whole text (" 14 " and "1_000" pass; "14 cm", "1,234",
    "$3.5", and "3.0" for an integer do not); None where post_check's ValueError leaves it unread."""
    try:
        return int(str(text)) if kind == "integer" else float(str(text))
    except ValueError:
        return None


def mathvista_post_check(rec, res, prefetch):
    if rec["question_type"] == "multi_choice":
        choices = [str(c) for c in rec["choices"]]
        letter = can_infer(res, B.lettered(choices))
        if prefetch:
            return letter or None
        return letter == (chr(65 + choices.index(str(rec["answer"]))) if str(rec["answer"]) in choices else None)
    same, value = False, None
    if rec["answer_type"] in ("integer", "float"):  # lists: post_check compares str(None) with the gold
        value = vlmevalkit_number(rec["answer_type"], res)
        same = value is not None and value == vlmevalkit_number(rec["answer_type"], rec["answer"])
    if prefetch:
        return value if same and value else None  # `if post_check(...)`: a right 0 is falsy, the judge is asked
    return same


def mathvision_post_check(rec, res, prefetch):
    if rec.get("options"):
        letter = can_infer(res, B.lettered(rec["options"]))
        return (letter or None) if prefetch else B.vlmevalkit_equal(letter, rec["answer"])
    same = B.vlmevalkit_equal(str(res), rec["answer"])
    return (str(res) if same and str(res) else None) if prefetch else same


def logicvista_form(reply):  # LogicVista_auxeval: a reply that is not all capital letters is tried again
    return reply.isupper() and reply.isalpha()


def logicvista_hit(rec, reply):
    """A reply in the form asked, its sorted letters equal to the gold's split on ", " ("B, D" -> "bd")."""
    return bool(reply) and logicvista_form(reply) and B.logicvista_vlmevalkit(rec, reply)


def mathverse_grade_form(reply):
    return reply.strip() in ("0", "1")


POST_CHECK = {"mathvista": mathvista_post_check, "mathvision": mathvision_post_check}


# ----------------------------------------------------------------------------------------------------
# Asking for a benchmark's rows


def prompt_fields(row, prediction):
    """What the prompt builders read: VLMEvalKit's line['question'], ['prediction'], ['answer'] ...; MathVista's
    question is the official `query` (hint, question, choices), MathVerse's `question_for_eval`."""
    question = row.get("question_for_eval") or row.get("query") or row.get("question", "")
    options = " ".join(f"{k}. {v}" for k, v in B.wemath_options(row.get("option", "")).items())
    return {"question": question, "prediction": str(prediction), "answer": str(row.get("answer", "")),
            "options": options, "extract": str(row.get("extract", ""))}


def build(name, row, prediction, builders):
    """The judge prompt: VLMEvalKit's builder when its source was read (`builders`), else the project's."""
    if name in builders:
        return builders[name](prompt_fields(row, prediction))
    template = judge_prompts.MATHVERSE_GRADE if name == "mathverse/grade" else judge_prompts.JUDGE_PROMPTS[name]
    return judge_prompts.judge_prompt(template, row, row.get("extract") if name == "mathverse/grade" else prediction)


def judge_rows(name, bench, rows, asker, builders, exact):
    """Judge a benchmark's scored rows in place. asker(prompts, accept) -> (replies, failures), as `ask`.
    exact: VLMEvalKit's policy and reading (--rules vlmevalkit); else the judge only where the rules found
    nothing (bench.judge), its reply read by the rules. -> the number of rows left without a reply."""
    rows = [r for r in rows if r["response"] is not None]  # a refused generation: a bad record, nothing to judge

    def settle(r, reply, fallback=None):
        r["extracted"], r["extracted_by"] = (reply, "judge") if reply not in (None, "") else (fallback, None)

    if exact and name in POST_CHECK:
        prompts = {}
        for r in rows:
            res = POST_CHECK[name](r, r["prediction"], prefetch=True)
            r["extracted"], r["extracted_by"] = (res, "prefetch") if res is not None else (None, None)
            if res is None:
                prompts[r["qid"]] = build(name, r, r["prediction"], builders)
        replies, failed = asker(list(prompts.values()), None)
        for r in rows:  # VLMEvalKit's verdict: post_check on the prefetched answer or the reply ("" when none)
            if r["qid"] in prompts:
                settle(r, replies.get(prompts[r["qid"]]))
            r["correct"] = bool(POST_CHECK[name](r, "" if r["extracted"] is None else r["extracted"], prefetch=False))
        return sum(p in failed for p in prompts.values())
    if exact and name == "logicvista":
        prompts = {r["qid"]: build(name, r, r["prediction"], builders) for r in rows}
        replies, failed = asker(list(prompts.values()), logicvista_form)
        for r in rows:
            settle(r, replies.get(prompts[r["qid"]]))
            r["correct"] = logicvista_hit(r, replies.get(prompts[r["qid"]]))
        return sum(p in failed for p in prompts.values())
    asked = [r for r in rows if bench.judge == "always" or (bench.judge != "never" and r["extracted"] is None)]
    if exact and name == "mathverse":
        asked = rows
    prompts = {r["qid"]: build(name, r, r["prediction"], builders) for r in asked}
    replies, failed = asker(list(prompts.values()), None)
    for r in asked:
        reply = replies.get(prompts[r["qid"]])
        answer = bench.extract(r, reply) if reply else None
        if exact and name == "dynamath" and reply:  # dynamath.py parse_answer(reply): the reply as it is, no JSON
            answer = B.dynamath_parse(reply, r["answer_type"])
        elif exact and name == "mathverse":  # the extraction as the judge wrote it; "" when it failed
            answer = reply or ""
        elif answer is None and reply and reply.lower() not in ("null", "none"):
            answer = reply
        settle(r, answer)
        r["correct"] = bool(bench.is_correct(r, answer))
    n_failed = sum(prompts[r["qid"]] in failed for r in asked)
    if bench.grade is not None:  # MathVerse's second stage: the judge grades what exact match did not accept
        graded = [r for r in rows if not r["correct"] and (exact or r["extracted"] is not None)]
        grade = {r["qid"]: build("mathverse/grade", r | {"extract": r["extracted"] or ""}, None, builders)
                 for r in graded}
        replies, failed = asker(list(grade.values()), mathverse_grade_form if exact else None)
        for r in graded:
            r["correct"] = (replies.get(grade[r["qid"]]) or "").strip() == "1"
        n_failed += sum(grade[r["qid"]] in failed for r in graded)
    return n_failed
