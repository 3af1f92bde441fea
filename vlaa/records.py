"""The record schema, and the one loader that reads our files and the released VLAA-Thinking files.

A record is one JSON object a line (the README has an example of each kind):

    id, image, question, answer, verifier_type   from the source        (choices, source: optional)
    caption                                      01_caption.py
    reasoning                                    02_distill.py
    response, verified, aha, drop_reason         03_rewrite_verify.py

Every record is checked once, when it is loaded, before any model runs: field types, the gold answer
against its verifier (vlaa.answers), the image's header (it must be an image, not too large, not too
thin), the question's length. A failure names the file, the line, the id and the field; with
skip_bad it is counted and reported instead. Used by every stage.
"""

import os
import re

from vlaa.answers import gold_error
from vlaa.jsonl import read_jsonl

# paper (§4.1, Fig. 4): five verifiers, one per kind of answer
VERIFIER_TYPES = ("digit", "mcq", "math", "iou", "open")
# names seen for the same verifiers in the released GRPO file and third-party loaders (inferred, not documented)
VERIFIER_ALIASES = {
    "digit": "digit", "digits": "digit", "number": "digit", "count": "digit", "counting": "digit",
    "mcq": "mcq", "choice": "mcq", "multiple_choice": "mcq", "multi_choice": "mcq", "option": "mcq",
    "math": "math", "math_verify": "math", "expression": "math", "latex": "math",
    "iou": "iou", "bbox": "iou", "box": "iou", "grounding": "iou",
    "open": "open", "open_ended": "open", "open-ended": "open", "rm": "open", "reward_model": "open",
    "general": "open",
}

# paper (§2 #6, App. A.2): an "aha moment" is any of these, as a substring of the lower-cased text
AHA_WORDS = ("wait", "again", "double-check", "hmm", "mistake", "alternatively", "check", "i should confirm")

MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # decompression-bomb guard: refuse images above 64 Mpx
MAX_ASPECT_RATIO = 200  # Qwen2.5-VL's resize refuses thinner images (smart_resize raises above 200:1)
MAX_QUESTION_CHARS = 32_000  # ~8k tokens; a longer question is a broken record, not a prompt
TEXT_FIELDS = ("id", "image", "question", "answer", "caption", "reasoning", "response", "source")


def has_aha(text, words=AHA_WORDS):
    low = (text or "").lower()
    return any(w in low for w in words)


def normalize_verifier(value, where):
    v = VERIFIER_ALIASES.get(str(value).strip().lower())
    if v is None:
        raise ValueError(f"{where}: unknown verifier_type {value!r}; known: {', '.join(VERIFIER_TYPES)} "
                         f"(aliases: {', '.join(sorted(VERIFIER_ALIASES))})")
    return v


def require(rec, fields, where):
    """Check that `rec` has every field, non-empty; `where` is 'file:line' for the message."""
    for f in fields:
        if rec.get(f) in (None, ""):
            raise ValueError(f"{where}: missing field '{f}' (record has: {', '.join(sorted(rec)) or 'nothing'})")


# ----------------------------------------------------------------------------------------------------
# Images


def check_image(path, where=""):
    """The image's size from its header alone; an error naming the path when it is missing, not an image
    (a text file, a directory), too large or too thin. Only files that pass are ever decoded or sent."""
    from PIL import Image, UnidentifiedImageError

    prefix = f"{where}: " if where else ""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{prefix}image not found: {path}")
    if not os.path.isfile(path):  # a directory, a device, a pipe (reading one could block forever)
        raise ValueError(f"{prefix}not an image: {path} (not a regular file)")
    try:
        with Image.open(path) as im:  # reads only the header
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{prefix}not an image: {path} ({e})") from None
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"{prefix}image too large ({w}x{h} px, limit {MAX_IMAGE_PIXELS} px): {path}")
    if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ValueError(f"{prefix}image too thin ({w}x{h} px, aspect ratio limit {MAX_ASPECT_RATIO}): {path}")
    return w, h


def load_image(path, where=""):
    """Open an image as RGB after check_image; a file that fails to decode is an error naming the path."""
    from PIL import Image

    check_image(path, where)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{f'{where}: ' if where else ''}unreadable image {path}: {e}") from None


# ----------------------------------------------------------------------------------------------------
# Validation, once per record


def _as_text(rec, field, where):
    """Text fields must be strings. An id or a gold answer may be a number (3 -> "3"), a gold box a list of
    four numbers; anything else is an error naming the field."""
    v = rec.get(field)
    if v is None or isinstance(v, str):
        return
    if field in ("id", "answer") and isinstance(v, (int, float)) and not isinstance(v, bool):
        rec[field] = str(v)
    elif field == "answer" and isinstance(v, list) and len(v) == 4 and all(isinstance(x, (int, float)) for x in v):
        rec[field] = "[" + ", ".join(str(x) for x in v) + "]"  # a box given as a JSON list
    else:
        raise ValueError(f"{where}: field '{field}' must be a string, got {type(v).__name__}")


def _quote(text, limit=80):
    """A value for an error message: quoted, and cut short (an id may be anything)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def check_record(rec, where, need=(), image_root=None, gold=True, check_images=True):
    """Validate one record in place (types, required fields, verifier type, gold answer, question length,
    and with check_images the image's header, `image` made absolute against image_root). Raises ValueError
    or FileNotFoundError naming where and the id."""
    _as_text(rec, "id", where)
    if rec.get("id") not in (None, ""):
        where = f"{where} (id {_quote(rec['id'])})"
    for field in TEXT_FIELDS:
        _as_text(rec, field, where)
    require(rec, need, where)
    if rec.get("choices") is not None and not (isinstance(rec["choices"], list)
                                               and all(isinstance(c, (str, int, float)) for c in rec["choices"])):
        raise ValueError(f"{where}: field 'choices' must be a list of strings")
    if len(rec.get("question") or "") > MAX_QUESTION_CHARS:
        raise ValueError(f"{where}: field 'question' is {len(rec['question'])} characters (limit {MAX_QUESTION_CHARS})")
    if rec.get("verifier_type") not in (None, ""):
        rec["verifier_type"] = normalize_verifier(rec["verifier_type"], f"{where}: field 'verifier_type'")
        if gold and rec.get("answer") not in (None, ""):
            why = gold_error(rec)
            if why:
                raise ValueError(f"{where}: field 'answer': {why}")
    if check_images and rec.get("image") not in (None, ""):
        root = image_root or "."
        rec["image"] = rec["image"] if os.path.isabs(rec["image"]) else os.path.join(root, rec["image"])
        check_image(rec["image"], f"{where}: field 'image'")
    return rec


def checked_records(path, rows, check, bad=None):
    """(where, record) for each (line, record) of `rows` that `check(record, where)` accepts; it returns the
    record in our schema. Duplicate ids are errors (a second copy would pass for the first). A refused record
    raises, or with a `bad` list is counted there and left out."""
    seen = set()
    for i, rec in rows:
        where = f"{path}:{i}"
        try:
            rec = check(rec, where)
            if rec["id"] in seen:
                raise ValueError(f"{where}: duplicate id {rec['id']!r}")
        except (ValueError, FileNotFoundError) as e:
            if bad is None:
                raise
            bad.append(str(e))
            continue
        seen.add(rec["id"])
        yield where, rec


# ----------------------------------------------------------------------------------------------------
# The loader: our schema and the released VLAA-Thinking files


def _iter_json_or_jsonl(path, bad=None):
    """The released `.json` files are JSONL despite the extension; accept a JSON array too. Unreadable
    lines are errors, or with a `bad` list counted there (see read_jsonl)."""
    import json

    with open(path, "rb") as f:
        head = f.read(1024).lstrip()
    if not head.startswith(b"["):
        yield from read_jsonl(path, bad)
        return
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            items = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: bad JSON array ({e})") from None
    for i, rec in enumerate(items, 1):
        if isinstance(rec, dict):
            yield i, rec
        elif bad is None:
            raise ValueError(f"{path}: item {i}: expected a JSON object")
        else:
            bad.append(f"{path}: item {i}: expected a JSON object")


def _answer_block(text):
    m = re.search(r"<answer>(.*?)</answer>", text, re.S)
    return m.group(1).strip() if m else None


def _from_released(rec, where):
    """Released VLAA-Thinking record -> our schema. The field names are inferred from the files and
    third-party loaders, not documented: `answer` holds the whole response in the SFT file, `gt` the
    ground truth (else the <answer> block)."""
    out = dict(rec)
    answer = str(rec.get("answer", ""))
    if "<think>" in answer:  # SFT file: `answer` is the whole <think>/<answer> response
        out["response"] = answer
        gold = rec.get("gt") or _answer_block(answer)
    else:  # GRPO file: the ground truth is in `gt` (or `answer`)
        gold = rec.get("gt") or answer or None
    if gold in (None, ""):
        raise ValueError(f"{where}: no ground truth: looked in 'gt', 'answer' and the <answer> block of 'answer'")
    out["answer"] = gold if isinstance(gold, (list, int, float)) else str(gold)
    return out


def load_records(path, fmt="auto", image_root=None, need=("question", "answer"), skip_bad=False):
    """Read a data file into a list of validated records in our schema, with `image` made absolute.

    fmt: "ours", "vlaa" (the released VLAA-Thinking SFT/GRPO files) or "auto" (released when a record
    has `gt` or a `<think>` inside `answer`). Images resolve against `image_root`, else the file's
    folder. A bad record stops the load naming file, line, id and field; with skip_bad it is left out
    and counted (the count and the first reasons are printed).
    """
    root = image_root or os.path.dirname(os.path.abspath(path))

    def ours(rec, where):
        released = fmt == "vlaa" or (fmt == "auto" and ("gt" in rec or "<think>" in str(rec.get("answer", ""))))
        if released:
            rec = _from_released(rec, where)
        rec.setdefault("id", os.path.basename(where))  # the released files may have no id: FILE:LINE stands in
        return check_record(rec, where, ("image",) + tuple(need), root)

    bad = []
    rows = _iter_json_or_jsonl(path, bad if skip_bad else None)
    records = [rec for _, rec in checked_records(path, rows, ours, bad if skip_bad else None)]
    if bad:
        print(f"{path}: skipped {len(bad)} bad record(s) (--skip-bad); first: {bad[0]}")
    return records


# ----------------------------------------------------------------------------------------------------
# python -m vlaa.records check-images DATA [--image-root DIR]: before training, every image a data file names


def check_images(path, image_root=None, show=20):
    """Every record's image checked (check_image) without loading a model -> {folder: [bad paths]}, where the
    folder is the first two parts of the path as the file writes it (coco/train2017, vg/VG_100K, ...), so that
    one missing archive shows as one line. Prints a count per folder and the first `show` problems."""
    root = image_root or os.path.dirname(os.path.abspath(path))
    bad_rows, problems, n = [], {}, 0
    for line, rec in _iter_json_or_jsonl(path, bad_rows):
        image, n = rec.get("image"), n + 1
        if not isinstance(image, str) or not image:
            problems.setdefault("(no image field)", []).append(f"{path}:{line}")
            continue
        try:
            check_image(os.path.join(root, image))
        except (OSError, ValueError) as e:
            problems.setdefault("/".join(image.split("/")[:2]), []).append(str(e))
    print(f"{path}: {n} records, {sum(map(len, problems.values()))} with an image missing or unreadable "
          f"(paths resolved against {root}); {len(bad_rows)} unreadable lines")
    for folder, items in sorted(problems.items()):
        print(f"  {folder}: {len(items)}")
    for message in [m for items in problems.values() for m in items][:show]:
        print(f"    {message}")
    return problems


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vlaa.records", description="check-images: list the images a data "
                                 "file names that are missing or unreadable, before any training (exit status 1)")
    ap.add_argument("command", choices=["check-images"])
    ap.add_argument("data", help="a data file: ours (JSONL) or the released VLAA-Thinking-*.json")
    ap.add_argument("--image-root", default=None, help="folder the image paths are relative to (default: the file's)")
    ap.add_argument("--show", type=int, default=20, help="print the first N problems (default: %(default)s)")
    a = ap.parse_args()
    if not os.path.isfile(a.data):
        raise SystemExit(f"data {a.data}: does not exist")
    raise SystemExit(1 if check_images(a.data, a.image_root, a.show) else 0)
