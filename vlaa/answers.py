"""Reading the value an answer states: an integer, an option, a box, a math expression's spelling.

The verifiers of rewards.py read the gold answer and the model's answer with the SAME function, so a
format accepted on one side is accepted on the other ("3", "three", "\\boxed{3}"; "B", "(b)", "B)").
The record loader uses them too (`gold_error`): a gold answer its verifier could never match is an
error at load, naming the record, before any model runs.

Everything here is plain string work, bounded by MAX_ANSWER_CHARS; nothing is evaluated.
"""

import math
import re
import unicodedata

MAX_ANSWER_CHARS = 2000  # a longer answer is not read: no real answer is that long, and it bounds the work


def unwrap(s):
    """Undo what models wrap short answers in: unicode variants (NFKC: '３' -> '3'), $...$, \\boxed{}, \\text{}."""
    s = re.sub(r"\\(?:boxed|text|textbf|mathrm)\{([^{}]*)\}", r"\1", unicodedata.normalize("NFKC", s))
    return s.strip().strip("$").strip()


# --- integers (digit: CLEVR-Math counting) ------------------------------------------------------

_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?!\w)")
_WORDS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                            "nine", "ten"))}
_NUMBER_WORD = re.compile(r"\b(" + "|".join(_WORDS) + r")\b")


def read_integer(text):
    """The one integer an answer states ("3", "3.", " 3 ", "3 objects", "three", "٣"), else None.
    Two different numbers ("3 or 4") give None, so hedging never pays."""
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", unwrap(text).lower())  # 1,000 -> 1000
    s = _NUMBER_WORD.sub(lambda m: _WORDS[m.group(1)], s)
    values = {float(n) for n in _NUMBER.findall(s)}  # float() reads every script's digits
    if len(values) != 1:
        return None
    value = values.pop()
    return int(value) if math.isfinite(value) and value.is_integer() else None


# --- options (mcq: GeoQA170K, ArxivQA) ----------------------------------------------------------

_PREAMBLE = re.compile(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)(?:\s+is)?\s*:?\s*", re.IGNORECASE)
# "(a)" or "(A)"; a capital alone or before . ) : ("A", "A)", "A. text"); a small letter only alone or
# before . ) ("a cat" is words, not option A)
_LETTER = re.compile(r"\(([A-Za-z])\)|([A-Z])(?:[.):]|\s*$)|([a-z])(?:[.)]|\s*$)")
_LABEL = re.compile(r"\(?([A-Za-z])\s*[.):]\s*")


def _clean(s):
    return " ".join(unwrap(s).casefold().split()).rstrip(".")


def option_texts(choices):
    """The options' texts without a label that repeats their place ("B. 3 cm" at index 1 -> "3 cm")."""
    texts = []
    for i, c in enumerate(choices or []):
        label = _LABEL.match(str(c))
        own = label and label.group(1).upper() == chr(ord("A") + i)
        texts.append(_clean(str(c)[label.end():] if own else str(c)))
    return texts


def read_option(text, choices=None):
    """The option index (A = 0) an answer picks: by its letter, else by the option's text; else None.
    paper (App. C.1): ArxivQA's letters came as "A", "A)", "(a)", ...; all of them read as the same option."""
    s = _PREAMBLE.sub("", unwrap(text))
    m = _LETTER.match(s)
    if m:
        index = ord((m.group(1) or m.group(2) or m.group(3)).upper()) - ord("A")
        return index if not choices or index < len(choices) else None
    texts = option_texts(choices)
    return texts.index(_clean(s)) if _clean(s) in texts else None


# --- boxes (iou: LLaVA-CoT grounding) -----------------------------------------------------------

_FLOAT = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?!\w)")


def read_box(text, image_size=None):
    """(x1, y1, x2, y2) in [0, 1] from the first four numbers, which reads "[x1, y1, x2, y2]",
    "(x1, y1), (x2, y2)" and JSON ({"bbox_2d": [...]}; the digits in keys like "x1" are not numbers).
    All <= 1: normalised, else pixels of image_size (w, h): for Qwen2.5-VL the size the model saw,
    after resizing. None if malformed, not finite, degenerate (x2 <= x1 or y2 <= y1), or pixels with no size."""
    numbers = [float(n) for n in _FLOAT.findall(unicodedata.normalize("NFKC", text))[:4]]
    if len(numbers) < 4 or not all(math.isfinite(v) for v in numbers):
        return None
    if max(numbers) > 1.0:
        if not image_size or not all(isinstance(v, (int, float)) and 0 < v < math.inf for v in image_size):
            return None
        numbers = [v / image_size[i % 2] for i, v in enumerate(numbers)]
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in numbers)  # clip to the image
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def box_image_size(sample):
    """The image size [w, h] a sample gives for pixel boxes: `image_size`, or `width` and `height`."""
    return sample.get("image_size") or (sample.get("width"), sample.get("height"))


# --- math spelling (math: Math PUMA) ------------------------------------------------------------

def canon_math(s):
    """Spelling-only normalisation: equal canonical strings are surely equal answers (no sympy needed)."""
    s = re.sub(r"\\left|\\right|\\[,;! ]|\s|\$", "", unicodedata.normalize("NFKC", s))
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")


# --- the gold check the record loader runs ------------------------------------------------------

def gold_error(rec):
    """Why the gold answer of a record can never be matched by its verifier, or None when it can.
    `rec` has `answer` and a normalised `verifier_type` (and `choices`, `image_size` where they apply)."""
    vtype, gold = rec.get("verifier_type"), rec.get("answer")
    if not isinstance(gold, str) or not gold.strip():
        return "empty"
    if len(gold) > MAX_ANSWER_CHARS:
        return f"longer than {MAX_ANSWER_CHARS} characters"
    if vtype == "digit" and read_integer(gold) is None:
        return f"digit answer {gold!r} is not one integer"
    if vtype == "mcq" and read_option(gold, rec.get("choices")) is None:
        return f"mcq answer {gold!r} is neither an option letter nor one of the choices"
    if vtype == "iou" and read_box(gold, box_image_size(rec)) is None:
        return f"iou answer {gold!r} is not a box [x1, y1, x2, y2] (pixel boxes need image_size)"
    return None
