"""Reading answers without evaluating them: option letters, numbers, LaTeX values. Used by vlaa/benchmarks.py.

    can_infer("The answer is B", {"A": "3", "B": "45"})  -> "B"      VLMEvalKit's letter matcher (April 2025)
    letter_set("(B) and (D)")                            -> "BD"     the options an answer lists, nothing else
    bare_number("x = 12 cm")                             -> "12"     a text that is one number (with a unit)
    formula("$\\frac{1}{2}$")                             -> "\\frac{1}{2}"  a short answer, no words
    numeric_value("2\\sqrt{3}")                            -> 3.464    LaTeX or arithmetic, read by hand

    mathv_answer("... the answer is $\\boxed{\\frac{1}{2}}$.")  -> "\\frac{1}{2}"  MATH-V's own extraction
    mathv_equal("0.5", "\\frac{1}{2}")                  -> True     MATH-V's is_equal, values to 2 places

Model output is only ever parsed here: the official scorers call Python's eval() on it, we never do.
"""

import math
import re
import unicodedata
from fractions import Fraction

REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")


def can_infer(answer, choices):
    """VLMEvalKit vlmeval/utils/matching_util.py can_infer (April 2025): the option an answer names.
    choices: {letter: option text}. A letter that stands alone once among the words (punctuation
    .()[],:;!*#{} counts as space) wins: "The answer is B", "B. 45", "(B)". Several letters, or none: the one
    option whose text is inside the answer (lower case). A refusal, or a lone "Z": "Z". Else None."""
    answer = str(answer)
    if any(refusal in answer for refusal in REFUSALS):
        return "Z"
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", answer).split()
    named = [letter for letter in choices if letter in words]
    if len(named) == 1:
        return named[0]
    if not named and "Z" in words:
        return "Z"
    inside = [letter for letter, text in choices.items() if str(text).lower() in answer.lower()]
    return inside[0] if len(inside) == 1 else None


def letter_set(text, allowed="ABCDEFGHIJ"):
    """The options an answer lists when it lists nothing else: "B", "B, D", "BD", "(B) and (D)", "Option B",
    "3" -> sorted letters (and digits); a sentence -> None."""
    words = re.sub(r"[.()\[\],:;!*#{}&/]|\band\b|\b(?:[Oo]ptions?|[Cc]hoices?|[Aa]nswer)\b|\bis\b", " ", text).split()
    if not words or len(words) > len(allowed):
        return None
    if len(words) == 1 and re.fullmatch(f"[{allowed}]+", words[0]):  # "BD"
        words = list(words[0])
    if not all(len(w) == 1 and (w in allowed or w.isdigit()) for w in words):
        return None
    return "".join(sorted(set(words)))


_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+"
_UNIT = r"%|°|\^\\circ|\^\{\\circ\}|[A-Za-z][A-Za-z ]{0,15}"
_BARE = re.compile(rf"(?:[A-Za-z]\w*\s*=\s*)?\$?\s*({_NUMBER})\s*(?:{_UNIT})?\.?")


def bare_number(text):
    """The number a text is, with at most a unit: "12", "-3.5", "1,234", "x = 3", "12 cm", "$3.50", "45%", "45°".
    Not "1:4", "40-50", "3 or 4", "about 12": those are not one number (the official int(float(x)) rejects
    them too). Returns the number as written (commas dropped), or None."""
    s = unicodedata.normalize("NFKC", str(text)).strip().strip("$").strip()
    if len(s) > 100:  # a sentence, not a number (and the regex stays linear)
        return None
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r" \1", s).strip()
    m = _BARE.fullmatch(s)
    return m.group(1).replace(",", "") if m else None


def to_float(text):
    """float(text) when it is a finite number, else None."""
    try:
        value = float(text)
    except (TypeError, ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


_TOKEN = re.compile(r"\\%|\\[a-zA-Z]+|\*\*|\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+"
                    r"|[-+*/^:(){}\[\].$]|[a-zA-Z]|\s+")
_COMMANDS = ("\\frac", "\\dfrac", "\\tfrac", "\\sqrt", "\\pi", "\\cdot", "\\times", "\\div", "\\%")
_IGNORED = ("\\left", "\\right", "\\displaystyle", "$")
_CLOSE = {"(": ")", "[": "]", "{": "}"}


def _tokens(s):
    """The tokens of a LaTeX or arithmetic number, as latex2sympy's lexer reads them: a letter or another command
    is a variable "?", and a character it does not know (",", "~", "°", "π") makes the whole text unreadable."""
    out, pos = [], 0
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if m is None:
            return ["?"]
        pos, tok = m.end(), m.group()
        if tok.isalpha() or (tok.startswith("\\") and tok not in _COMMANDS + _IGNORED):  # a variable
            tok = "?"
        if not tok.isspace() and tok not in _IGNORED:
            out.append(tok.replace(",", ""))
    return out + ["end"]


def numeric_value(text, irrational=True):
    """The value of a number written as arithmetic or simple LaTeX: "3/4", "1:2", "2^3", "\\frac{1}{2}", "50\\%",
    "2\\sqrt{3}", "4\\pi", "$\\frac{3^{1008}-1}{3^{1009}}$" (exact fractions, floats only for roots and pi).
    Read by hand, never evaluated as code; variables and words -> None. It stands in for the eval() and latex2sympy
    of the official code, including their habit of reading "\\frac{1}{4}}.the answer is" as 1/4.
    irrational=False: roots and pi -> None (VLMEvalKit evaluates without math's sqrt and pi)."""
    if len(str(text)) > 300:
        return None
    tokens, at = _tokens(str(text)), 0

    def take(expected=None):
        nonlocal at
        tok = tokens[at]
        if tok == "end" or (expected is not None and tok != expected):
            raise ValueError(tok)
        at += 1
        return tok

    def group():  # {x}, or one atom: the argument of \frac and \sqrt
        if tokens[at] == "{":
            take("{")
            value = expr()
            take("}")
            return value
        return atom()

    def atom():
        tok = take()
        if tok in _CLOSE:
            value = expr()
            take(_CLOSE[tok])
            return value
        if tok in ("\\frac", "\\dfrac", "\\tfrac"):
            numerator = group()
            return numerator / group()
        if tok in ("\\sqrt", "\\pi") and not irrational:
            raise ValueError("irrational")
        if tok == "\\sqrt":
            return math.sqrt(group())
        if tok == "\\pi":
            return math.pi
        return Fraction(tok)  # "?" (a variable) raises ValueError

    def power():
        base = atom()
        while tokens[at] == "\\%":
            take()
            base = base / 100
        if tokens[at] not in ("^", "**"):
            return base
        take()
        exponent = group() if tokens[at] in ("{", "(") else signed(atom)
        if isinstance(base, Fraction) and exponent == int(exponent) and abs(exponent) * math.log2(abs(base) + 2) < 8000:
            return base ** int(exponent)
        return float(base) ** float(exponent)

    def signed(read):
        if tokens[at] in ("-", "+"):
            return -read() if take() == "-" else read()
        return read()

    def term():
        value = signed(power)
        while True:
            if tokens[at] in ("*", "/", ":", "\\cdot", "\\times", "\\div"):
                op = take()
                rhs = signed(power)
                value = value / rhs if op in ("/", ":", "\\div") else value * rhs
            elif tokens[at] not in ("end", ".", ")", "]", "}", "+", "-"):  # implicit product: 2\sqrt{3}, 4\pi
                value = value * power()
            else:
                return value

    def expr():
        value = term()
        while tokens[at] in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    try:
        value = float(expr())
    except (ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None
    return value if math.isfinite(value) else None


def edit_distance(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def formula(text):
    """A text that is itself a short answer: a number or a formula, no words outside LaTeX commands."""
    s = str(text).strip().strip("$").strip().rstrip(".").strip()
    if not s or len(s) > 80 or "\n" in s or re.search(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}", re.sub(r"\\[a-zA-Z]+", "", s)):
        return bare_number(text)
    return s


# ----------------------------------------------------------------------------------------------------
# MATH-V's reader (mathllm/MATH-V evaluation/evaluate.py and utils.py), used by its official rules


def _mathv_tuple(s):
    """MATH-V utils.py eval_tuple: "(a, b)" with each part's value rounded to 2 places, else s unchanged."""
    parts = s[1:-1].split(",")
    if len(parts) < 2 or (s[:1], s[-1:]) not in (("(", ")"), ("[", "]")):
        return s
    out = []
    for part in parts:
        if "infty" in part or part in ("a", "-a"):
            out.append(part)
            continue
        value = numeric_value(part)
        if value is None:
            return s
        value = round(value, 2)
        out.append(str(int(value)) if value.is_integer() and "." not in part else str(value))
    return s[0] + ",".join(out) + s[-1]


def mathv_equal(answer, gold):
    """MATH-V utils.py is_equal: lower case; empty is wrong; same text; same tuple; else the same value to 2 places."""
    a, g = str(answer).lower(), str(gold).lower()
    if not a.replace(" ", "") or not g.replace(" ", ""):
        return False
    if a.strip() == g.strip():
        return True
    a, g = _mathv_tuple(a), _mathv_tuple(g)
    if a == g:
        return True
    va, vg = numeric_value(a), numeric_value(g)
    return va is not None and vg is not None and round(va, 2) == round(vg, 2)


_MATHV_CLEAN = ((" ", ""), ("\\,", ""), ("∞", "\\infty"), ("+\\infty", "\\infty"), ("\\\\", "\\"), ("\n", ""),
                ("\\text", ""), ("\\mbox", ""), ("bmatrix", "pmatrix"), ("\\left", ""), ("\\right", ""),
                ("^{\\circ}", ""), ("^\\circ", ""), ("{m}^3", ""), ("m^3", ""), ("{units}", ""), ("units", ""),
                ("{km}", ""), ("km", ""), ("\\!", ""), ("tfrac", "frac"), ("dfrac", "frac"), ("\\$", ""), ("$", ""))


def mathv_answer(text):
    """MATH-V evaluate.py: a letter ending (" C.", " (C).") or starting ("C\\n") the text; the number after its last
    "is "; else the first line after "the answer is" (or "the final answer is", ...); then utils.py
    find_math_answer: the last \\boxed{}, what follows the last "=", LaTeX and units dropped, lower case."""
    s = text.strip()
    for c in "ABCDE":
        if s.endswith((f" {c}.", f" ({c}).")) or s.startswith((f"{c}\n", f"({c})\n", f"({c}) {c}\n")):
            s = c
    try:
        float(s.split("is ")[-1].rstrip("."))
        s = s.split("is ")[-1].rstrip(".")
    except ValueError:
        pass
    if "oxed{" not in s:
        for flag in ("the final answer is", "the answer is", "the correct answer is", "the answer should be"):
            for phrase in (flag, flag.replace("the", "The")):
                if phrase in s:
                    s = s.split(phrase)[-1].strip().split("\n")[0].split(". ")[0]
    elif s.count("oxed{") > 1:
        s = "\\boxed{" + s.split("oxed{")[-1]
    s = s.lower().replace("{}", "")
    boxed = re.findall(r"oxed{(.*)}", s, re.S)  # greedy: to the last "}"
    s = boxed[-1] if boxed else s
    if "}" in s and ("{" not in s or s.find("}") < s.find("{")):
        s = s.split("}")[0]
    s = s.split("=")[-1].split("\\approx")[-1]
    for old, new in _MATHV_CLEAN:
        s = s.replace(old, new)
    s = s.replace("\\%", "").replace("{.", "{0.")
    s = "0" + s if s.startswith(".") else s
    for c in "abcde":
        s = s.replace(f"({c})", c).replace(f"{{{c}}}", c)
    return s.rstrip(".").lstrip(":").strip() or None
