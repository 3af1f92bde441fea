"""JSONL files, the glue between the stages: one JSON object per line.

Inputs are read with errors that name the file and the line. Outputs are appended record by record
as a stage goes, so a killed run loses at most the line it was writing, and re-running the same
command resumes: `open_output` returns the ids already written.

Used by every stage (through vlaa.records and vlaa.datastage) and by 06_eval.py.
"""

import json
import os
import sys


def read_jsonl(path):
    """Yield (line_number, record). Undecodable bytes, bad JSON or a non-object line is an error naming
    the file and line, never a skip. Blank lines are skipped."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            yield i, rec


def _parse_output_line(line):
    """A finished output line -> its record, or None when it is damaged (not UTF-8, not a JSON object)."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def open_output(path):
    """Open a JSONL output for appending -> (ids already written, file handle, damaged line numbers).

    A run killed mid-write leaves a torn last line (no newline): it is cut off, and its record redone.
    A damaged line in the middle (a disk error, a hand edit) is kept as it is and reported: its record
    is not among the done ids, so it is redone and appended; everything after it still counts as done.
    """
    done, damaged = set(), []
    if os.path.exists(path):
        with open(path, "rb") as f:
            data = f.read()
        lines = data.splitlines(keepends=True)
        if lines and not lines[-1].endswith(b"\n"):  # torn: the run died while writing it
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(lines[-1]))
            lines = lines[:-1]
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            rec = _parse_output_line(line)
            if rec is None or "id" not in rec:
                damaged.append(i)
            else:
                done.add(rec["id"])
        if damaged:
            print(f"{path}: {len(damaged)} damaged line(s) kept (first: line {damaged[0]}); "
                  "their records are redone and appended", file=sys.stderr)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return done, open(path, "a", encoding="utf-8"), damaged


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
