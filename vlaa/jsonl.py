"""JSONL files, the glue between the stages: one JSON object per line.

Inputs are read with errors that name the file and the line. Outputs are appended record by record
as a stage goes, so a killed run loses at most the line it was writing, and re-running the same
command resumes: `open_output` returns the ids already written.

    for line_no, rec in read_jsonl(path): ...        an unreadable line is an error naming file:line
    for line_no, rec in read_jsonl(path, bad=[]): ... ... or, with a list, a message in it and skipped
    done, f, damaged = open_output(path)             resume: ids already written, a handle to append
    records, damaged = read_output(path)             the readable records of an output, as open_output sees them
    obj = read_json(path, fix)                       a state file (run.json, scores.json): damaged -> InputError

InputError is the one type of an error about what the user gave: a line, a record, a data file, a damaged run
folder. Its message names the file (and line, id, field) and says what to do; the stages' command line prints
only that message (vlaa.flags.cli), never a traceback.

Used by every stage (through vlaa.records and vlaa.datastage) and by 06_eval.py.
"""

import json
import os
import sys

MAX_LINE_BYTES = 64 * 1024 * 1024  # no record is this long; a longer line is refused, never held in memory


class InputError(ValueError):
    """Bad input or damaged state, named: the message says which file and what the user can do."""


def _lines(f):
    """(line_number, bytes) of a binary file; a line over MAX_LINE_BYTES comes as None, read in bounded pieces."""
    i = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        i += 1
        if len(raw) > MAX_LINE_BYTES:
            while raw and not raw.endswith(b"\n"):  # skip the rest of the line without holding it
                raw = f.readline(1 << 20)
            raw = None
        yield i, raw


def _parse_line(raw, where):
    """One line -> (record, None), (None, None) for a blank line, or (None, why it cannot be read)."""
    if raw is None:
        return None, f"{where}: line longer than {MAX_LINE_BYTES} bytes"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"{where}: not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})"
    if not line.strip():
        return None, None
    rec, why = parse_json(line.rstrip("\r\n"), where)  # an error at the line's end is on this line
    if why is not None:
        return None, why
    if not isinstance(rec, dict):
        return None, f"{where}: expected a JSON object, got {type(rec).__name__}"
    return rec, None


def parse_json(text, where):
    """One JSON document -> (value, None), or (None, why it cannot be read); nesting too deep for Python's
    parser is a bad document, not a RecursionError."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"  # a JSONL line: its column
        return None, f"{where}: bad JSON ({e.msg} at {at})"
    except RecursionError:
        return None, f"{where}: bad JSON (nested too deeply)"


def read_json(path, fix, need=()):
    """A JSON object a stage wrote (run.json, trainer.json, scores.json), with the fields `need`; missing, not
    UTF-8, not JSON or not such an object is an InputError naming the file and `fix`, what the user can do."""
    try:
        with open(path, encoding="utf-8") as f:
            obj, why = parse_json(f.read(), path)
    except (OSError, UnicodeDecodeError) as e:
        obj, why = None, f"{path}: cannot be read ({e.strerror if isinstance(e, OSError) else 'not UTF-8'})"
    if why is None and not isinstance(obj, dict):
        why = f"{path}: expected a JSON object, got {type(obj).__name__}"
    missing = [k for k in need if why is None and k not in obj]
    if why or missing:
        raise InputError(f"{why or f'{path}: no field {missing[0]!r}'}; {fix}")
    return obj


def read_jsonl(path, bad=None):
    """Yield (line_number, record). A line that is not UTF-8, not JSON or not an object is an error naming
    the file and line; when `bad` is a list, its message is appended there and the line skipped instead.
    Blank lines are skipped."""
    with open(path, "rb") as f:
        for i, raw in _lines(f):
            rec, why = _parse_line(raw, f"{path}:{i}")
            if why is not None and bad is None:
                raise InputError(why)
            if why is not None:
                bad.append(why)
            elif rec is not None:
                yield i, rec


def _scan_output(path, repair, need=()):
    """Read an output file -> (records, damaged line numbers); with repair, a torn last line is cut off. A record
    without an id, or whose fields `need` are not text, is a damaged line."""
    records, damaged, offset, torn = [], [], 0, None
    with open(path, "rb") as f:
        for i, raw in _lines(f):
            if raw is not None and not raw.endswith(b"\n"):  # torn: the run died while writing it
                torn = offset
                break
            offset += len(raw) if raw is not None else 0
            rec, why = _parse_line(raw, f"{path}:{i}")
            if why is not None or (rec is not None and not (isinstance(rec.get("id"), (str, int, float))
                                                            and all(isinstance(rec.get(k), str) for k in need))):
                damaged.append(i)
            elif rec is not None:
                records.append(rec)
    if torn is not None and repair:
        with open(path, "r+b") as f:
            f.truncate(torn)
    return records, damaged


def open_output(path, need=()):
    """Open a JSONL output for appending -> (ids already written, file handle, damaged line numbers).

    A run killed mid-write leaves a torn last line (no newline): it is cut off, and its record redone.
    A damaged line in the middle (a disk error, a hand edit: not JSON, or no id) is kept as it is and
    reported: its record is not among the done ids, so it is redone and appended; every line after it
    still counts as done. A record whose fields `need` are not text (predictions.jsonl's response) is damaged too.
    """
    done, damaged = set(), []
    if os.path.exists(path):
        records, damaged = _scan_output(path, True, need)
        done = {r["id"] for r in records}
        if damaged:
            print(f"{path}: {len(damaged)} damaged line(s) kept (first: line {damaged[0]}); "
                  "their records are redone and appended", file=sys.stderr)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return done, open(path, "a", encoding="utf-8"), damaged


def read_output(path, need=()):
    """The records of an output file as open_output counts them -> (records, damaged line numbers).
    A torn last line is left out (and left in place: the next open_output cuts it)."""
    return _scan_output(path, False, need)


def append_jsonl(f, rec):
    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    f.flush()  # a record is either fully on disk or torn on its last line, which open_output repairs


def write_jsonl(path, records):
    """Write a whole file at once, atomically: readers see the old file or the new one, never half."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json(path, obj):
    """One JSON document, atomically (scores.json, summary.json, run.json)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)
