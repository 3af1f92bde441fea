"""What a run folder was made by, so that nothing is reused from a different run.

A stage that writes into OUT and resumes from what is there must first check that OUT was made by the same
run: the same model, data and settings. Otherwise a second model resumes from the first model's answers (and
reports its score), or a training run continues another one's checkpoints. The stage builds its identity from
everything that determines its results and claims the folder with it:

    identity = runs.run_identity(model=runs.fingerprint_model(args.model), data=..., rules=..., max_new_tokens=...)
    runs.claim_run(args.out, identity, resume=True, overwrite=args.overwrite, outputs=("predictions.jsonl", ...))

The first claim writes OUT/run.json; a rerun with the same identity goes on quietly; a different identity stops
with a message naming the fields that differ, unless overwrite=True, which deletes the `outputs` the caller
names and starts afresh. Used by 06_eval.py directly, and by 04_sft.py and 05_grpo.py through
start_or_resume (which also finds, loads and cuts back to the run's last checkpoint).
"""

import hashlib
import json
import os
import shutil

from vlaa.jsonl import InputError, read_json, write_json

RUN_FILE = "run.json"
FIX_RUN_FILE = "it says what made the outputs there; use another --out, or --overwrite to delete them and start again"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def sha256_file(path, chunk=1 << 20):
    """The sha256 of a file's bytes, streamed (a data file of any size, in constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
        old = read_json(path, FIX_RUN_FILE)  # damaged: named, never taken for a different run
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


def check_inputs(args, files=(), paths=(), folders=(), models=()):
    """Every input path a stage was given, checked before any model loads: a missing one stops the stage with
    one line naming the flag and the path, not a traceback after the models load. Each argument lists flag
    names (args attributes): files must be files, paths files or folders, folders folders, models a folder or
    a hub id (a name, or org/name whose org is not a local folder: the hub checks those when they load)."""
    kinds = [(files, os.path.isfile, "file"), (paths, os.path.exists, "file or folder"),
             (folders, os.path.isdir, "folder"), (models, os.path.isdir, "model folder")]
    for names, ok, what in kinds:
        for name in names:
            path = getattr(args, name, None)
            if path in (None, "") or ok(path):
                continue
            parts = path.split("/")  # a hub id: Qwen/Qwen2.5-VL-3B-Instruct, or a bare name such as gpt2
            if names is models and len(parts) <= 2 and not path.startswith((".", "/")) and not (
                    len(parts) == 2 and os.path.isdir(parts[0])):
                continue
            flag = "--" + {"inp": "in"}.get(name, name).replace("_", "-")
            found = "is not a " + what if os.path.exists(path) else "does not exist"
            raise SystemExit(f"{flag} {path}: {found} (a {what} was expected; nothing was loaded)")


# ----------------------------------------------------------------------------------------------------
# Training runs (04 and 05): what makes them, where they start

# flags that do not change what a run computes: a rerun may change them and still resume
NOT_IDENTITY = {"out", "resume", "overwrite", "max_steps", "save_every", "log_rollouts_every", "cache_size",
                "micro_batch", "activation_checkpointing", "ref_offload", "vllm_gpu_memory", "trust_remote_code",
                "eval_data", "eval_every", "eval_max_new_tokens", "report_to", "save_adapter"}


def training_identity(stage, args):
    """What determines a training run's results: the stage, the starting model (vlaa.runs.fingerprint_model),
    the data file (path, size and the sha256 of its bytes: a shuffled or edited file of the same size is another
    run) and every flag but those in NOT_IDENTITY. --max-steps is not part of it, so a finished run can be
    extended with --resume and a larger --max-steps."""
    data = os.path.realpath(args.data)
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_IDENTITY | {"model", "data"}}
    return run_identity(stage=stage, model=fingerprint_model(args.model),
                        data={"path": data, "bytes": os.path.getsize(data), "sha256": sha256_file(data)}, flags=flags)


def hold_run_folder(out, env):
    """One writer per run folder: rank 0 (which writes run.json, the logs and the export, and starts every
    checkpoint) holds OUT/.lock for the whole job; a second job on OUT stops on every rank before any model
    loads, naming the holder (vlaa/locks.py)."""
    from vlaa import locks

    error = None
    if env["master"]:
        try:
            locks.hold(os.path.join(out, ".lock"), what=out)
        except SystemExit as e:
            error = e
    _all_ranks_agree(error, env["world"], env["device"])


def _all_ranks_agree(error, world, device):
    """Raise on every rank if any rank failed (a SystemExit on rank 0 alone would leave the others waiting)."""
    from vlaa.training import any_rank

    if any_rank(error is not None, world, device) and error is None:
        raise SystemExit(1)  # rank 0 said why
    if error is not None:
        raise error


def start_or_resume(out, identity, resume, overwrite, total_steps, env, model, optimizer, logs=("metrics.jsonl",)):
    """Claim OUT for this run and, with resume, load its last checkpoint into model and optimizer ->
    (the checkpoint's trainer.json: step and what the stage saved, or {} for a fresh run; the run id).

    A fresh run refuses a folder that holds another run, or this one already (started or finished), unless
    overwrite (then the old outputs go). --resume refuses another run's folder, a folder with no checkpoint
    of this run, and a run already at --max-steps; it cuts the logs back to the checkpoint's step, so no step
    is logged twice. Checkpoints are tagged with the run id: pruning and resuming touch only this run's. A run
    whose training ended but whose OUT/model is missing or torn resumes at its last step: it is exported again."""
    from vlaa import checkpoints, export, finite

    finite.forget_refused()
    run_id = _sha256(json.dumps(identity, sort_keys=True).encode())[:16]
    outputs = ("checkpoints", "model", "adapter", "tensorboard", "wandb", *logs)  # --overwrite clears the trackers too
    error, ckpt = None, None
    try:
        found = os.path.join(out, RUN_FILE)
        if resume and not os.path.exists(found):
            raise SystemExit(f"--resume: {out} holds no run to resume; start it without --resume")
        if not overwrite and os.path.exists(found):
            stage = read_json(found, FIX_RUN_FILE).get("stage")
            if stage != identity["stage"]:  # another stage's folder: say that, not every flag that differs
                raise SystemExit(f"{out} holds a {stage} run, not a {identity['stage']} one; use another --out")
        if env["master"]:
            claim_run(out, identity, resume=resume, overwrite=overwrite, outputs=outputs)
        if resume:
            ckpt = checkpoints.latest_checkpoint(out, run_id=run_id)
            if ckpt is None:
                raise SystemExit(f"--resume: {out} has no complete checkpoint of this run; start it without --resume "
                                 "(with --overwrite to clear the folder)")
            step = checkpoints.read_trainer(ckpt)["step"]  # missing, damaged or an impossible step: named
            if step >= total_steps:  # at the end already: only an export that is missing or torn is left to do
                if step > total_steps or export.export_complete(os.path.join(out, "model")):
                    raise SystemExit(f"--resume: the run in {out} is already at step {step} of {total_steps}; raise "
                                     "--max-steps to train further, or --overwrite to start again")
            if env["master"]:
                cut_logs(out, step, logs)
    except (SystemExit, InputError) as e:  # every rank stops, and says why once
        error = e
    _all_ranks_agree(error, env["world"], env["device"])
    if ckpt is None:
        return {}, run_id
    state = checkpoints.load_checkpoint(ckpt, model, optimizer, env["rank"])
    if env["master"]:
        print(f"resumed from {ckpt} at step {state['step']}: {schedule_note(out, state, total_steps)}")
    return state, run_id


def schedule_note(out, state, total_steps):
    """What a --resume does with the run's plan: finish it, export it again, or stretch it to a new --max-steps
    (the LR then follows the schedule of the new total from this step on, as in HF Trainer; README, Robustness)."""
    step, planned = state["step"], state.get("total_steps", total_steps)
    if step == total_steps:
        return f"training had ended; {out}/model is missing or torn: exporting it again"
    if planned == total_steps:
        return f"continuing to step {total_steps}"
    return (f"the run was planned for {planned} steps, now {total_steps}: from step {step} on, the LR follows the "
            f"schedule of {total_steps} steps (its warmup is not repeated)")


def cut_logs(out, step, logs):
    """Keep only the log lines of steps up to `step` (the checkpoint a resumed run starts from)."""
    from vlaa.jsonl import read_jsonl, write_jsonl

    for name in logs:
        path = os.path.join(out, name)
        if os.path.exists(path):  # a torn or damaged line is dropped with the rest of what comes after `step`
            write_jsonl(path, [r for _, r in read_jsonl(path, bad=[]) if isinstance(r.get("step"), int)
                               and r["step"] <= step])
