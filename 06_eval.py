"""Stage 06: answer the six visual-math benchmarks, extract answers, score each with its own rule, print a table.

The last stage: a model folder from 04_sft.py / 05_grpo.py (or a Qwen2.5-VL hub id) answers the paper's Table 4
benchmarks with VLAA-Thinker's system prompt, greedy, max_new_tokens 800, max_pixels 256*32*32 (SPEC §4):
MathVista (testmini), MathVision (test), MathVerse (testmini, Vision Only), DynaMath (501 seeds x 10 variants,
worst case), WeMath (testmini, Score (Strict)), LogicVista (test); also `toy` (toy.py) and `jsonl` (DESIGN schema).

    # CPU, about a minute: the tiny random model on a toy test set (made in RUN_DIR without --data-dir)
    python toy.py build-model runs/tiny && python 06_eval.py --model runs/tiny --bench toy
    # 1 GPU: vLLM, all six from the hub (needs internet; --data-dir for local copies)
    python 06_eval.py --model Qwen/Qwen2.5-VL-3B-Instruct --backend vllm --out runs/eval/qwen2.5-vl-3b \\
        --bench mathvista,mathvision,mathverse,dynamath,wemath,logicvista
    # 8 GPUs: one engine over several GPUs (--tensor-parallel-size, must divide the attention heads), or
    # better one OpenAI-compatible server per node (data parallel) and many requests in flight:
    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --data-parallel-size 8 --mm-processor-kwargs '{"max_pixels": 262144}'
    python 06_eval.py --model Qwen/Qwen2.5-VL-7B-Instruct --backend openai --base-url http://localhost:8000/v1 ...
    # several runs side by side, with the paper's rows for reference
    python 06_eval.py report runs/eval/qwen2.5-vl-3b runs/eval/mine

Writes RUN_DIR/predictions.jsonl (raw responses, appended as they finish: a rerun resumes), judge.jsonl,
scored-<bench>.jsonl (each question: fields, response, extracted answer, verdict), scores.json, report.md. Rules follow
each official repository; where we follow VLMEvalKit (which made the published numbers, with gpt-4o-mini
extracting answers) a comment says so. Without --judge-backend ours are rules only: expect gaps (most on MathVerse).
"""

import argparse
import importlib.util
import json
import math
import os
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from operator import itemgetter
from typing import NamedTuple

import torch

import rewards
from vlaa import backends, jsonl, qwen, records

SIX = ("mathvista", "mathvision", "mathverse", "dynamath", "wemath", "logicvista")
TITLES = {"mathvista": "MathVista", "mathvision": "MathVision", "mathverse": "MathVerse", "dynamath": "DynaMath",
          "wemath": "WeMath", "logicvista": "LogicVista", "toy": "Toy", "jsonl": "JSONL"}
PAPER = {  # paper Table 4 = the leaderboard (SPEC §4): the six, then Avg
    "Qwen2.5-VL-3B (paper)": (61.2, 21.9, 31.2, 13.2, 22.9, 40.3, 31.8),
    "VLAA-Thinker-Qwen2.5VL-3B (paper)": (61.0, 24.4, 36.4, 18.2, 33.8, 38.5, 35.4),
    "Qwen2.5-VL-7B (paper)": (68.1, 25.4, 41.1, 21.8, 36.2, 47.9, 40.1),
    "VLAA-Thinker-Qwen2.5VL-7B (paper)": (68.0, 26.4, 48.2, 22.4, 41.5, 48.5, 42.5),
}

# ----------------------------------------------------------------------------------------------------
# Arguments

LAYOUT = """local copies (--data-dir D): D/<bench>.jsonl (or D is the file itself), one JSON object a line
with the benchmark's official field names, and the image as a path relative to the file in `image`
(or `image_path` / `decoded_image`). The fields each benchmark needs:
  mathvista   pid question_type answer_type answer (+ query, choices, precision)
  mathvision  id question answer (+ options)
  mathverse   sample_index question_type answer (+ query_cot); the Vision Only rows
  dynamath    id (the seed's) variant (1-10) question answer_type ground_truth
  wemath      ID key question option answer
  logicvista  question answer
  toy, jsonl  the DESIGN schema; --data-dir is the file, or a folder holding test.jsonl"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=LAYOUT,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (04/05 output) or hub id")
    p.add_argument("--bench", default="toy", help=f"comma list from: {', '.join(BENCHMARKS)} (default toy)")
    p.add_argument("--out", default=None, help="RUN_DIR (default runs/eval/<model folder name>)")
    p.add_argument("--data-dir", default=None, help="local copies instead of the hub (layout below); toy "
                   "without it: a toy test set is made in RUN_DIR/toy-data")
    p.add_argument("--limit", type=int, default=None, help="first N questions per benchmark (DynaMath: N seeds "
                   "with their variants, WeMath: N problems with their sub-problems) (default all)")
    p.add_argument("--backend", default="auto", choices=("auto", "vllm", "hf", "openai"), help="generation backend "
                   "(default auto: vllm on a GPU when installed, else hf)")
    p.add_argument("--max-new-tokens", type=int, default=800, help="default 800 (paper, SPEC §4); VLMEvalKit: 2048")
    p.add_argument("--min-pixels", type=int, default=None, help="image resize floor (default: the checkpoint's)")
    p.add_argument("--max-pixels", type=int, default=256 * 32 * 32, help="image resize ceiling (default 262144 = "
                   "256*32*32, the paper's); with --backend openai the server decides (--mm-processor-kwargs)")
    p.add_argument("--no-system-prompt", action="store_true", help="leave out VLAA-Thinker's system prompt (base "
                   "models get the chat template's default; default: use it)")
    p.add_argument("--batch-size", type=int, default=None, help="questions per generate call and per flush to "
                   "predictions.jsonl (default 16 on hf; 512 on vllm/openai, which batch by themselves)")
    p.add_argument("--device", default=None, help="hf backend device (default cuda if available, else cpu)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per engine (default 1)")
    p.add_argument("--base-url", default=None, help="openai: server URL(s), comma list (default $OPENAI_BASE_URL)")
    p.add_argument("--judge-backend", default=None, choices=("openai", "vllm", "hf"), help="an LLM that extracts "
                   "answers the rules miss and grades toy/jsonl `open` ones (default none: `open` dropped)")
    p.add_argument("--judge-model", default="gpt-4o-mini", help="judge model (default gpt-4o-mini, VLMEvalKit's)")
    p.add_argument("--judge-base-url", default=None, help="openai judge URL (default $OPENAI_BASE_URL)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# Loading: from the hub (needs internet) or a local copy with the same field names

HUB = {  # the splits the leaderboard scores (eval-scoring.md §1): hub id, config, splits
    "mathvista": ("AI4Math/MathVista", None, ["testmini"]),
    "mathvision": ("MathLLMs/MathVision", None, ["test"]),
    "mathverse": ("AI4Math/MathVerse", "testmini", ["testmini"]),
    "dynamath": ("DynaMath/DynaMath_Sample", None, [f"sample_variant{k}" for k in range(1, 11)]),
    "wemath": ("We-Math/We-Math", None, ["testmini"]),
    "logicvista": ("lscpku/LogicVista", None, ["test"]),
}
IMAGE_FIELDS = ("image", "image_path", "decoded_image")  # where the benchmarks keep the picture


def load_hub(name):
    """All records of a benchmark from the Hugging Face hub, the decoded (PIL) image in `image`."""
    import datasets

    (hub_id, config, splits), records = HUB[name], []
    for variant, split in enumerate(splits, 1):
        ds = datasets.load_dataset(hub_id, config, split=split)
        if name == "mathverse":  # SPEC §4: the Vision Only version (the question is drawn in the image)
            ds = ds.filter(lambda v: v == "Vision Only", input_columns="problem_version")
        for rec in ds:
            image = next(rec[f] for f in ("decoded_image", "image", "image_path") if hasattr(rec.get(f), "convert"))
            rec = {k: v for k, v in rec.items() if k not in IMAGE_FIELDS} | {"image": image}
            records.append(rec | ({"variant": variant} if name == "dynamath" else {}))
    return records


def load_local(name, data_dir, need):
    """D/<name>.jsonl (or the file D); errors name the file, the line and the field. Images made absolute."""
    path = data_dir if os.path.isfile(data_dir) else os.path.join(data_dir, f"{name}.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name}: no such file {path}\n{LAYOUT}")
    root, records = os.path.dirname(os.path.abspath(path)), []
    for i, rec in jsonl.read_jsonl(path):  # bad JSON: an error naming file:line
        where = f"{path}:{i}"
        if name == "mathverse" and rec.get("problem_version", "Vision Only") != "Vision Only":
            continue  # a copy of all five versions: keep the one the leaderboard scores
        if missing := [f for f in need if f not in rec]:  # not records.require: LogicVista has one empty answer
            raise ValueError(f"{where}: missing field '{missing[0]}' (record has: {', '.join(sorted(rec))})")
        image = next((rec[f] for f in IMAGE_FIELDS if isinstance(rec.get(f), str) and rec[f]), None)
        if image is None:
            raise ValueError(f"{where}: missing field 'image' (a path in 'image', 'image_path' or 'decoded_image')")
        image = image if os.path.isabs(image) else os.path.join(root, image)
        if not os.path.exists(image):
            raise FileNotFoundError(f"{where}: field 'image': no such file {image}")
        records.append(rec | {"image": image})
    return records


def key(rec):  # a question's unique key: its id; DynaMath's `id` is the seed's, shared by its 10 variants
    return f"{rec['id']}#v{rec['variant']}" if "variant" in rec else str(rec["id"])


def make_loader(name, need, make_id, group=key):
    """-> load(data_dir=None, limit=None): records with their own fields, a str `id` (make_id(rec, row)) and
    an `image`. --limit counts `group`s: a DynaMath seed with its variants, a WeMath problem with its parts."""
    def load(data_dir=None, limit=None):
        records = load_local(name, data_dir, need) if data_dir else load_hub(name)
        for i, rec in enumerate(records, 1):
            rec["id"] = str(make_id(rec, i))
        if limit is not None:
            keep = set(list(dict.fromkeys(map(group, records)))[:limit])
            records = [r for r in records if group(r) in keep]
        if dup := [k for k, n in Counter(map(key, records)).items() if n > 1]:
            raise ValueError(f"{name}: duplicate question {dup[0]!r}")
        return records
    return load


# ----------------------------------------------------------------------------------------------------
# Answer extraction: the <answer> block, then the last \boxed{}, then the benchmark's own pattern


def last_boxed(text):
    """Content of the last \\boxed{...}, braces balanced (\\boxed{\\frac{1}{2}}); None if none or unclosed."""
    start = (text or "").rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip() or None
    return None  # unclosed: cut off by max_new_tokens


def rule_answer(rec, response, answer_is=True):
    """The last `<answer>` block (as VLMEvalKit's VLAA-Thinker post-processing) and a \\boxed{} inside it, else
    the last \\boxed{}; else, with answer_is, '...the answer is X.' (MathVista's quick regex, MATH-V's phrases)."""
    block = rewards.extract_answer(response)
    if (found := (last_boxed(block) or block) if block else last_boxed(response)) or not answer_is:
        return found
    said = re.findall(r"answer is[:\s]*(.+)", response or "", re.IGNORECASE)
    return (said[-1].strip().strip("*$").rstrip(".").strip() or None) if said else None


def leading_letters(text, letters="ABCDEFGH"):
    """The option letters an answer starts with: 'B' -> B, '(C) 45' -> C, 'B, D' / 'B and D' -> BD, 'A cat' -> A."""
    out = []
    for tok in re.split(r"[\s,;&()\[\].:*]+", (text or "").strip()):
        if tok in ("", "and"):
            continue
        if len(tok) != 1 or tok not in letters:
            break
        out.append(tok)
    return "".join(out)


def to_number(text):
    """The number an answer states: '1,234.5 m' -> 1234.5, 'x = 3' -> 3 (after the last '='); else None."""
    s = re.sub(r"(?<=\d),(?=\d{3})", "", str(text).split("=")[-1])
    m = re.search(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", s)
    return float(m.group()) if m else None


def edit_distance(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# ----------------------------------------------------------------------------------------------------
# MathVista (testmini, 1000). Official: lupantech/MathVista evaluation/calculate_score.py


def with_choices(question, choices):
    lines = [f"({chr(65 + i)}) {c}" for i, c in enumerate(choices or [])]
    return "\n".join([question] + (["Choices:"] + lines if lines else []))


def mathvista_prompt(rec):
    # `query` is the official prompt (hint, question, choices); VLMEvalKit's TSV question is the same text
    return rec.get("query") or with_choices(rec["question"], rec.get("choices"))


def mathvista_extract(rec, response):
    if (found := rule_answer(rec, response)) or rec["question_type"] != "multi_choice":
        return found
    # VLMEvalKit's can_infer: exactly one option letter stands alone among the tokens, and in the last 5
    tokens = re.sub(r"[.()\[\],:;!*#{}]", " ", response or "").split()
    letters = {t for t in tokens if len(t) == 1 and "A" <= t < chr(65 + len(rec["choices"]))}
    return letters.pop() if len(letters) == 1 and any(t in letters for t in tokens[-5:]) else None


def mathvista_is_correct(rec, answer):
    """Official normalize_extracted_answer, then string equality with the gold `answer`."""
    if answer is None:
        return False
    answer = str(answer).strip()
    if rec["question_type"] == "multi_choice":
        choices = [str(c) for c in rec["choices"]]
        letter = re.findall(r"\(([a-zA-Z])\)", answer)  # "(B) 12" -> "B"
        answer = letter[0].upper() if letter else answer
        if answer in [chr(65 + i) for i in range(len(choices))]:  # a letter maps to its choice text
            pred = choices[ord(answer) - 65]
        else:  # anything else: the nearest choice by edit distance (official get_most_similar)
            pred = min(choices, key=lambda c: edit_distance(answer, c))
        return pred == rec["answer"]
    try:  # official: float(extraction); ours also reads '12 cm' (its LLM extractor would have)
        value = float(answer) if re.fullmatch(r"[-+]?[\d.]+(?:[eE][-+]?\d+)?", answer) else to_number(answer)
        if rec["answer_type"] == "integer":  # integers compared as integers
            pred = str(int(value))
        elif rec["answer_type"] == "float":  # rounded to the item's precision (None: round(x) -> int, as official)
            pred = str(round(value, None if rec.get("precision") is None else int(rec["precision"])))
        else:  # list (2 items): the string itself
            pred = answer
    except (TypeError, ValueError, OverflowError):
        return False
    return pred == str(rec["answer"])


# ----------------------------------------------------------------------------------------------------
# MathVision (test, 3040). Official: mathllm/MATH-V evaluation/evaluate.py and utils.py


def mathv_clean(s):
    """MATH-V's find_math_answer, short: lower case, after the last = or \\approx, no spaces/degrees/$/%/\\text."""
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", str(s).lower().split("=")[-1].split("\\approx")[-1])
    for junk in (" ", "\\left", "\\right", "^{\\circ}", "^\\circ", "°", "\\$", "$", "\\%", "%", "\\!", "\\,"):
        s = s.replace(junk, "")
    s = re.sub(r"^\(([a-e])\)$", r"\1", s.replace("dfrac", "frac").replace("tfrac", "frac"))
    return s.rstrip(".").lstrip(":")


def math_equal(pred, gold, places=2):
    """MATH-V's is_equal without its eval(): same string, else numbers equal to 2 decimals, else math-verify."""
    if not pred or not gold or pred == gold:
        return bool(pred) and pred == gold
    try:
        return round(float(pred), places) == round(float(gold), places)
    except ValueError:
        pass
    if re.fullmatch(r"[a-z]", pred) or re.fullmatch(r"[a-z]", gold):  # option letters: the string compare decided
        return False
    return rewards.math_reward(pred, gold) >= 1.0


def mathvision_is_correct(rec, answer):
    """Official: is_equal(gt, pred) or is_equal(text of the gt option, pred)."""
    gold, options = str(rec["answer"]), rec.get("options") or []
    golds = [gold] + ([options[ord(gold) - 65]] if len(gold) == 1 and 0 <= ord(gold) - 65 < len(options) else [])
    return answer is not None and any(math_equal(mathv_clean(answer), mathv_clean(g)) for g in golds)


# ----------------------------------------------------------------------------------------------------
# DynaMath (501 seeds x 10 variants). Official: DynaMath/DynaMath evaluation/opensource_json_eval.py

DYNAMATH_GUIDE = """
## Answer Instruction Please provide an answer to the question outlined above. Your response should adhere \
to the following JSON format, which includes two keys: 'solution' and 'short answer'. The 'solution' key can contain \
detailed steps needed to solve the question, and the 'short answer' key should provide a concise response. {inst}

Example of expected JSON response format:

""" + json.dumps({"solution": "[Detailed step-by-step explanation]", "short answer": "[Concise Answer]"}, indent=4)
DYNAMATH_INST = {  # VLMEvalKit's DynaMath prompt (dynamath.py build_prompt), the official guide per answer type
    "multiple choice": "Provide the corresponing choice option in the 'short answer' key, such as 'A', 'B', "
                       "'C', or 'D'.",
    "float": "Format the answer as a three-digit floating-point number and provide it in the 'short answer' key.",
    "text": "Float numbers in the answer should be formatted as three-digit floating-point numbers."}


def dynamath_prompt(rec):
    inst = DYNAMATH_INST.get(rec["answer_type"], DYNAMATH_INST["text"])
    return f"## Question\n {rec['question']}" + DYNAMATH_GUIDE.replace("{inst}", inst)


def dynamath_extract(rec, response):
    """<answer>/\\boxed{}, else the JSON's "short answer" (outermost {...}, backslashes dropped, as official).
    The official then takes the last line; we follow VLMEvalKit: no answer (its judge, ours if given)."""
    if (found := rule_answer(rec, response, False)) or not 0 <= (s := str(response)).find("{") < s.rfind("}"):
        return found
    try:
        short = json.loads(s[s.find("{"):s.rfind("}") + 1].replace("\\", ""), strict=False).get("short answer")
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object
        return None
    return (str(short).strip() or None) if short is not None else None


def dynamath_is_correct(rec, answer):
    if answer is None:
        return False
    gold, answer = str(rec["ground_truth"]).strip(), str(answer).strip()
    if rec["answer_type"] == "float":  # official: the first token, 'π' multiplies, right within 0.001
        first = answer.split(" ")[0]
        try:
            value = float(first.split("π")[0]) * math.pi if "π" in first else float(first)
        except ValueError:
            value = to_number(answer)  # ours: '$3.142$' or '3.142cm' (VLMEvalKit's judge would clean these)
        return value is not None and abs(value - float(gold)) <= 0.001
    if rec["answer_type"] == "multiple choice":  # official: one letter equal, else the gold in the first 3 chars
        return answer == gold if len(answer) == 1 else gold in answer[:3]
    return gold in answer  # text: official "gt in answer" (VLMEvalKit checks the other way round)


def dynamath_aggregate(rows):
    """Average over all rows, and the worst case the leaderboard reports: a seed (`id`) counts only if all its
    variants are right (VLMEvalKit dynamath.py; eval-scoring.md §0)."""
    seeds = defaultdict(list)
    for r in rows:
        seeds[r["id"]].append(bool(r["correct"]))
    return {"average": mean(r["correct"] for r in rows), "worst_case": mean(all(v) for v in seeds.values()),
            "n": len(rows), "n_seeds": len(seeds)}


# ----------------------------------------------------------------------------------------------------
# WeMath (testmini: 525 problems, 1740 rows). Official: We-Math/We-Math evaluation/four_dimensional_metrics.py


def wemath_prompt(rec):
    # VLMEvalKit's WeMath prompt ("Question: ...\nOptions:\nA. ..."), from the official one-string `option`
    options = [o.strip() for o in re.split(r";\s*(?=[A-H]\.)", rec["option"]) if o.strip()]
    return f"Question: {rec['question']}\nOptions:\n" + "\n".join(options)


def wemath_extract(rec, response):
    """<answer>/\\boxed{}, else the official rule: what follows the last 'Answer' ('<Answer>: <<option>>')."""
    if (found := rule_answer(rec, response, False)) or "Answer" not in (response or ""):
        return found
    return re.sub(r"[><:.]", "", response.split("Answer")[-1]).strip() or None


def wemath_is_correct(rec, answer):
    # official: strip '><:.', take the first character if it is A-H; ours also reads '(B)'
    return answer is not None and leading_letters(re.sub(r"[><:.]", " ", str(answer)))[:1] == rec["answer"]


def wemath_aggregate(rows):
    """Four dimensions over problems (`ID`) with parts `key` = Nsteps_1..N, Nsteps_multi. IK: a step wrong, the
    composite wrong; IG: steps right, composite wrong; CM: steps right, composite right; RM: a step wrong, composite
    right (loose: CM needs one step right, RM all wrong). Score = (n - 0.5 IG - RM - IK) / n = (CM + 0.5 IG) / n;
    the official n is 525 (all of testmini), ours the complete problems present (525 on the full set)."""
    problems, n_steps = defaultdict(dict), {}
    for r in rows:  # key "3steps_2": part 2 of a 3-step problem; "3steps_multi": the composite question
        steps, part = r["key"].split("steps_")
        problems[r["ID"]][part], n_steps[r["ID"]] = bool(r["correct"]), int(steps)
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


# ----------------------------------------------------------------------------------------------------
# MathVerse (testmini, Vision Only, 788) and LogicVista (test, 448): officially scored by LLMs; rules here.
# MathVerse (ZrrSkywalker/MathVerse): an LLM extracts, an LLM judges; its rule mode (--quick_match) is string
# equality. Ours: the letter for multi-choice, else quick_match, then MATH-V's cleaning and math-verify (generous
# normalisation, eval-scoring.md §2; it still under-counts without a judge). LogicVista (Yijia-Xiao/LogicVista
# eval/extract_accuracy.py): GPT-4 extracts the chosen letters, compared with the gold ones ("B, D"); VLMEvalKit
# always asks gpt-4o-mini. Ours: the letters the answer starts with, as sets.


def mathverse_is_correct(rec, answer):
    if answer is None:
        return False
    gold = str(rec["answer"]).strip()
    if rec["question_type"] == "multi-choice":
        return leading_letters(answer)[:1] == leading_letters(gold)[:1] != ""
    return str(answer).strip() == gold or math_equal(mathv_clean(answer), mathv_clean(gold))


def logicvista_is_correct(rec, answer):
    gold = set(leading_letters(str(rec["answer"]), "ABCDE"))
    return answer is not None and bool(gold) and set(leading_letters(str(answer), "ABCDE")) == gold


# ----------------------------------------------------------------------------------------------------
# toy and jsonl (DESIGN-schema records, scored with rewards.py), then the registry: plain functions per benchmark


def load_schema(data_dir=None, limit=None):
    if data_dir is None:
        raise ValueError("toy/jsonl need --data-dir: a DESIGN-schema JSONL file, or a folder holding test.jsonl")
    path = os.path.join(data_dir, "test.jsonl") if os.path.isdir(data_dir) else data_dir
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file {path}: --data-dir is a JSONL file, or a folder holding test.jsonl")
    return records.load_records(path, need=("question", "answer", "verifier_type"))[:limit]


def schema_is_correct(rec, answer):
    """rewards.py's verifier gives 1; iou: IoU >= 0.5 (DESIGN). `open`: graded by the judge (score_benchmark)."""
    if answer is None or rec["verifier_type"] == "open":
        return False
    return rewards.VERIFIERS[rec["verifier_type"]](answer, rec) >= (0.5 if rec["verifier_type"] == "iou" else 1.0)


def schema_aggregate(rows):
    out = {"accuracy": mean(r["correct"] for r in rows), "n": len(rows)}
    for field in ("verifier_type", "task"):
        for value in sorted({r[field] for r in rows if r.get(field)}):
            out[f"{field}/{value}"] = mean(r["correct"] for r in rows if r.get(field) == value)
    if ious := [r for r in rows if r.get("verifier_type") == "iou"]:
        out["mean_iou"] = mean(rewards.iou_reward(r["extracted"], r) if r["extracted"] else 0.0 for r in ious)
    return out


class Benchmark(NamedTuple):
    load: Callable        # (data_dir=None, limit=None) -> records
    prompt: Callable      # record -> the question as the model sees it (the system prompt comes with the request)
    extract: Callable     # (record, response) -> answer str or None
    is_correct: Callable  # (record, answer) -> bool
    aggregate: Callable   # rows (records + response, extracted, correct) -> {metric: value}
    primary: str          # the metric the table reports


def mean(values):
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def accuracy(rows):
    return {"accuracy": mean(r["correct"] for r in rows), "n": len(rows)}


BENCHMARKS = {
    "mathvista": Benchmark(make_loader("mathvista", ("pid", "question_type", "answer_type", "answer"),
                                       lambda r, i: r["pid"]),
                           mathvista_prompt, mathvista_extract, mathvista_is_correct, accuracy, "accuracy"),
    "mathvision": Benchmark(make_loader("mathvision", ("id", "question", "answer"), lambda r, i: r["id"]),
                            lambda r: with_choices(r["question"], r.get("options")), rule_answer,
                            mathvision_is_correct, accuracy, "accuracy"),
    "mathverse": Benchmark(make_loader("mathverse", ("sample_index", "question_type", "answer"),
                                       lambda r, i: r["sample_index"]),  # query_cot: the official CoT prompt
                           lambda r: r.get("query_cot") or r["question"], rule_answer, mathverse_is_correct,
                           accuracy, "accuracy"),
    "dynamath": Benchmark(make_loader("dynamath", ("id", "variant", "question", "answer_type", "ground_truth"),
                                      lambda r, i: r["id"], group=itemgetter("id")),
                          dynamath_prompt, dynamath_extract, dynamath_is_correct, dynamath_aggregate, "worst_case"),
    "wemath": Benchmark(make_loader("wemath", ("ID", "key", "question", "option", "answer"),
                                    lambda r, i: f"{r['ID']}/{r['key']}", group=itemgetter("ID")),
                        wemath_prompt, wemath_extract, wemath_is_correct, wemath_aggregate, "score_strict"),
    "logicvista": Benchmark(make_loader("logicvista", ("question", "answer"), lambda r, i: r.get("id", i)),
                            itemgetter("question"), rule_answer, logicvista_is_correct, accuracy, "accuracy"),
    "toy": Benchmark(load_schema, itemgetter("question"), lambda r, s: rewards.extract_answer(s), schema_is_correct,
                     schema_aggregate, "accuracy"),
}
BENCHMARKS["jsonl"] = BENCHMARKS["toy"]

# ----------------------------------------------------------------------------------------------------
# Generation (resumable: appended to RUN_DIR/predictions.jsonl as batches finish), then scoring


def backend_options(args):
    """Each backend's own knobs (backends.make_backend passes them on); with openai the server resizes images."""
    px = {"min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
    return {"hf": {"batch_size": args.batch_size, "device": args.device, **px}, "openai": {"base_url": args.base_url},
            "vllm": {"tensor_parallel_size": args.tensor_parallel_size, **px}}[args.backend]


def generate(args, data):
    """Answer every question not yet in predictions.jsonl; the model is loaded only if there is work."""
    from tqdm import tqdm

    path = os.path.join(args.out, "predictions.jsonl")
    done, f, _ = jsonl.open_output(path)  # ids already answered; a torn last line is cut and redone
    todo = [(name, rec) for name, records in data.items() for rec in records if f"{name}/{key(rec)}" not in done]
    if done and todo:
        print(f"{path}: {len(done)} answers already there, resuming")
    gen = backends.make_backend(args.backend, args.model, **backend_options(args)) if todo else None
    system = None if args.no_system_prompt else qwen.SYSTEM_PROMPT
    with f, tqdm(total=len(todo), desc="generate", unit="q", disable=not todo) as bar:
        for s in range(0, len(todo), args.batch_size):
            chunk = todo[s:s + args.batch_size]
            requests = [{"prompt": BENCHMARKS[name].prompt(rec), "system": system,
                         "image": records.load_image(rec["image"], f"{name}/{key(rec)}")
                         if isinstance(rec["image"], str) else rec["image"].convert("RGB")} for name, rec in chunk]
            outs = gen(requests, n=1, max_new_tokens=args.max_new_tokens, temperature=0.0)  # greedy (SPEC §4)
            for (name, rec), out in zip(chunk, outs):
                jsonl.append_jsonl(f, {"id": f"{name}/{key(rec)}", "bench": name, "response": out[0]})
            bar.update(len(chunk))


# Scoring: rules first; the LLM judge only where they find nothing (VLMEvalKit's prefetch does the same)

JUDGE_EXTRACT = ("Below are a question and a model's response to it. Extract the model's final answer. Reply with "
                 "the answer only: the option letter(s) for a multiple-choice question, else a number or a short "
                 "expression. Reply NONE if the response gives no answer.\n\nQuestion: {q}\n\nResponse: {r}")
# the paper's verify prompt (SPEC §1 step 5, assets/prompts/4.verify.txt), for toy/jsonl `open` answers
JUDGE_VERIFY = ("You are a fair evaluator. Given a question, its groundtruth and an answer, output 'Yes' if the "
                "answer aligns with the groundtruth, otherwise 'No'. Output only Yes or No.\n\nQuestion: {q}\n\n"
                "Groundtruth: {gold}\n\nAnswer: {pred}")


def ask_judge(judge, path, items):
    """items: [(id, prompt)] -> {id: reply}. Replies are appended to `path`: a rerun asks only new ones."""
    done = {r["id"]: r["reply"] for _, r in jsonl.read_jsonl(path)} if os.path.exists(path) else {}
    if todo := [(i, p) for i, p in items if i not in done]:
        replies = judge([{"prompt": p, "image": None, "system": None} for _, p in todo], n=1, max_new_tokens=64,
                        temperature=0.0)
        with jsonl.open_output(path)[1] as f:
            for (i, _), reply in zip(todo, replies):
                done[i] = reply[0].strip()
                jsonl.append_jsonl(f, {"id": i, "reply": done[i]})
    return done


def score_benchmark(name, records, responses, judge=None, judge_path=None):
    """-> rows: each record's JSON-able fields + response, extracted, extracted_by (rule/judge/None), correct."""
    bench, rows, replies = BENCHMARKS[name], [], {}
    for rec in records:
        extracted = bench.extract(rec, response := responses[f"{name}/{key(rec)}"])
        rows.append({k: v for k, v in rec.items() if not hasattr(v, "convert")}  # PIL images stay out
                    | {"response": response, "extracted": extracted, "extracted_by": extracted and "rule"})
    if judge is not None:
        schema = name in ("toy", "jsonl")  # there a missing <answer> stays wrong (the paper's format reward)
        ask = [(f"{name}/{key(r)}", JUDGE_EXTRACT.format(q=bench.prompt(r), r=r["response"][-4000:]))
               for r in rows if r["extracted"] is None and not schema]
        ask += [(f"{name}/{key(r)}/verify", JUDGE_VERIFY.format(q=r["question"], gold=r["answer"], pred=r["extracted"]))
                for r in rows if schema and r["verifier_type"] == "open" and r["extracted"] is not None]
        replies = ask_judge(judge, judge_path, ask)
    for r in rows:
        if r["extracted"] is None and replies.get(f"{name}/{key(r)}", "NONE").upper() != "NONE":
            r["extracted"], r["extracted_by"] = replies[f"{name}/{key(r)}"], "judge"
        verdict = replies.get(f"{name}/{key(r)}/verify")
        r["correct"] = verdict.lower().startswith("yes") if verdict else bool(bench.is_correct(r, r["extracted"]))
    return rows


def trace_stats(rows):
    """The paper's signs of pseudo reasoning: long responses, aha words, no answer the rules can extract."""
    return {"mean_words": mean(len((r["response"] or "").split()) for r in rows),
            "aha": mean(records.has_aha(r["response"]) for r in rows),
            "no_answer": mean(r["extracted_by"] != "rule" for r in rows)}


# ----------------------------------------------------------------------------------------------------
# Reports and main


def read_scores(run_dir):
    with open(os.path.join(run_dir, "scores.json")) as f:  # a missing file: the error names it
        return json.load(f)


def average_of_six(benchmarks):
    """The leaderboard's Avg: the plain mean of the six primary numbers, only when all six are there."""
    return mean(benchmarks[b]["score"] for b in SIX) if all(b in benchmarks for b in SIX) else None


def table_row(cells):
    return "| " + " | ".join("–" if c is None else c if isinstance(c, str) else f"{c:.1f}" for c in cells) + " |"


def report_table(runs):
    """runs: [(name, scores.json)] -> Markdown: the scores with the paper's rows, then trace statistics."""
    extra = sorted({b for _, s in runs for b in s["benchmarks"] if b not in SIX})
    lines = [table_row(["model"] + [TITLES[b] for b in SIX] + ["Avg"] + [TITLES.get(b, b) for b in extra]),
             "|---" * (len(SIX) + 2 + len(extra)) + "|"]
    lines += [table_row([name, *values] + [None] * len(extra)) for name, values in PAPER.items()]
    for name, s in runs:
        b = s["benchmarks"]
        lines.append(table_row([f"**{name}**"] + [b[x]["score"] if x in b else None for x in SIX]
                               + [average_of_six(b)] + [b[x]["score"] if x in b else None for x in extra]))
    lines += ["", "DynaMath: worst case; WeMath: Score (Strict); the others: accuracy (%).", "",
              table_row(["model", "benchmark", "n", "score", "mean words", "aha words %", "no answer %"]),
              "|---" * 7 + "|"]
    for name, s in runs:
        for bench, b in s["benchmarks"].items():
            t = b["trace"]
            lines.append(table_row([name, TITLES.get(bench, bench), str(b["n"]), b["score"], t["mean_words"],
                                    100 * t["aha"], 100 * t["no_answer"]]))
    return "\n".join(lines)


def load_benchmark(name, args, judge):
    data_dir = args.data_dir
    if name == "toy" and data_dir is None:  # the offline default: a toy test set in RUN_DIR
        import toy

        data_dir = os.path.join(args.out, "toy-data")
        if not os.path.exists(os.path.join(data_dir, "test.jsonl")):
            toy.make_data(data_dir, n=0, test_n=200, seed=0)
    records = BENCHMARKS[name].load(data_dir, args.limit)
    if name in ("toy", "jsonl") and judge is None:  # DESIGN: drop `open` with a count rather than score it 0
        if dropped := sum(r["verifier_type"] == "open" for r in records):
            print(f"{name}: dropped {dropped} open-ended records (no --judge-backend to grade them)")
        records = [r for r in records if r["verifier_type"] != "open"]
    print(f"{name}: {len(records)} questions")
    return records


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        if not argv[1:] or argv[1].startswith("-"):
            raise SystemExit("usage: 06_eval.py report RUN_DIR [RUN_DIR ...]  (runs side by side, paper rows first)")
        print(table := report_table([(os.path.basename(os.path.abspath(d)), read_scores(d)) for d in argv[1:]]))
        return table
    args = parse_args(argv)
    names = [b.strip() for b in args.bench.split(",") if b.strip()]
    if unknown := [b for b in names if b not in BENCHMARKS]:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    args.out = args.out or os.path.join("runs", "eval", os.path.basename(args.model.rstrip("/")))
    if args.backend == "auto":
        args.backend = "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"
    args.batch_size = args.batch_size or (16 if args.backend == "hf" else 512)
    judge = args.judge_backend and backends.make_backend(args.judge_backend, args.judge_model, **(
        {"base_url": args.judge_base_url} if args.judge_backend == "openai" else {}))

    data = {name: load_benchmark(name, args, judge) for name in names}  # bad data fails before the model loads
    generate(args, data)
    responses = {r["id"]: r["response"] for _, r in jsonl.read_jsonl(os.path.join(args.out, "predictions.jsonl"))}

    path = os.path.join(args.out, "scores.json")
    scores = read_scores(args.out) if os.path.exists(path) else {"benchmarks": {}}  # other benchmarks stay
    scores |= {"model": args.model, "settings": {k: vars(args)[k] for k in (
        "backend", "max_new_tokens", "min_pixels", "max_pixels", "no_system_prompt", "judge_backend", "limit")}}
    for name, recs in data.items():
        bench = BENCHMARKS[name]
        rows = score_benchmark(name, recs, responses, judge, os.path.join(args.out, "judge.jsonl"))
        metrics = bench.aggregate(rows)
        scores["benchmarks"][name] = {"score": 100 * metrics[bench.primary], "primary": bench.primary,
                                      "n": len(rows), "metrics": metrics, "trace": trace_stats(rows)}
        jsonl.write_jsonl(os.path.join(args.out, f"scored-{name}.jsonl"), rows)
    scores["avg"] = average_of_six(scores["benchmarks"])
    with open(path, "w") as f:
        json.dump(scores, f, indent=2)
    table = report_table([(os.path.basename(os.path.abspath(args.out)), scores)])
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return scores


if __name__ == "__main__":
    main()
