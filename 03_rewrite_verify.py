"""Stage 03: rewrite, verify and split the distilled answers into the SFT and RL sets.

paper (§2 steps #4-#6, App. A.2):
  #4 rewrite: a minimal edit turns mentions of the caption/description/rationale into mentions of
     the image (an LLM through any backend, or our rule-based rewriter when no model is given);
     a sample whose word count changes by more than 15 is dropped;
  #5 verify: is the teacher's answer the ground truth? Rule-based checks of rewards.py where the
     verifier type allows (digit, mcq, math, iou with IoU >= 0.5), else (open) an LLM Yes/No judge;
  #6 split: responses with an "aha" word (wait, hmm, double-check, ...) go to RL, the others to SFT.

    toy.py make-data  ->  01_caption  ->  02_distill  ->  [03_rewrite_verify]  ->  04_sft / 05_grpo

Run it at three sizes:

    # CPU, rule-based rewriter, toy judge for the open questions
    python 03_rewrite_verify.py --in runs/data/distilled.jsonl --out runs/data/final --judge-model judge
    # one GPU node: an instruct LLM in vLLM rewrites and judges
    python 03_rewrite_verify.py --in data/distilled.jsonl --out data/final --backend vllm \\
        --rewriter-model Qwen/Qwen2.5-72B-Instruct --judge-model Qwen/Qwen2.5-72B-Instruct --tensor-parallel-size 8
    # a hosted GPT (the paper used GPT-3.5-turbo), or `vllm serve` on several nodes
    python 03_rewrite_verify.py --in data/distilled.jsonl --out data/final --backend openai \\
        --rewriter-model gpt-4o-mini --judge-model gpt-4o-mini --concurrency 32

Input: records with `id`, `question`, `answer`, `reasoning` (and `verifier_type`, `source`).
Output folder: all.jsonl (every record plus `response`, `verified`, `aha`, `drop_reason` or null),
sft.jsonl (kept, no aha), rl.jsonl (kept, aha), summary.json (counts per source, verifier type and
drop reason). all.jsonl is appended as it goes, so re-running resumes; the rest is rebuilt from it.
A record without `verifier_type` is judged like an `open` one.
"""

import argparse
import collections
import os
import re

import rewards
from vlaa import flags
from vlaa.datastage import add_generation_args, backend_from_args, check_stage_inputs, run_stage, sampling_from_args
from vlaa.jsonl import read_output, write_json, write_jsonl
from vlaa.locks import hold
from vlaa.records import AHA_WORDS, has_aha, normalize_verifier

# Our own wording of the paper's minimal-edit rewrite prompt (App. Fig. 10); the text comes last.
REWRITE_PROMPT = """Rewrite the text below with as few changes as possible. Wherever it refers to a caption, \
a description or a rationale (for example "the caption says" or "according to the description"), refer to \
the image instead ("the image shows", "according to the image"). Change nothing else: keep every other word, \
the line breaks, the punctuation and tags such as <think> exactly as they are. Output only the rewritten text.

Text:
{text}"""

# Our own wording of the paper's verification prompt (App. Fig. 11): only Yes or No.
JUDGE_PROMPT = """You are a fair grader. Does the answer agree with the ground truth, that is, give the same \
final result even if it is worded, formatted or rounded differently? Reply with one word: Yes or No.

Ground truth: {gold}
Answer: {pred}"""

DROP_REASONS = ("no_answer", "word_change", "no_judge", "wrong")  # in the order they are checked


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="inp", required=True, help="input JSONL from 02_distill.py")
    p.add_argument("--out", required=True, help="output folder: all.jsonl, sft.jsonl, rl.jsonl, summary.json")
    p.add_argument("--rewriter-model", default=None,
                   help="LLM for the rewrite, through --backend (default: none, the rule-based rewriter)")
    p.add_argument("--judge-model", default=None,
                   help="LLM Yes/No judge for `open` answers, through --backend (default: none: open samples "
                        "are dropped as no_judge and counted)")
    p.add_argument("--max-word-change", type=flags.nonneg_int, default=15,
                   help="paper: drop a sample whose word count changes by more than this (default: %(default)s)")
    p.add_argument("--aha-words", default=",".join(AHA_WORDS),
                   help="comma list of aha keywords, substrings of the lower-cased response (default: the paper's)")
    p.add_argument("--judge-max-new-tokens", type=flags.positive_int, default=16,
                   help="the judge's reply (default: %(default)s)")
    add_generation_args(p, batch_size=64, max_new_tokens=8192, temperature=0.0)
    return flags.parse(p, argv, flags.check_generation)


# ----------------------------------------------------------------------------------------------------
# Parsing the teacher's output


# "Answer: B", "**Final Answer:** B", "so the answer is 3."
_ANSWER_LINE = re.compile(r"(?:^[\W_]*|\bthe\s+)(?:final\s+|correct\s+)?answer\b\s*(?:is\b|[:：])(.*)$", re.IGNORECASE)


def _clean(answer):
    return answer.strip(" *:$").rstrip(".").strip(" *$")


def short_answer(text):
    """The final answer in what follows the thinking: an <answer> block, the last \\boxed{}, a line that
    announces the answer ("Answer: ...", "The answer is ..."), else the last line."""
    text = rewards.extract_answer(text) or text.strip()
    boxed = rewards.last_boxed(text)
    if boxed is not None:
        return _clean(boxed)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for m in filter(None, map(_ANSWER_LINE.search, reversed(lines))):
        if _clean(m[1]):
            return _clean(m[1])
    return _clean(lines[-1]) if lines else ""


def split_reasoning(text):
    """R1 output -> (thinking, final answer). `<think>X</think> Y` gives X and the answer in Y; an
    R1-distill served with its template starts inside the thinking (no opening tag); an unclosed
    <think> was cut off by max_new_tokens (no answer); without tags the whole text is the thinking
    and its last line the answer."""
    text = (text or "").strip()
    if "</think>" in text:
        think, _, after = text.rpartition("</think>")
        return re.sub(r"^\s*<think>", "", think).strip(), short_answer(after)
    if "<think>" in text:
        return text.replace("<think>", "", 1).strip(), ""
    return text, short_answer(text.splitlines()[-1]) if text else ""


# ----------------------------------------------------------------------------------------------------
# Step 4: rewrite, and the 15-word filter

# the rule-based minimal edit (no --rewriter-model): "the caption says" -> "the image shows", ...
_SOURCE = r"(?:given |provided |above )?(?:caption|description|rationale)"
REWRITE_RULES = [(re.compile(pattern, re.IGNORECASE), replacement) for pattern, replacement in (
    (rf"\b(the|this|that) {_SOURCE}(?:'s)? (?:says|states|mentions|notes|indicates|describes|reads|shows)\b",
     r"\1 image shows"),
    (rf"\b{_SOURCE}s\b", "images"),
    (rf"\b{_SOURCE}\b", "image"),
)]


def _same_case(original, new):
    if original.isupper() and len(original) > 1:
        return new.upper()
    return new[:1].upper() + new[1:] if original[:1].isupper() else new


def rule_rewrite(text):
    for pattern, replacement in REWRITE_RULES:
        text = pattern.sub(lambda m, r=replacement: _same_case(m[0], m.expand(r)), text)
    return text


def llm_rewrite(texts, rewriter, args):
    """The rewritten texts, or for a request the backend could not do, its Exception."""
    requests = [{"prompt": REWRITE_PROMPT.format(text=t), "image": None, "system": None} for t in texts]
    outs = rewriter(requests, n=1, on_error="return", **sampling_from_args(args)) if texts else []
    return [out if isinstance(out, Exception) else out[0].strip() for out in outs]


def word_change(old, new):
    """paper: the "sentence length gap", in words, between the raw and the rewritten text."""
    return abs(len(old.split()) - len(new.split()))


# ----------------------------------------------------------------------------------------------------
# Step 5: verify


def default_open(rec, where):
    """A record without a verifier_type is judged like an `open` one. (Typed records had their gold answer
    checked against their verifier when the input was read: a gold it could never match stops the stage.)"""
    rec["verifier_type"] = normalize_verifier(rec.get("verifier_type") or "open", f"{where}: field 'verifier_type'")
    return rec


def llm_judge(pairs, judge, args):
    """paper step #5: Yes or No for each (record, answer), or the Exception of a failed request; a reasoning
    judge may think first."""
    one_line = lambda s: " ".join(str(s).split())  # one line each: the judge reads them by their labels
    requests = [{"prompt": JUDGE_PROMPT.format(gold=one_line(r["answer"]), pred=one_line(a)), "image": None,
                 "system": None} for r, a in pairs]
    replies = judge(requests, n=1, max_new_tokens=args.judge_max_new_tokens, temperature=0.0, seed=args.seed,
                    on_error="return")
    return [reply if isinstance(reply, Exception) else
            re.findall(r"[a-z]+", reply[0].rpartition("</think>")[2].lower())[:1] == ["yes"] for reply in replies]


# ----------------------------------------------------------------------------------------------------
# One batch: rewrite, filter, verify, mark aha


def rewrite_verify_batch(records, args, rewriter, judge, aha_words):
    """Steps 4 and 5 for a batch: rewrite (one call), drop lost answers and big rewrites, verify (rules,
    then one judge call for the `open` ones), mark aha. A record whose rewrite or judge request failed is
    that Exception in the output (run_stage reports or counts it)."""
    raw = [r["reasoning"] for r in records]
    todo = [i for i, t in enumerate(raw) if split_reasoning(t)[1]]  # no answer: not worth a rewrite
    new, has_answer = list(raw), set(todo)
    if rewriter is None:
        new = [rule_rewrite(t) for t in raw]
    for i, text in zip(todo, llm_rewrite([raw[i] for i in todo], rewriter, args) if rewriter else []):
        new[i] = text
    out, asks = [], []
    for i, (rec, old, text) in enumerate(zip(records, raw, new)):
        if isinstance(text, Exception):
            out.append(text)
            continue
        think, answer = split_reasoning(text)
        response = f"<think>{think}</think> <answer>{answer}</answer>" if i in has_answer and answer else None
        drop = "no_answer" if response is None else \
            "word_change" if word_change(old, text) > args.max_word_change else None
        verified = None
        if drop is None and rec["verifier_type"] != "open":  # digit, mcq, math: 1; iou: IoU >= 0.5
            verified = rewards.is_correct(rewards.mixed_reward(response, rec))
        elif drop is None and judge is None:
            drop = "no_judge"  # open answers need the judge: never a silent pass or fail
        elif drop is None:
            asks.append((len(out), answer))
        out.append(dict(rec, response=response, verified=verified, drop_reason=drop,
                        aha=has_aha(response, aha_words) if response else None))
    if asks:
        for (i, _), yes in zip(asks, llm_judge([(out[i], a) for i, a in asks], judge, args)):
            out[i] = yes if isinstance(yes, Exception) else dict(out[i], verified=yes)
    for r in out:
        if not isinstance(r, Exception) and r["drop_reason"] is None and not r["verified"]:
            r["drop_reason"] = "wrong"
    return out


# ----------------------------------------------------------------------------------------------------
# Step 6: split, and the summary


def counts(rows):
    c = {"total": len(rows), "kept": 0, "sft": 0, "rl": 0, "dropped": dict.fromkeys(DROP_REASONS, 0)}
    for r in rows:
        if r["drop_reason"] is None:
            c["kept"] += 1
            c["rl" if r["aha"] else "sft"] += 1
        else:
            c["dropped"][r["drop_reason"]] = c["dropped"].get(r["drop_reason"], 0) + 1
    return c


def split_and_summarize(out_dir, aha_words, bad_skipped=0):
    """Rebuild sft.jsonl, rl.jsonl and summary.json from all.jsonl (which may span several resumed runs; a
    damaged line in it is left out here and counted, its record was redone)."""
    records, damaged = read_output(os.path.join(out_dir, "all.jsonl"))
    kept = [r for r in records if r["drop_reason"] is None]
    write_jsonl(os.path.join(out_dir, "sft.jsonl"), [r for r in kept if not r["aha"]])
    write_jsonl(os.path.join(out_dir, "rl.jsonl"), [r for r in kept if r["aha"]])
    summary = counts(records)
    for key in ("source", "verifier_type"):
        groups = collections.defaultdict(list)
        for r in records:
            groups[str(r.get(key) or "?")].append(r)
        summary[f"by_{key}"] = {k: counts(v) for k, v in sorted(groups.items())}
    summary |= {"aha_words": list(aha_words), "bad_records_skipped": bad_skipped, "damaged_lines": len(damaged)}
    write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


def print_summary(summary):
    reasons = list(summary["dropped"])
    print(f"{'':24}{'total':>7}{'kept':>7}{'sft':>7}{'rl':>7}" + "".join(f"{r:>12}" for r in reasons))
    rows = [("all", summary), *summary["by_source"].items()]
    rows += [(f"type={k}", v) for k, v in summary["by_verifier_type"].items()]
    for name, c in rows:
        print(f"{name[:23]:24}{c['total']:>7}{c['kept']:>7}{c['sft']:>7}{c['rl']:>7}"
              + "".join(f"{c['dropped'].get(r, 0):>12}" for r in reasons))


def main(argv=None):
    args = parse_args(argv)
    check_stage_inputs(args, "rewriter_model", "judge_model")
    hold(os.path.join(args.out, ".lock"), what=args.out)  # one writer per output folder, before any model loads
    aha_words = tuple(w.strip().lower() for w in args.aha_words.split(",") if w.strip())
    rewriter = backend_from_args(args, args.rewriter_model) if args.rewriter_model else None
    judge = None
    if args.judge_model:  # one engine when the same model rewrites and judges
        judge = rewriter if args.judge_model == args.rewriter_model else backend_from_args(args, args.judge_model)
    stats = run_stage(args.inp, os.path.join(args.out, "all.jsonl"), need=("id", "question", "answer", "reasoning"),
                      batch_size=args.batch_size, limit=args.limit, skip_bad=args.skip_bad, desc="rewrite+verify",
                      prepare=default_open,
                      process=lambda recs: rewrite_verify_batch(recs, args, rewriter, judge, aha_words))
    summary = split_and_summarize(args.out, aha_words, len(stats["bad"]))
    print_summary(summary)
    print(f"03_rewrite_verify: {summary['sft']} sft + {summary['rl']} rl of {summary['total']} -> {args.out}")
    return summary


if __name__ == "__main__":
    flags.cli(main)
