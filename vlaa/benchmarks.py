"""The answer rules of the six benchmarks of 06_eval.py: VLMEvalKit's as of 2025-04-07 (commit d9fe347b, which
made the leaderboard of the paper's Table 4) and each benchmark's own repository's (docs/eval.md). Per benchmark
and rule set: extract(record, text) -> the answer the text states by itself, or None (then a judge, if any, is
asked); is_correct(record, answer) -> bool. Each cites the code it follows; model output is parsed, never run.
"""

import json
import math
import re

from vlaa.parsing import (
    bare_number,
    can_infer,
    edit_distance,
    formula,
    letter_set,
    mathv_answer,
    mathv_equal,
    numeric_value,
    to_float,
)

# ----------------------------------------------------------------------------------------------------
# Shared readers


def answer_block(response):
    """VLMEvalKit vlm/vlaa_thinker.py extract_response_for_eval: the one <answer> block, else the whole response."""
    response, blocks = response or "", []
    start = response.find("<answer>")
    while start >= 0:  # as re.findall("<answer>(.*?)</answer>"), in one pass
        end = response.find("</answer>", start + 8)
        if end < 0:
            break
        blocks.append(response[start + 8:end])
        start = response.find("<answer>", end + 9)
    return blocks[0].strip() if len(blocks) == 1 else response


def lettered(options):  # ["3", "45"] -> {"A": "3", "B": "45"}
    return {chr(65 + i): str(text) for i, text in enumerate(options or [])}


# ----------------------------------------------------------------------------------------------------
# MathVista (testmini). VLMEvalKit vlmeval/dataset/utils/mathvista.py; official lupantech/MathVista
# evaluation/extract_answer.py and evaluation/calculate_score.py


def mathvista_extract(rec, text):
    """Multiple choice: the option can_infer finds (VLMEvalKit's prefetch); free form: one number, or a [list]."""
    if rec["question_type"] == "multi_choice":
        return can_infer(text, lettered(rec["choices"]))
    if rec["answer_type"] == "list":
        s = text.strip().strip("$").strip()
        return s if re.fullmatch(r"\[[^\[\]]*\]", s) else None
    return bare_number(text)


def mathvista_vlmevalkit(rec, answer):
    """post_check: the letter can_infer reads, compared with the gold's letter; integers int(x) == int(gold)
    ("3.0" is not an integer there); floats float(x) == float(gold), exactly (no rounding to the precision);
    lists are never right (post_check compares str(None))."""
    if answer is None:
        return False
    if rec["question_type"] == "multi_choice":
        choices = [str(c) for c in rec["choices"]]
        gold = chr(65 + choices.index(str(rec["answer"]))) if str(rec["answer"]) in choices else None
        return can_infer(answer, lettered(choices)) == gold
    if rec["answer_type"] == "integer":
        return re.fullmatch(r"\s*[-+]?\d+\s*", str(answer)) is not None and int(answer) == int(rec["answer"])
    if rec["answer_type"] == "float":
        return to_float(answer) is not None and to_float(answer) == to_float(rec["answer"])
    return False


def mathvista_official(rec, answer):
    """normalize_extracted_answer, then string equality: a letter (or "(B) ...") maps to its choice text, any
    other answer (even none) to the nearest choice by edit distance; integers str(int(float(x))); floats rounded
    to the item's precision; lists as written."""
    if rec["question_type"] == "multi_choice":
        answer = "" if answer is None else str(answer).strip()  # official: an empty extraction still gets a choice
        choices = [str(c) for c in rec["choices"]]
        letter = re.findall(r"\(([a-zA-Z])\)", answer)
        answer = letter[0].upper() if letter else answer
        if answer in [chr(65 + i) for i in range(len(choices))]:
            return choices[ord(answer) - 65] == rec["answer"]
        distances = [edit_distance(answer, c) for c in choices]
        return choices[distances.index(min(distances))] == rec["answer"]
    value = to_float(answer)
    if rec["answer_type"] == "integer":
        return value is not None and str(int(value)) == rec["answer"]
    if rec["answer_type"] == "float":
        if value is None or rec.get("precision") is None:  # the official round(x, int(None)) raises: wrong
            return False
        return str(round(value, int(rec["precision"]))) == rec["answer"]
    return answer is not None and str(answer) == rec["answer"]


# ----------------------------------------------------------------------------------------------------
# MathVision (test). VLMEvalKit vlmeval/dataset/utils/mathv.py; official mathllm/MATH-V evaluation/evaluate.py
# and evaluation/utils.py


def mathvision_extract(rec, text):
    """Multiple choice: the option can_infer finds. Free form: a number or formula the text is by itself."""
    if rec.get("options"):
        return can_infer(text, lettered(rec["options"]))
    return formula(text)


def vlmevalkit_equal(answer, gold):
    """mathv.py is_equal: the same text, lower case; else the same value within 1e-6 (its eval() and latex2sympy,
    which run without math's sqrt and pi)."""
    a, g = str(answer).lower().strip(), str(gold).lower().strip()
    if a == g:
        return True
    va, vg = numeric_value(a, irrational=False), numeric_value(g, irrational=False)
    return va is not None and vg is not None and abs(va - vg) < 1e-6


def mathvision_vlmevalkit(rec, answer):
    """post_check: the letter can_infer reads against the gold letter; free form is_equal."""
    if answer is None:
        return False
    if rec.get("options"):
        return vlmevalkit_equal(can_infer(answer, lettered(rec["options"])), rec["answer"])
    return vlmevalkit_equal(answer, rec["answer"])


def mathvision_official_extract(rec, text):
    return mathv_answer(text)


def mathvision_official(rec, answer):
    """evaluate.py: is_equal(gold, answer) or is_equal(the gold option's text, answer): an option's value counts."""
    if answer is None:
        return False
    gold, options = str(rec["answer"]), rec.get("options") or []
    value = options[ord(gold) - 65] if options and len(gold) == 1 and 0 <= ord(gold) - 65 < len(options) else ""
    return mathv_equal(answer, gold) or mathv_equal(answer, value)


# ----------------------------------------------------------------------------------------------------
# LogicVista (test). VLMEvalKit vlmeval/dataset/utils/logicvista.py; official Yijia-Xiao/LogicVista
# eval/extract_accuracy.py. Both always ask an LLM which options the answer chose.


def logicvista_extract(rec, text):
    """The options the text lists ("B, D", "BD", "(B) and (D)", "3"), else the one letter alone in it: "B, D"."""
    letters = letter_set(text)
    if letters is None:
        letters = can_infer(text, dict.fromkeys("ABCDEFGH", ""))
    return ", ".join(letters) if letters else None


def _items(text):
    return sorted(x.strip().lower() for x in str(text).split(","))


def logicvista_vlmevalkit(rec, answer):
    """LogicVista_auxeval: the judge's reply must be capital letters only ("BD"), and sorted they must equal the
    gold's split on ", " ("B, D" -> "bd"; "B,D" -> "b,d", never right). So is a digit gold ("3") or an empty one."""
    reply = re.sub(r"[,\s]", "", answer or "")
    if not (reply.isalpha() and reply.isupper()):
        return False
    return "".join(sorted(reply.lower())) == "".join(sorted(a.lower() for a in str(rec["answer"]).split(", ")))


def logicvista_official(rec, answer):
    """extract_accuracy.py: the chosen letters or numbers, lower case and sorted, equal to the gold's list."""
    return answer is not None and _items(answer) == _items(rec["answer"])


# ----------------------------------------------------------------------------------------------------
# MathVerse (testmini, Vision Only). VLMEvalKit vlmeval/dataset/utils/mathverse.py; official ZrrSkywalker/MathVerse
# evaluation/extract_answer_s1.py and score_answer_s2.py. Both: an LLM extracts, then exact match, else an LLM grades.


def mathverse_extract(rec, text):
    """Multiple choice: the letters the text lists ("C", "C, D"); free form: a number or formula."""
    if rec["question_type"] == "multi-choice":
        letters = letter_set(text, "ABCDEF")
        return ", ".join(letters) if letters else None
    return formula(text)


def mathverse_exact(rec, answer):
    """post_check_score (and the official --quick_match): the extracted answer equals the gold, stripped."""
    return answer is not None and str(answer).strip() == str(rec["answer"]).strip()


def _plain_value(text):
    """The number of an answer with its label and unit dropped: "Area $=113.1 \\mathrm{~cm}^{2}$" -> 113.1."""
    s = re.sub(r"\\(?:mathrm|text)\s*\{[^{}]*\}(?:\^\{?\d\}?)?|\^\s*\{?\\circ\}?|°|~", " ", str(text).split("=")[-1])
    s = s.strip().strip("$")[:100]
    return numeric_value(re.sub(r"(?<![\\a-zA-Z])[\sa-zA-Z.]+(?:\^\s*\{?\d\}?)?\s*\$?\s*$", "", s))


def mathverse_grade(rec, answer, math_reward=None):
    """Our stand-in for the judge's grading, used only without a judge: multiple choice, the same set of letters
    (the gold "C\\nD" needs both); free form, the same value once labels and units are dropped, else
    `math_reward(answer, gold)` >= 1 (rewards.py's math-verify) when given."""
    if answer is None:
        return False
    if rec["question_type"] == "multi-choice":
        gold = letter_set(str(rec["answer"]), "ABCDEF")
        return gold is not None and letter_set(str(answer), "ABCDEF") == gold
    a, g = _plain_value(answer), _plain_value(rec["answer"])
    if a is not None and g is not None:
        return abs(a - g) <= 1e-6 * max(1.0, abs(g))
    return bool(math_reward and math_reward(str(answer), str(rec["answer"]).strip("$ ")) >= 1.0)


# ----------------------------------------------------------------------------------------------------
# DynaMath (501 seeds x 10 variants). VLMEvalKit vlmeval/dataset/dynamath.py; official DynaMath/DynaMath
# evaluation/opensource_json_eval.py. The model is asked for {"solution": ..., "short answer": ...}.


def _short_answer(text, official=False):
    """The JSON's "short answer", read as both codes do: the outermost {...}, backslashes dropped, json.loads.
    -> (the text as preprocessed, the short answer as text, or None when the JSON cannot be read)."""
    s = str(text)
    if 0 <= s.find("{") < s.rfind("}"):
        s = s[s.find("{"):s.rfind("}") + 1]
    s = s.replace("\\", "")
    try:
        obj = json.loads(s, strict=False)
    except (ValueError, RecursionError):  # RecursionError: brackets nested thousands deep
        return s, None
    if not isinstance(obj, dict) or (obj.get("short answer") is None and not official):
        return s, None
    return s, str(obj.get("short answer"))  # str(...), "None" when missing (official); unstripped in both


def _dynamath_value(answer):  # transfer(): the first word as a float, "2π" meaning 2 * pi; else None
    first = answer if answer.isdigit() else answer.split(" ")[0]
    try:
        return float(first.split("π")[0]) * math.pi if "π" in first else float(first)
    except ValueError:
        return None


def dynamath_parse(answer, kind):
    """VLMEvalKit parse_answer: float -> the value; multiple choice -> the letter ("b" -> "B", or the one of A-E
    in the text); other kinds -> the text itself. None when it cannot be read."""
    if kind == "float":
        value = _dynamath_value(answer)
        return None if value is None else repr(value)
    if kind == "multiple choice":
        if len(answer) == 1:
            return answer.upper()
        letters = [c for c in "ABCDE" if c in answer.upper()]
        return letters[0] if len(letters) == 1 else None
    return answer


def dynamath_extract(rec, text):
    """VLMEvalKit DynaMath_auxeval: the JSON's short answer read by its type; if that fails, the whole text read
    the same way (so a bare "3.142" or "B" counts); None -> the judge."""
    s, short = _short_answer(text)
    if short == "":
        return None  # VLMEvalKit counts an empty short answer inside any text gold; ours asks the judge
    parsed = dynamath_parse(short, rec["answer_type"]) if short is not None else None
    return parsed if parsed is not None else dynamath_parse(s, rec["answer_type"]) or None


def dynamath_vlmevalkit(rec, answer):
    """Floats within 0.001; a letter equal to the gold; any other kind: the answer inside the gold, lower case
    ("odd" in "Odd", and "5" in "5.000000000000001")."""
    if answer is None:
        return False
    gold, kind = str(rec["ground_truth"]), rec["answer_type"]
    if kind == "float":
        value = _dynamath_value(str(answer))
        return value is not None and abs(value - float(gold)) <= 0.001
    if kind == "multiple choice":
        return str(answer) == gold
    return str(answer).lower() in gold.lower()


def dynamath_official_extract(rec, text):
    """opensource_json_eval.py: the JSON's short answer, else the text's last line less its last character."""
    s, short = _short_answer(text, official=True)
    return short if short is not None else s.split("\n")[-1][:-1]


def dynamath_official(rec, answer):
    """Floats (and the hub's "int" items, floats in the official data) within 0.001; multiple choice: one
    character equal to the gold (case counts), else the gold among the first three; text: the gold inside the
    answer, case-sensitive."""
    if answer is None:
        return False
    gold, answer = str(rec["ground_truth"]), str(answer)
    if rec["answer_type"] in ("float", "int"):
        value = _dynamath_value(answer)
        return value is not None and abs(value - float(gold)) <= 0.001
    if rec["answer_type"] == "multiple choice":
        return answer == gold if len(answer) == 1 else gold in answer[:3]
    return gold in answer


# ----------------------------------------------------------------------------------------------------
# WeMath (testmini). VLMEvalKit vlmeval/dataset/image_mcq.py WeMath and utils/multiple_choice.py; official
# We-Math/We-Math evaluation/four_dimensional_metrics.py


def wemath_options(option):
    """The official one-string `option` -> {letter: text}: "A. 300;B. 400; E. No correct answer". A letter starts
    an option only after ";" (or at the start), with "." or "．", and later in the alphabet than the one before:
    "B．②" is option B, and "point ;O." or a stray ";B." inside option C's text is not a new option."""
    starts = []
    for m in re.finditer(r"(?:^|;)\s*([A-H])\s*[.．]", option):
        if not starts or m.group(1) > starts[-1][0]:
            starts.append((m.group(1), m.start(), m.end()))
    ends = [start for _, start, _ in starts[1:]] + [len(option)]
    return {letter: option[end:stop].strip().rstrip(";").strip() for (letter, _, end), stop in zip(starts, ends)}


def wemath_extract(rec, text):  # VLMEvalKit: the option can_infer finds, else the judge
    return can_infer(text, wemath_options(rec["option"]))


def wemath_vlmevalkit(rec, answer):
    return answer is not None and can_infer(answer, wemath_options(rec["option"])) == rec["answer"]


def wemath_official_extract(rec, text):
    """four_dimensional_metrics.py: after the last "Answer" (the prompt asks for "<Answer>: <<B>>"), without
    > < : . characters, the first character when it is A-H."""
    s = re.sub(r"[><:.]", "", text.split("Answer")[-1].strip()).strip()
    return s[0] if s and s[0] in "ABCDEFGH" else None


def wemath_official(rec, answer):
    return answer is not None and answer == rec["answer"]
