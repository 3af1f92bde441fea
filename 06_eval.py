"""Stage 06: answer the six visual-math benchmarks of the paper's Table 4, score each, print a table.

The last stage: a model folder from 04_sft.py / 05_grpo.py (or a Qwen2.5-VL hub id) answers MathVista (testmini),
MathVision (test), MathVerse (testmini, Vision Only), DynaMath (501 seeds x 10 variants, worst case), WeMath
(testmini, Score (Strict)) and LogicVista (test); `toy` and `jsonl` score our own record files with rewards.py.
Comparable with the paper's numbers (docs/eval.md: the details, and measurements on published model outputs):
- --rules vlmevalkit (default): VLMEvalKit's answer rules of April 2025, which made the leaderboard Table 4
  reports; --rules official: each benchmark's own repository's.
- --preset paper (default): greedy, 800 new tokens, max_pixels 256*32*32, as the paper states; --preset
  vlmevalkit: VLMEvalKit's VLAA-Thinker config (2048 tokens, pixels 1280*28*28 to 16384*28*28); --preset
  inference: the authors' inference.py (1000 tokens, the processor's default pixels).
- a judge: VLMEvalKit's gpt-4o-mini extracted answers (and graded MathVerse's); under --rules vlmevalkit it is
  asked where VLMEvalKit asks it, with its prompts (vlaa/judge.py). The paper's table is --rules vlmevalkit
  --preset paper --judge-backend openai --judge-model gpt-4o-mini; without a judge, our rules stand in for it.

    # CPU, about a minute: the tiny random model on a toy test set (made in RUN_DIR without --data-dir)
    python toy.py build-model runs/tiny && python 06_eval.py --model runs/tiny --bench toy
    # 1 GPU, the six from the hub: the base model as the leaderboard ran it (no system prompt), then ours
    python 06_eval.py --model Qwen/Qwen2.5-VL-3B-Instruct --no-system-prompt --backend vllm --bench six \\
        --judge-backend openai --judge-model gpt-4o-mini --judge-api-key-env OPENAI_API_KEY
    python 06_eval.py --model runs/grpo-3b/model --backend vllm --bench six ...
    # 8 GPUs: one OpenAI-compatible server per node (data parallel), many requests in flight
    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --data-parallel-size 8 --mm-processor-kwargs '{"max_pixels": 262144}'
    python 06_eval.py --model Qwen/Qwen2.5-VL-7B-Instruct --backend openai --base-url http://localhost:8000/v1 ...
    python 06_eval.py report runs/eval/A runs/eval/B  # runs side by side, with the paper's rows

RUN_DIR (default runs/eval/<model>): run.json (what determines the results: model fingerprint, data, rules, flags;
the same command resumes, another is refused), predictions.jsonl, judge.jsonl, scored-<bench>.jsonl, scores.json,
report.md.
"""

import argparse
import functools
import hashlib
import importlib.util
import os
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from operator import itemgetter
from typing import NamedTuple

import torch

import rewards
from vlaa import backends, flags, jsonl, judge, judge_prompts, locks, qwen, records, runs
from vlaa import benchmarks as B
from vlaa.openai_client import api_key_for

SIX = ("mathvista", "mathvision", "mathverse", "dynamath", "wemath", "logicvista")
TITLES = {"mathvista": "MathVista", "mathvision": "MathVision", "mathverse": "MathVerse", "dynamath": "DynaMath",
          "wemath": "WeMath", "logicvista": "LogicVista", "toy": "Toy", "jsonl": "JSONL"}
PAPER = {  # the paper's Table 4 (the leaderboard of 2025-04-07): the six, then Avg
    "Qwen2.5-VL-3B (paper)": (61.2, 21.9, 31.2, 13.2, 22.9, 40.3, 31.8),
    "VLAA-Thinker-Qwen2.5VL-3B (paper)": (61.0, 24.4, 36.4, 18.2, 33.8, 38.5, 35.4),
    "Qwen2.5-VL-7B (paper)": (68.1, 25.4, 41.1, 21.8, 36.2, 47.9, 40.1),
    "VLAA-Thinker-Qwen2.5VL-7B (paper)": (68.0, 26.4, 48.2, 22.4, 41.5, 48.5, 42.5),
}
PRESETS = {  # decoding is greedy in both: VLMEvalKit's temperature 0.01 with top_k 1 is greedy
    "paper": {"max_new_tokens": 800, "min_pixels": None, "max_pixels": qwen.MAX_PIXELS},
    "vlmevalkit": {"max_new_tokens": 2048, "min_pixels": 1280 * 28 * 28, "max_pixels": 16384 * 28 * 28},
    "inference": {"max_new_tokens": 1000, "min_pixels": 4 * 28 * 28, "max_pixels": 16384 * 28 * 28},  # inference.py
}

# ----------------------------------------------------------------------------------------------------
# The benchmarks: what the model is asked (the prompts differ between rule sets where the codes differ)


def with_choices(question, choices):
    lines = [f"({chr(65 + i)}) {c}" for i, c in enumerate(choices or [])]
    return "\n".join([question] + (["Choices:"] + lines if lines else []))


def mathvista_prompt(rec):
    # `query` holds the official prompt (hint, question, choices), the text VLMEvalKit's MathVista_MINI asks
    return rec.get("query") or with_choices(rec["question"], rec.get("choices"))


def mathvision_prompt(rec):
    return with_choices(rec["question"], rec.get("options"))


def mathverse_prompt(rec):  # the leaderboard's MathVerse_MINI_Vision_Only: the direct-answer instruction (the
    return rec.get("query_wo") or rec["question"]  # question is drawn in the image; official `question` is empty)


def mathverse_cot_prompt(rec):
    return rec.get("query_cot") or rec["question"]  # the official repository's chain-of-thought prompt


DYNAMATH_GUIDE = (  # VLMEvalKit dynamath.py Dynamath.GUIDE and EXAMPLE, copied from the official guide
    "\n## Answer Instruction Please provide an answer to the question outlined above. Your response should adhere "
    "to the following JSON format, which includes two keys: 'solution' and 'short answer'. The 'solution' key can "
    "contain detailed steps needed to solve the question, and the 'short answer' key should provide a concise "
    "response. {inst}\n\nExample of expected JSON response format:\n\n"
    '{\n    "solution": "[Detailed step-by-step explanation]",\n    "short answer": "[Concise Answer]"\n}')
DYNAMATH_INST = {
    "multiple choice": "Provide the corresponing choice option in the 'short answer' key, such as 'A', 'B', 'C', "
                       "or 'D'.",
    "float": "Format the answer as a three-digit floating-point number and provide it in the 'short answer' key.",
    "text": "Float numbers in the answer should be formatted as three-digit floating-point numbers."}
DYNAMATH_OFFICIAL_INST = (  # opensource_json_eval.py: one instruction for every answer type
    "If the problem is a multiple choice problem, just provide the corresponing choice option, such as 'A', 'B', "
    "'C', or 'D'. If the answer is a numerical value, format it as a three-digit floating-point number.")


def dynamath_prompt(rec):
    inst = DYNAMATH_INST.get(rec["answer_type"], DYNAMATH_INST["text"])
    return f"## Question\n {rec['question']}" + DYNAMATH_GUIDE.replace("{inst}", inst)


def dynamath_official_prompt(rec):
    ask_float = "Please answer in a floating-point number." if rec["answer_type"] == "float" else ""
    return "## Question\n" + rec["question"] + ask_float + DYNAMATH_GUIDE.replace("{inst}", DYNAMATH_OFFICIAL_INST)


def wemath_prompt(rec):
    """VLMEvalKit WeMath.build_prompt: the question, then one option a line."""
    options = "".join(f"{letter}. {text}\n" for letter, text in B.wemath_options(rec["option"]).items())
    return f"Question: {rec['question']}\nOptions:\n{options}"


WEMATH_FORMAT = ("Regarding the format, please answer following the template below, and be sure to include two <> "
                 "symbols:\n<Thought process>: <<your thought process>> <Answer>: <<your option>>")


def wemath_official_prompt(rec):
    return wemath_prompt(rec) + "\n" + WEMATH_FORMAT  # the official rule reads what follows "Answer"


# ----------------------------------------------------------------------------------------------------
# Aggregates: accuracy, DynaMath's worst case, WeMath's four dimensions


def mean(values):
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def accuracy(rows):
    return {"accuracy": mean(r["correct"] for r in rows), "n": len(rows)}


def dynamath_aggregate(rows):
    """The average, and the worst case the leaderboard reports: a seed (`id`) counts only if all its variants are
    right (VLMEvalKit dynamath.py Dynamath.evaluate)."""
    seeds = defaultdict(list)
    for r in rows:
        seeds[r["id"]].append(bool(r["correct"]))
    worst = mean(all(verdicts) for verdicts in seeds.values())
    return {"average": mean(r["correct"] for r in rows), "worst_case": worst, "n": len(rows), "n_seeds": len(seeds)}


def wemath_aggregate(rows):
    """The four dimensions of the official four_dimensional_metrics.py over problems (`ID`), parts `key` Nsteps_1..N
    and Nsteps_multi. IK: a step wrong, the composite wrong; IG: steps right, composite wrong; CM: both right; RM: a
    step wrong, composite right (loose: CM needs one step right, RM all wrong). Score = (CM + 0.5 IG) / n, n the
    complete problems present (the official 525 on the full set)."""
    problems, n_steps = defaultdict(dict), {}
    for r in rows:  # key "3steps_2": part 2 of a 3-step problem; "3steps_multi": the composite question
        steps, part = r["key"].split("steps_")
        problems[r["ID"]][part] = bool(r["correct"])
        n_steps[r["ID"]] = int(steps)
    c = Counter()
    for pid, parts in problems.items():
        steps = [parts.get(str(i)) for i in range(1, n_steps[pid] + 1)]
        if "multi" not in parts or None in steps:  # an incomplete problem (a --limit run) is not counted
            continue
        multi, every, some = parts["multi"], all(steps), any(steps)
        c.update(n=1, IK=not every and not multi, IG=every and not multi, CM_strict=every and multi,
                 RM_strict=not every and multi, CM_loose=some and multi, RM_loose=not some and multi)
    n = max(c["n"], 1)
    out = {"score_strict": (c["CM_strict"] + 0.5 * c["IG"]) / n, "score_loose": (c["CM_loose"] + 0.5 * c["IG"]) / n,
           "IK": c["IK"] / n, "IG": c["IG"] / n, "CM_strict": c["CM_strict"] / n, "CM_loose": c["CM_loose"] / n}
    for m in ("strict", "loose"):  # official: RM as a share of the right composite answers
        out[f"RM_{m}"] = c[f"RM_{m}"] / max(c[f"CM_{m}"] + c[f"RM_{m}"], 1)
    return out | {"accuracy": mean(r["correct"] for r in rows), "n": len(rows), "n_problems": c["n"]}


def schema_is_correct(rec, answer):
    """rewards.py's verifier and its "counts as correct" rule (iou: IoU >= 0.5). `open`: graded by the judge."""
    if answer is None or rec["verifier_type"] == "open":
        return False
    return rewards.is_correct(rewards.VERIFIERS[rec["verifier_type"]](answer, rec))


def schema_aggregate(rows):
    out = accuracy(rows)
    for field in ("verifier_type", "task"):
        for value in sorted({r[field] for r in rows if r.get(field)}):
            out[f"{field}/{value}"] = mean(r["correct"] for r in rows if r.get(field) == value)
    ious = [r for r in rows if r.get("verifier_type") == "iou"]
    if ious:
        out["mean_iou"] = mean(rewards.iou_reward(r["extracted"], r) if r["extracted"] else 0.0 for r in ious)
    return out


# ----------------------------------------------------------------------------------------------------
# The registry: BENCHMARKS under VLMEvalKit's rules (the paper's table), OFFICIAL under the official repositories'


class Benchmark(NamedTuple):
    hub: tuple | None     # (hub id, config, splits) the leaderboard scores; None: toy/jsonl, our own files
    fields: tuple         # fields a record must have; the first `ids` name the question
    ids: tuple            # fields naming a question; the first names the group --limit counts (seed, problem)
    prompt: Callable      # record -> the text the model is asked (the system prompt travels separately)
    extract: Callable     # (record, text) -> the answer the text states by itself, or None (rules only)
    is_correct: Callable  # (record, answer) -> bool
    aggregate: Callable   # rows (records + response, extracted, correct) -> {metric: value}
    primary: str          # the metric the table reports
    judge: str = "never"  # when the judge is asked: never, missing (no answer), prefetch (vlaa/judge.py), always
    grade: Callable | None = None  # MathVerse: our rules standing in for the judge's grading step


MATHVISTA = (("AI4Math/MathVista", None, ["testmini"]), ("pid", "question_type", "answer_type", "answer"), ("pid",))
MATHVISION = (("MathLLMs/MathVision", None, ["test"]), ("id", "question", "answer"), ("id",))
MATHVERSE = (("AI4Math/MathVerse", "testmini", ["testmini"]), ("sample_index", "question_type", "answer"),
             ("sample_index",))
DYNAMATH = (("DynaMath/DynaMath_Sample", None, [f"sample_variant{k}" for k in range(1, 11)]),
            ("id", "variant", "question", "answer_type", "ground_truth"), ("id", "variant"))
WEMATH = (("We-Math/We-Math", None, ["testmini"]), ("ID", "key", "question", "option", "answer"), ("ID", "key"))
LOGICVISTA = (("lscpku/LogicVista", None, ["test"]), ("question", "answer"), ("id",))
SCHEMA = (None, ("question", "answer", "verifier_type"), ("id",))
QUESTION = itemgetter("question")  # the prompt of LogicVista and of our own records: the question as it is

BENCHMARKS = {  # vlmeval/dataset/... of VLMEvalKit d9fe347b (2025-04-07); vlaa/benchmarks.py cites each function
    "mathvista": Benchmark(*MATHVISTA, mathvista_prompt, B.mathvista_extract, B.mathvista_vlmevalkit, accuracy,
                           "accuracy", judge="prefetch"),
    "mathvision": Benchmark(*MATHVISION, mathvision_prompt, B.mathvision_extract, B.mathvision_vlmevalkit, accuracy,
                            "accuracy", judge="prefetch"),
    "mathverse": Benchmark(*MATHVERSE, mathverse_prompt, B.mathverse_extract, B.mathverse_exact, accuracy,
                           "accuracy", judge="always", grade=B.mathverse_grade),
    "dynamath": Benchmark(*DYNAMATH, dynamath_prompt, B.dynamath_extract, B.dynamath_vlmevalkit, dynamath_aggregate,
                          "worst_case", judge="missing"),
    "wemath": Benchmark(*WEMATH, wemath_prompt, B.wemath_extract, B.wemath_vlmevalkit, wemath_aggregate,
                        "score_strict", judge="missing"),
    "logicvista": Benchmark(*LOGICVISTA, QUESTION, B.logicvista_extract, B.logicvista_vlmevalkit, accuracy,
                            "accuracy", judge="always"),
    "toy": Benchmark(*SCHEMA, QUESTION, None, schema_is_correct, schema_aggregate, "accuracy"),  # rewards.py reads
    "jsonl": Benchmark(*SCHEMA, QUESTION, None, schema_is_correct, schema_aggregate, "accuracy"),  # <answer>
}
OFFICIAL = BENCHMARKS | {  # each benchmark's own repository (vlaa/benchmarks.py cites the files)
    "mathvista": BENCHMARKS["mathvista"]._replace(is_correct=B.mathvista_official, judge="missing"),
    "mathvision": BENCHMARKS["mathvision"]._replace(extract=B.mathvision_official_extract,
                                                    is_correct=B.mathvision_official, judge="never"),
    "mathverse": BENCHMARKS["mathverse"]._replace(prompt=mathverse_cot_prompt),
    "dynamath": BENCHMARKS["dynamath"]._replace(prompt=dynamath_official_prompt, extract=B.dynamath_official_extract,
                                                is_correct=B.dynamath_official, judge="never"),
    "wemath": BENCHMARKS["wemath"]._replace(prompt=wemath_official_prompt, extract=B.wemath_official_extract,
                                            is_correct=B.wemath_official, judge="never"),
    "logicvista": BENCHMARKS["logicvista"]._replace(is_correct=B.logicvista_official),
}
RULES = {"vlmevalkit": BENCHMARKS, "official": OFFICIAL}

# ----------------------------------------------------------------------------------------------------
# Arguments

LAYOUT = """local copies (--data-dir D): D/<bench>.jsonl (or D is the file itself), one JSON object a line
with the benchmark's official field names, and the image as a path relative to the file in `image`
(or `image_path` / `decoded_image`). The fields each benchmark needs:
  mathvista   pid question_type answer_type answer (+ query, choices, precision)
  mathvision  id question answer (+ options)
  mathverse   sample_index question_type answer (+ query_wo, query_cot); the Vision Only rows
  dynamath    id (the seed's) variant (1-10) question answer_type ground_truth
  wemath      ID key question option answer
  logicvista  question answer
  toy, jsonl  our record schema; --data-dir is the file, or a folder holding test.jsonl"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=LAYOUT,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (04/05 output) or hub id")
    p.add_argument("--bench", default="toy", help=f"comma list from: {', '.join(BENCHMARKS)}, or six (default toy)")
    p.add_argument("--rules", default="vlmevalkit", choices=tuple(RULES), help="answer rules (default vlmevalkit: "
                   "VLMEvalKit of April 2025, the paper's table; official: each benchmark's repository)")
    p.add_argument("--preset", default="paper", choices=tuple(PRESETS), help="generation settings: paper (default: "
                   "greedy, 800 new tokens, max_pixels 256*32*32), vlmevalkit (VLMEvalKit's VLAA-Thinker config: "
                   "2048 tokens, min/max pixels 1280*28*28 / 16384*28*28) or inference (the authors' inference.py: "
                   "1000 tokens, the processor's default pixels 4*28*28 / 16384*28*28)")
    p.add_argument("--out", default=None, help="RUN_DIR (default runs/eval/<model>[-official][-vlmevalkit-preset])")
    p.add_argument("--overwrite", action="store_true", help="RUN_DIR holds another run: delete its outputs")
    p.add_argument("--skip-bad", action="store_true", help="leave out and count bad questions of --data-dir (bad "
                   "field, text over 32,000 characters, image that does not decode) instead of stopping")
    p.add_argument("--data-dir", default=None, help="local copies instead of the hub (layout below); toy "
                   "without it: a toy test set is made in RUN_DIR/toy-data")
    p.add_argument("--limit", type=flags.positive_int, help="first N questions per benchmark (DynaMath: N seeds "
                   "with their variants, WeMath: N problems with their sub-problems) (default all)")
    p.add_argument("--backend", default="auto", choices=("auto", "vllm", "hf", "openai"), help="default auto: vllm on "
                   "a GPU when installed, else hf")
    p.add_argument("--max-new-tokens", type=flags.positive_int, help="default: the preset's (800; vlmevalkit 2048)")
    p.add_argument("--min-pixels", type=flags.positive_int, help="image resize floor (default: the preset's)")
    p.add_argument("--max-pixels", type=flags.positive_int, help="image resize ceiling (default: the preset's); with "
                   "--backend openai the server decides (--mm-processor-kwargs)")
    p.add_argument("--no-system-prompt", action="store_true", help="no system prompt. Default: VLAA-Thinker's, for "
                   "our 04/05 checkpoints and VLAA-Thinker (trained with it); pass this for base models such as "
                   "Qwen/Qwen2.5-VL-*-Instruct, which the leaderboard ran without one")
    p.add_argument("--batch-size", type=flags.positive_int, help="questions per generate call and per flush to "
                   "predictions.jsonl (default 16 on hf; 512 on vllm/openai, which batch by themselves)")
    p.add_argument("--device", default=None, help="hf: device (default cuda if available, else cpu)")
    p.add_argument("--tensor-parallel-size", type=flags.positive_int, default=1, help="vllm: GPUs/engine (default 1)")
    p.add_argument("--base-url", default=None, help="openai: server URL(s), comma list (default $OPENAI_BASE_URL)")
    p.add_argument("--api-key-env", help="openai: env variable holding the key (default $OPENAI_API_KEY; none with "
                   "--base-url)")
    p.add_argument("--judge-backend", choices=("openai", "vllm", "hf"), help="an LLM judge as VLMEvalKit's (and for "
                   "toy/jsonl `open` records); default none: the rules stand in for it, `open` records are dropped")
    p.add_argument("--judge-model", default="gpt-4o-mini", help="judge model (default gpt-4o-mini, VLMEvalKit's)")
    p.add_argument("--judge-base-url", default=None, help="openai judge URL (default $OPENAI_BASE_URL)")
    p.add_argument("--judge-api-key-env", help="the judge's key: as --api-key-env, with --judge-base-url")
    args = flags.parse(p, argv, flags.check_pixels)
    vars(args).update({f: v for f, v in PRESETS[args.preset].items() if getattr(args, f) is None})  # unset: preset's
    runs.check_inputs(args, paths=("data_dir",), models=("model",) * (args.backend != "openai"))  # before any load
    return args


# ----------------------------------------------------------------------------------------------------
# Loading: from the hub (needs internet) or a local copy with the same field names

IMAGE_FIELDS = ("image", "image_path", "decoded_image")  # where the benchmarks keep the picture


def load_hub(name, bench):
    """All records of a benchmark from the Hugging Face hub, the decoded (PIL) image in `image`."""
    import datasets

    hub_id, config, splits = bench.hub
    out = []
    for variant, split in enumerate(splits, 1):
        ds = datasets.load_dataset(hub_id, config, split=split)
        if name == "mathverse":  # the leaderboard's version: the question is drawn in the image
            ds = ds.select([i for i, v in enumerate(ds["problem_version"]) if v == "Vision Only"])
        for rec in ds:
            image = next(rec[f] for f in ("decoded_image", "image", "image_path") if hasattr(rec.get(f), "convert"))
            rec = {k: v for k, v in rec.items() if k not in IMAGE_FIELDS} | {"image": image}
            if name == "dynamath":
                rec["variant"] = variant
            out.append(rec)
    return out


def load_local(name, bench, data_dir, skip_bad=False):
    """D/<name>.jsonl (or the file D), every row checked before any model runs (fields, text sizes, the image
    decoded: records.check_benchmark_row); errors name the file, the line and the field. Images made absolute."""
    path = data_dir if os.path.isfile(data_dir) else os.path.join(data_dir, f"{name}.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name}: no such file {path}\n{LAYOUT}")
    # mathverse: a copy of all five versions keeps the one the leaderboard scores
    keep = (lambda rec: rec.get("problem_version", "Vision Only") == "Vision Only") if name == "mathverse" else None
    return records.load_benchmark_rows(path, bench.fields, IMAGE_FIELDS, keep, skip_bad)


def load_schema(data_dir, skip_bad=False):
    """toy/jsonl: our record files, checked at load (a gold answer its verifier cannot read names the file, line,
    id and field)."""
    path = os.path.join(data_dir, "test.jsonl") if os.path.isdir(data_dir) else data_dir
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file {path}: --data-dir is a JSONL file, or a folder holding test.jsonl")
    return records.load_records(path, need=SCHEMA[1], skip_bad=skip_bad)


def key(bench, rec):
    """A question's id from its `ids` fields: "1", "2steps_1/2steps_multi", DynaMath's seed and variant "12#v3"."""
    joint = "#v" if bench.ids[-1] == "variant" else "/"
    return joint.join(str(rec[f]) for f in bench.ids)


def load_benchmark(name, bench, args, judge):
    """The records of one benchmark, each with a unique `qid`; --limit counts groups (a seed, a problem)."""
    if bench.hub is None:
        found = load_schema(args.data_dir or os.path.join(args.out, "toy-data"), args.skip_bad)
    elif args.data_dir:
        found = load_local(name, bench, args.data_dir, args.skip_bad)
    else:
        found = load_hub(name, bench)
    for row, rec in enumerate(found, 1):
        if "id" in bench.ids and rec.get("id") in (None, ""):
            rec["id"] = str(row)  # LogicVista's copies may have no id: its row
        rec["qid"] = f"{name}/{key(bench, rec)}"
    if args.limit is not None:
        groups = set(list(dict.fromkeys(str(rec[bench.ids[0]]) for rec in found))[:args.limit])
        found = [rec for rec in found if str(rec[bench.ids[0]]) in groups]
    duplicates = [qid for qid, n in Counter(rec["qid"] for rec in found).items() if n > 1]
    if duplicates:
        raise ValueError(f"{name}: duplicate question {duplicates[0].split('/', 1)[1]!r}")
    if name == "dynamath":
        check_dynamath(found, full=args.limit is None)
    if bench.hub is None and judge is None:  # `open` needs a judge: dropped with a count rather than scored 0
        kept = [r for r in found if r["verifier_type"] != "open"]
        if len(kept) < len(found):
            print(f"{name}: dropped {len(found) - len(kept)} open-ended records (no --judge-backend to grade them)")
        found = kept
    print(f"{name}: {len(found)} questions")
    return found


def check_dynamath(found, full):
    """Worst case needs every variant of every seed: with one missing, a seed's worst case is the mean of what is
    left, and without the split into variants it equals the average. The full set is 501 seeds x 10 variants."""
    variants = defaultdict(set)
    for rec in found:
        variants[str(rec["id"])].add(int(rec["variant"]))
    counts = Counter(len(v) for v in variants.values())
    if full and (len(variants), dict(counts)) != (501, {10: 501}):
        raise ValueError(f"dynamath: {len(variants)} seeds with {dict(counts)} variants (count: seeds); the full set "
                         "is 501 seeds x 10 variants (use --limit N for the first N seeds)")
    if len(counts) > 1:
        raise ValueError(f"dynamath: seeds have different numbers of variants ({dict(counts)}): worst case needs all")


def data_identity(args):
    """The hub (toy: made in RUN_DIR), or the sha256 of every JSONL file of --data-dir: a benchmark added to the
    run later keeps its identity, an edited copy changes it."""
    if args.data_dir is None:
        return "hub; toy: made in RUN_DIR/toy-data, seed 0"
    d = args.data_dir
    files = [d] if os.path.isfile(d) else sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".jsonl"))
    return {"path": os.path.abspath(d), "sha256": {os.path.basename(f): runs.sha256_file(f) for f in files}}


# ----------------------------------------------------------------------------------------------------
# Generation (resumable: appended to RUN_DIR/predictions.jsonl as batches finish)


def backend_options(args):
    """Each backend's own knobs (backends.make_backend passes them on); with openai the server resizes images."""
    pixels = {"min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
    if args.backend == "hf":
        return {"batch_size": args.batch_size, "device": args.device, **pixels}
    if args.backend == "vllm":
        return {"tensor_parallel_size": args.tensor_parallel_size, **pixels}
    return {"base_url": args.base_url, "api_key": api_key_for(args.api_key_env, args.base_url)}


def generate(args, data, rules):
    """Answer every question not yet in predictions.jsonl; the model is loaded only if there is work."""
    from tqdm import tqdm

    path = os.path.join(args.out, "predictions.jsonl")
    done, f, _ = jsonl.open_output(path, ("response",))  # ids answered; a torn or damaged line is redone
    todo = [(name, rec) for name, recs in data.items() for rec in recs if rec["qid"] not in done]
    if done and todo:
        print(f"{path}: {len(done)} answers already there, resuming")
    gen = backends.make_backend(args.backend, args.model, **backend_options(args)) if todo else None
    system = None if args.no_system_prompt else qwen.SYSTEM_PROMPT
    with f, tqdm(total=len(todo), desc="generate", unit="q", disable=not todo) as bar:
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start:start + args.batch_size]
            requests = []
            for name, rec in chunk:
                image = rec["image"]  # a path or the hub's PIL image: the backends convert both (vlaa.images)
                requests.append({"prompt": rules[name].prompt(rec), "system": system, "image": image})
            outs = gen(requests, n=1, max_new_tokens=args.max_new_tokens, temperature=0.0, on_error="return")
            for (name, rec), out in zip(chunk, outs):  # a refused request is not kept: a rerun asks it again
                if isinstance(out, Exception):
                    print(f"{rec['qid']}: {out}")
                else:
                    jsonl.append_jsonl(f, {"id": rec["qid"], "bench": name, "response": out[0]})
            bar.update(len(chunk))


# ----------------------------------------------------------------------------------------------------
# Scoring: the rules first, then the judge where VLMEvalKit asked it


def answer_phrase(text):
    """What follows the last "answer is" ("So the answer is 12 cm." -> "12 cm")."""
    said = re.findall(r"answer is[:\s]*(.+)", text or "", re.IGNORECASE)
    return said[-1].strip().strip("*$").rstrip(".").strip() if said else None


def rule_answer(bench, rec, prediction):
    """The answer the rules read: the benchmark's reading of the prediction itself (the <answer> block, or the
    whole response when it is itself an answer: "2", "B, D"), else of its last \\boxed{}, else of its "answer is"."""
    for text in (prediction, rewards.last_boxed(prediction), answer_phrase(prediction)):
        if text:
            answer = bench.extract(rec, text)
            if answer is not None:
                return answer
    return None


def score_benchmark(name, bench, recs, responses, asker=None, builders=None, exact=False):
    """-> (rows, judge requests that failed for good). rows: the record's fields + response (None: its request
    failed), prediction, rule_extracted (what the rules read), extracted and extracted_by (rule/prefetch/judge/
    None: the answer scored), correct. asker: the judge (vlaa/judge.py ask), or None: the rules stand in."""
    rows = []
    for rec in recs:
        response = responses.get(rec["qid"])  # None: refused by the server, a counted bad record (wrong)
        prediction = rewards.extract_answer(response) if bench.hub is None else B.answer_block(response)
        answer = rule_answer(bench, rec, prediction) if bench.hub is not None else prediction
        row = {k: v for k, v in rec.items() if not hasattr(v, "convert")}  # PIL images stay out
        row |= {"response": response, "prediction": prediction, "rule_extracted": answer, "extracted": answer,
                "extracted_by": "rule" if answer is not None else None}
        row["correct"] = bool(bench.is_correct(rec, answer))
        rows.append(row)
    if asker is None:
        if bench.grade is not None:  # MathVerse: exact match, else our rules stand in for the judge's grading
            for row in rows:
                row["correct"] = row["correct"] or bench.grade(row, row["extracted"], rewards.math_reward)
        return rows, 0
    if bench.hub is None:  # toy/jsonl: `open` answers are graded by the paper's verify prompt
        asked = {r["qid"]: judge_prompts.judge_prompt(judge_prompts.JUDGE_PROMPTS[name], r, r["extracted"])
                 for r in rows if r["verifier_type"] == "open" and r["extracted"] is not None}
        replies, failed = asker(list(asked.values()), None)
        for r in rows:
            if r["qid"] in asked:
                r["correct"] = replies.get(asked[r["qid"]], "").lower().startswith("yes")
        return rows, sum(p in failed for p in asked.values())
    return rows, judge.judge_rows(name, bench, rows, asker, builders or {}, exact)


def trace_stats(rows):
    """The paper's signs of pseudo reasoning: long responses, aha words, no answer the rules can extract."""
    return {"mean_words": mean(len((r["response"] or "").split()) for r in rows),
            "aha": mean(records.has_aha(r["response"]) for r in rows),
            "no_answer": mean(r["rule_extracted"] is None for r in rows)}  # a judge's answer does not count


# ----------------------------------------------------------------------------------------------------
# Reports and main


def read_scores(run_dir):  # missing or damaged: an InputError naming it
    return jsonl.read_json(os.path.join(run_dir, "scores.json"), "rerun 06_eval.py with --out RUN_DIR", ("benchmarks",))


def average_of_six(benchmarks):
    """The leaderboard's Avg: the plain mean of the six primary numbers, only when all six are there."""
    return mean(benchmarks[b]["score"] for b in SIX) if all(b in benchmarks for b in SIX) else None


def table_row(cells):
    return "| " + " | ".join("–" if c is None else c if isinstance(c, str) else f"{c:.1f}" for c in cells) + " |"


def report_table(run_scores):
    """run_scores: [(name, scores.json)] -> Markdown: the scores with the paper's rows, trace statistics, settings."""
    extra = sorted({b for _, s in run_scores for b in s["benchmarks"] if b not in SIX})
    lines = [table_row(["model"] + [TITLES[b] for b in SIX] + ["Avg"] + [TITLES.get(b, b) for b in extra]),
             "|---" * (len(SIX) + 2 + len(extra)) + "|"]
    lines += [table_row([name, *values] + [None] * len(extra)) for name, values in PAPER.items()]
    for name, s in run_scores:
        b = s["benchmarks"]
        cells = [b[x]["score"] if x in b else None for x in SIX] + [average_of_six(b)]
        lines.append(table_row([f"**{name}**"] + cells + [b[x]["score"] if x in b else None for x in extra]))
    lines += ["", "DynaMath: worst case; WeMath: Score (Strict); the others: accuracy (%).", "",
              table_row(["model", "benchmark", "n", "score", "mean words", "aha words %", "no answer %"]),
              "|---" * 7 + "|"]
    for name, s in run_scores:
        for bench, b in s["benchmarks"].items():
            t = b["trace"]
            lines.append(table_row([name, TITLES.get(bench, bench), str(b["n"]), b["score"], t["mean_words"],
                                    100 * t["aha"], 100 * t["no_answer"]]))
    lines.append("")
    for name, s in run_scores:
        settings = ", ".join(f"{k} {v}" for k, v in s.get("settings", {}).items())
        lines.append(f"- {name}: {settings}")
    return "\n".join(lines)


def judge_label(args, name, judge_gen, builders):
    """Who answered for the rules' reader, with which prompts (report.md)."""
    if judge_gen is None:
        return "none (our rules stand in; they also read \\boxed{} and \"answer is\")"
    prompts = f"VLMEvalKit {judge_prompts.VLMEVALKIT_COMMIT[:8]}'s prompts" if name in builders else \
        "the project's prompts (vlaa/judge_prompts.py)"
    return f"{args.judge_backend} {args.judge_model}, {prompts}"


def make_judge(args):
    """The LLM judge, or None. openai: the key only from --judge-api-key-env, or OpenAI's own endpoint's."""
    if not args.judge_backend:
        return None
    options = {}
    if args.judge_backend == "openai":
        options = {"base_url": args.judge_base_url, "api_key": api_key_for(args.judge_api_key_env, args.judge_base_url)}
    return backends.make_backend(args.judge_backend, args.judge_model, **options)


def default_out(args):
    """runs/eval/<model>: a hub id as owner--name; a folder by its name and a hash of its resolved path, so two
    exports both called `model` never share a folder. Other rules or presets get their own folder too."""
    tag = args.model.strip("/").replace("/", "--")
    if os.path.isdir(args.model):
        path = os.path.realpath(args.model)
        tag = f"{os.path.basename(path)}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
    tag += "" if args.rules == "vlmevalkit" else f"-{args.rules}"
    tag += "" if args.preset == "paper" else f"-{args.preset}-preset"
    return os.path.join("runs", "eval", tag)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        if not argv[1:] or argv[1].startswith("-"):
            raise SystemExit("usage: 06_eval.py report RUN_DIR [RUN_DIR ...]  (runs side by side, paper rows first)")
        table = report_table([(os.path.basename(os.path.abspath(d)), read_scores(d)) for d in argv[1:]])
        print(table)
        return table
    args = parse_args(argv)
    rules = RULES[args.rules]
    names = [b.strip() for b in args.bench.replace("six", ",".join(SIX)).split(",") if b.strip()]
    if not set(names) <= set(rules):
        raise SystemExit(f"unknown benchmark(s) {', '.join(set(names) - set(rules))}; known: {', '.join(rules)}, six")
    args.out = args.out or default_out(args)
    locks.hold(os.path.join(args.out, ".lock"), what=args.out)  # one writer per RUN_DIR, before any model loads
    if args.backend == "auto":
        args.backend = "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"
    args.batch_size = args.batch_size or (16 if args.backend == "hf" else 512)
    settings = {"rules": args.rules, "preset": args.preset, "max_new_tokens": args.max_new_tokens,
                "min_pixels": args.min_pixels, "max_pixels": args.max_pixels, "decoding": "greedy",
                "system_prompt": "none" if args.no_system_prompt else "VLAA-Thinker's", "backend": args.backend}
    identity = runs.run_identity(model=runs.fingerprint_model(args.model), data=data_identity(args),
                                 limit=args.limit, **settings)
    outputs = ["predictions.jsonl", "judge.jsonl", "scores.json", "report.md", "toy-data"]
    runs.claim_run(args.out, identity, overwrite=args.overwrite, outputs=outputs + [f"scored-{b}.jsonl" for b in rules])
    if "toy" in names and args.data_dir is None and not os.path.exists(os.path.join(args.out, "toy-data")):
        import toy  # the offline default: a toy test set in RUN_DIR

        toy.make_data(os.path.join(args.out, "toy-data"), n=0, test_n=200, seed=0)
    judge_gen = make_judge(args)
    try:
        builders = judge_prompts.vlmevalkit_builders() if judge_gen and args.rules == "vlmevalkit" else {}
    except (OSError, SyntaxError, judge_prompts.SourceError) as e:
        raise SystemExit(f"VLMEvalKit's judge prompts: {e}") from None
    data = {name: load_benchmark(name, rules[name], args, judge_gen) for name in names}  # bad data fails first
    generate(args, data, rules)
    predictions = jsonl.read_output(os.path.join(args.out, "predictions.jsonl"), ("response",))[0]  # damaged: redone
    responses = {r["id"]: r["response"] for r in predictions}

    path = os.path.join(args.out, "scores.json")
    scores = read_scores(args.out) if os.path.exists(path) else {"benchmarks": {}}  # other benchmarks stay
    scores |= {"model": args.model, "settings": settings}
    asker = functools.partial(judge.ask, judge_gen, args.judge_model, os.path.join(args.out, "judge.jsonl"))
    for name, recs in data.items():
        bench = rules[name]
        rows, judge_failed = score_benchmark(name, bench, recs, responses, asker if judge_gen else None, builders,
                                             exact=args.rules == "vlmevalkit")
        metrics = bench.aggregate(rows)
        bad = {"generation_failed": sum(r["response"] is None for r in rows), "judge_failed": judge_failed}
        if any(bad.values()):
            print(f"{name}: {bad} requests failed for good: counted wrong; rerun the same command to ask them again")
        scores["benchmarks"][name] = {"score": 100 * metrics[bench.primary], "primary": bench.primary,
                                      "n": len(rows), "metrics": metrics | bad, "trace": trace_stats(rows),
                                      "judge": judge_label(args, name, judge_gen, builders)}
        jsonl.write_jsonl(os.path.join(args.out, f"scored-{name}.jsonl"), rows)
    labels = defaultdict(list)  # each benchmark keeps the label of the invocation that scored it
    for name, b in scores["benchmarks"].items():
        labels[b.get("judge", "?")].append(TITLES.get(name, name))
    settings["judge"] = "; ".join(f"{label} ({', '.join(b)})" if len(labels) > 1 else label
                                  for label, b in labels.items())
    scores["avg"] = average_of_six(scores["benchmarks"])
    jsonl.write_json(path, scores)
    table = report_table([(os.path.basename(os.path.abspath(args.out)), scores)])
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return scores


if __name__ == "__main__":
    flags.cli(main)
