"""The record schema, and the one loader that reads our files and the released VLAA-Thinking files (and the
rows of 06's local benchmark copies, checked the same way).

A record is one JSON object a line (the README has an example of each kind):

    id, image, question, answer, verifier_type   from the source        (choices, source: optional)
    caption                                      01_caption.py
    reasoning                                    02_distill.py
    response, verified, aha, drop_reason         03_rewrite_verify.py

Every record is checked once, when it is loaded, before any model runs: field types, the gold answer
against its verifier (vlaa.answers), the image (vlaa.images: an image, not too large, not too thin, decoded
in full, so a file cut short is found here and not mid-training), the question's length. A failure names
the file, the line, the id and the field; with skip_bad it is counted and reported instead. Used by every
stage.
"""

import functools
import os
import re

from vlaa.answers import gold_error
from vlaa.images import check_image
from vlaa.jsonl import InputError, parse_json, read_jsonl, write_jsonl

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

MAX_QUESTION_CHARS = 32_000  # ~8k tokens; a longer question is a broken record, not a prompt
TEXT_FIELDS = ("id", "image", "question", "answer", "caption", "reasoning", "response", "source")


def has_aha(text, words=AHA_WORDS):
    low = (text or "").lower()
    return any(w in low for w in words)


def normalize_verifier(value, where):
    v = VERIFIER_ALIASES.get(str(value).strip().lower())
    if v is None:
        raise InputError(f"{where}: unknown verifier_type {value!r}; known: {', '.join(VERIFIER_TYPES)} "
                         f"(aliases: {', '.join(sorted(VERIFIER_ALIASES))})")
    return v


def require(rec, fields, where):
    """Check that `rec` has every field, non-empty; `where` is 'file:line' for the message."""
    for f in fields:
        if rec.get(f) in (None, ""):
            raise InputError(f"{where}: missing field '{f}' (record has: {', '.join(sorted(rec)) or 'nothing'})")


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
        raise InputError(f"{where}: field '{field}' must be a string, got {type(v).__name__}")


def _quote(text, limit=80):
    """A value for an error message: quoted, and cut short (an id may be anything)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def check_record(rec, where, need=(), image_root=None, gold=True, check_images=True):
    """Validate one record in place (types, required fields, verifier type, gold answer, question length,
    and with check_images the image, decoded in full, `image` made absolute against image_root). Raises InputError
    or FileNotFoundError naming where and the id."""
    _as_text(rec, "id", where)
    if rec.get("id") not in (None, ""):
        where = f"{where} (id {_quote(rec['id'])})"
    for field in TEXT_FIELDS:
        _as_text(rec, field, where)
    require(rec, need, where)
    if rec.get("choices") is not None and not (isinstance(rec["choices"], list)
                                               and all(isinstance(c, (str, int, float)) for c in rec["choices"])):
        raise InputError(f"{where}: field 'choices' must be a list of strings")
    if len(rec.get("question") or "") > MAX_QUESTION_CHARS:
        raise InputError(f"{where}: field 'question' is {len(rec['question'])} characters (limit {MAX_QUESTION_CHARS})")
    if rec.get("verifier_type") not in (None, ""):
        rec["verifier_type"] = normalize_verifier(rec["verifier_type"], f"{where}: field 'verifier_type'")
        if gold and rec.get("answer") not in (None, ""):
            why = gold_error(rec)
            if why:
                raise InputError(f"{where}: field 'answer': {why}")
    if check_images and rec.get("image") not in (None, ""):
        root = image_root or "."
        rec["image"] = rec["image"] if os.path.isabs(rec["image"]) else os.path.join(root, rec["image"])
        check_image(rec["image"], f"{where}: field 'image'")
    return rec


def checked_records(path, rows, check, bad=None, unique=True):
    """(where, record) for each (line, record) of `rows` that `check(record, where)` accepts; it returns the
    record in our schema. With unique, duplicate ids are errors (a second copy would pass for the first). A
    refused record raises, or with a `bad` list is counted there and left out."""
    seen = set()
    for i, rec in rows:
        where = f"{path}:{i}"
        try:
            rec = check(rec, where)
            if unique and rec["id"] in seen:
                raise InputError(f"{where}: duplicate id {rec['id']!r}")
        except (ValueError, FileNotFoundError) as e:
            if bad is None:
                raise
            bad.append(str(e))
            continue
        seen.add(rec.get("id"))
        yield where, rec


def check_benchmark_row(rec, where, fields, image_fields=("image",), root="."):
    """One row of a local benchmark copy (06 --data-dir), checked as records are: the benchmark's fields present
    (maybe empty: LogicVista has an empty gold), every text field (a list: its items together) at most
    MAX_QUESTION_CHARS, whichever of image_fields holds the image path decoded in full (vlaa.images). Returns
    the row with that path, made absolute against root, in `image`; errors name where and the field."""
    missing = [f for f in fields if f not in rec]
    if missing:
        raise InputError(f"{where}: missing field '{missing[0]}' (record has: {', '.join(sorted(rec))})")
    for field, value in rec.items():
        items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        chars = sum(len(str(v)) for v in items)
        if chars > MAX_QUESTION_CHARS:  # any of them may go into the prompt
            raise InputError(f"{where}: field '{field}' is {chars} characters (limit {MAX_QUESTION_CHARS})")
    field = next((f for f in image_fields if isinstance(rec.get(f), str) and rec[f]), None)
    if field is None:
        raise InputError(f"{where}: missing field 'image' (a path in {' or '.join(map(repr, image_fields))})")
    image = rec[field] if os.path.isabs(rec[field]) else os.path.join(root, rec[field])
    check_image(image, f"{where}: field '{field}'")
    return rec | {"image": image}


SHOWN_SKIPPED = 5  # reasons printed; the file holds all of them


def skipped_path(out_path):
    """Where --skip-bad lists every skipped record and why for an output file: OUT.jsonl -> OUT.skipped.jsonl."""
    return os.path.splitext(out_path)[0] + ".skipped.jsonl"


def report_skipped(bad, source, skipped_path=None):
    """--skip-bad says why: the count and the first reasons on the console, every reason in skipped_path (JSONL,
    {"reason": ...} a line, written anew each run; removed when nothing was skipped, so it never speaks of an
    older run)."""
    if skipped_path and not bad and os.path.exists(skipped_path):
        os.remove(skipped_path)
    if not bad:
        return
    if skipped_path:
        write_jsonl(skipped_path, [{"reason": why} for why in bad])
    more = f"\n  ... and {len(bad) - SHOWN_SKIPPED} more" if len(bad) > SHOWN_SKIPPED else ""
    print(f"{source}: skipped {len(bad)} bad record(s) (--skip-bad)"
          + (f", every reason in {skipped_path}" if skipped_path else "") + ":\n  "
          + "\n  ".join(bad[:SHOWN_SKIPPED]) + more)


# ----------------------------------------------------------------------------------------------------
# The loader: our schema and the released VLAA-Thinking files


def _iter_json_or_jsonl(path, bad=None):
    """The released `.json` files are JSONL despite the extension; accept a JSON array too. Unreadable
    lines are errors, or with a `bad` list counted there (see read_jsonl)."""
    with open(path, "rb") as f:
        head = f.read(1024).lstrip()
    if not head.startswith(b"["):
        yield from read_jsonl(path, bad)
        return
    with open(path, "rb") as f:
        try:
            items, why = parse_json(f.read().decode("utf-8"), path)
        except UnicodeDecodeError as e:
            items, why = None, f"{path}: not UTF-8 (byte {e.start})"
    if why:
        raise InputError(why.replace("bad JSON", "bad JSON array", 1))
    for i, rec in enumerate(items, 1):
        if isinstance(rec, dict):
            yield i, rec
        elif bad is None:
            raise InputError(f"{path}: item {i}: expected a JSON object")
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
        raise InputError(f"{where}: no ground truth: looked in 'gt', 'answer' and the <answer> block of 'answer'")
    out["answer"] = gold if isinstance(gold, (list, int, float)) else str(gold)
    return out


def load_records(path, fmt="auto", image_root=None, need=("question", "answer"), skip_bad=False, skipped=None):
    """Read a data file into a list of validated records in our schema, with `image` made absolute.

    fmt: "ours", "vlaa" (the released VLAA-Thinking SFT/GRPO files) or "auto" (released when a record
    has `gt` or a `<think>` inside `answer`). Images resolve against `image_root`, else the file's
    folder. A bad record stops the load naming file, line, id and field; with skip_bad it is left out
    and counted (report_skipped: the first reasons printed, all of them in the file `skipped`, if given).
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
    report_skipped(bad, path, skipped)
    return records


def load_benchmark_rows(path, fields, image_fields=("image",), keep=None, skip_bad=False):
    """The rows of a local benchmark copy (JSONL) that `keep(row)` wants (default all), each checked by
    check_benchmark_row before any model runs: a bad row stops the load naming file, line and field, or with
    skip_bad is left out and counted (as load_records). Ids are the benchmark's own (06 checks them)."""
    root = os.path.dirname(os.path.abspath(path))
    bad = []
    rows = ((i, rec) for i, rec in read_jsonl(path, bad if skip_bad else None) if keep is None or keep(rec))
    check = functools.partial(check_benchmark_row, fields=fields, image_fields=image_fields, root=root)
    found = [rec for _, rec in checked_records(path, rows, check, bad if skip_bad else None, unique=False)]
    report_skipped(bad, path)
    return found


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
