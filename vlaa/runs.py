"""What a run folder was made by, so that nothing is reused from a different run.

A stage that writes into OUT and resumes from what is there must first check that OUT was made by the same
run: the same model, data and settings. Otherwise a second model resumes from the first model's answers (and
reports its score), or a training run continues another one's checkpoints. The stage builds its identity from
everything that determines its results and claims the folder with it:

    identity = runs.run_identity(model=runs.fingerprint_model(args.model), data=..., rules=..., max_new_tokens=...)
    runs.claim_run(args.out, identity, resume=True, overwrite=args.overwrite, outputs=("predictions.jsonl", ...))

The first claim writes OUT/run.json; a rerun with the same identity goes on quietly; a different identity stops
with a message naming the fields that differ, unless overwrite=True, which deletes the `outputs` the caller
names and starts afresh. Used by 04_sft.py, 05_grpo.py and 06_eval.py.
"""

import hashlib
import json
import os
import shutil

from vlaa.jsonl import write_json

RUN_FILE = "run.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def fingerprint_model(path):
    """A model folder -> {path: its resolved path, config: sha256 of config.json, weights: sha256 of the sorted
    weight files' names and sizes}. The weights' bytes are not read: a 15 GB checkpoint is fingerprinted in
    milliseconds, and a re-export (new sizes or names) still changes it. A hub id (not a folder) -> {path: id}."""
    if not os.path.isdir(path):
        return {"path": path}
    path = os.path.realpath(path)
    config_hash = None
    if os.path.exists(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json"), "rb") as f:
            config_hash = _sha256(f.read())
    weights = sorted((name, os.path.getsize(os.path.join(path, name))) for name in os.listdir(path)
                     if name.endswith(WEIGHT_SUFFIXES))
    return {"path": path, "config": config_hash, "weights": _sha256(json.dumps(weights).encode())}


def run_identity(**fields):
    """The identity of a run: its fields as plain JSON (tuples become lists, keys sorted), so that it compares
    equal to the run.json it was written to."""
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


def _differences(old, new, prefix=""):
    """Dotted names of the fields whose values differ: model.weights, data.mathvista, max_new_tokens ..."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [prefix.rstrip(".") or "identity"] if old != new else []
    out = []
    for key in sorted(set(old) | set(new)):
        out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
    return out


def _show(value):
    text = json.dumps(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _get(identity, dotted):
    for part in dotted.split("."):
        identity = identity.get(part) if isinstance(identity, dict) else None
    return identity


def claim_run(out, identity, resume=True, overwrite=False, outputs=()):
    """Make sure OUT belongs to the run `identity`, writing OUT/run.json on first use.

    Same identity: returns quietly (with resume=False it refuses: the folder already holds that run).
    Different identity, or outputs there without a run.json: raises SystemExit naming the fields that differ,
    and how to go on. overwrite=True: deletes OUT/run.json and the `outputs` (file or folder names inside OUT)
    the caller names, then claims OUT afresh."""
    path = os.path.join(out, RUN_FILE)
    found = [name for name in outputs if os.path.exists(os.path.join(out, name))]
    if overwrite:
        for name in found:
            target = os.path.join(out, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            else:
                os.remove(target)
    elif os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        differ = _differences(old, identity)
        if not differ:
            if not resume:
                raise SystemExit(f"{out} already holds this run; resume it, or pass --overwrite to start again")
            return
        lines = [f"  {name}: {_show(_get(old, name))} there, {_show(_get(identity, name))} now" for name in differ]
        raise SystemExit(f"{out} holds a different run ({path}), so nothing there is reused:\n" + "\n".join(lines)
                         + "\nUse another --out, or --overwrite to delete its outputs and start again.")
    elif found:
        raise SystemExit(f"{out} has outputs ({', '.join(found)}) but no {RUN_FILE} saying what made them; "
                         "use another --out, or --overwrite to delete them and start again")
    write_json(path, identity)
