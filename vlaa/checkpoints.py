"""Resumable checkpoints and the final Hugging Face export, shared by 04_sft.py and 05_grpo.py (their cadence,
the save on SIGTERM and the end of a run are in vlaa/training.py).

OUT/checkpoints/ckpt-STEP holds, per rank R, `rank-R.safetensors` (this rank's shards of the model and of the
optimizer state, and its RNG) and `rank-R.json` (parameter names, optimizer hyperparameters, world size), plus
`trainer.json` (step, data position, run id, ...) and, last, a `DONE` file: a run killed while saving resumes
from the previous checkpoint. Loading reads safetensors and JSON only, formats that cannot carry code, so a
downloaded or shared run folder cannot run anything on `--resume` (docs/checkpoints.md). Each rank writes and
reads only its own shards: nothing is gathered onto one rank. With LoRA (vlaa/lora.py) a checkpoint holds the
adapters only: the base weights are --model's. The final OUT/model export is vlaa/export.py.
"""

import json
import math
import os
import re
import shutil

import torch

from vlaa import finite, lora
from vlaa.jsonl import InputError, read_json, write_json

CKPT_DIR = re.compile(r"ckpt-(\d+)")
IMPLEMENTATION_FLAGS = {"params", "foreach", "fused", "capturable", "differentiable"}  # not the run's settings


def _local(t):
    """This rank's shard of a DTensor (FSDP2 shards dim 0 over ranks); a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _barrier():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _world():
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _read_json(path):
    """A JSON object from a checkpoint file, or None when it is absent or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# ----------------------------------------------------------------------------------------------------
# Which checkpoints exist, and which belong to this run


def _checkpoint_dirs(out):
    """{step: folder} of every OUT/checkpoints/ckpt-STEP, complete or not."""
    root = os.path.join(out, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return {int(m.group(1)): os.path.join(root, d) for d in names if (m := CKPT_DIR.fullmatch(d))}


def _run_of(folder):
    """The run id a checkpoint folder was written by: trainer.json's, or rank 0's while it is half-written."""
    meta = _read_json(os.path.join(folder, "trainer.json")) or _read_json(os.path.join(folder, "rank-0.json")) or {}
    return meta.get("run_id")


def latest_checkpoint(out, run_id=None):
    """The newest complete checkpoint folder OUT/checkpoints/ckpt-STEP (of run `run_id` when given), or None.
    A folder without DONE is never picked: its writer was killed mid-save."""
    done = {s: d for s, d in _checkpoint_dirs(out).items() if os.path.exists(os.path.join(d, "DONE"))
            and (run_id is None or _run_of(d) == run_id)}
    return done[max(done)] if done else None


def _prune(out, current, run_id, keep):
    """Delete this run's older checkpoints: all but the newest `keep` complete ones, and its half-written
    ones. Checkpoints of other runs (another run_id) in the same OUT are never touched."""
    mine = {s: d for s, d in _checkpoint_dirs(out).items() if d != current and _run_of(d) == run_id}
    complete = sorted(s for s, d in mine.items() if os.path.exists(os.path.join(d, "DONE")))
    kept = set(complete[-(keep - 1):]) if keep > 1 else set()  # `current` is the keep-th
    for s, d in mine.items():
        if s not in kept:
            shutil.rmtree(d, ignore_errors=True)


def default_save_every(total_steps):
    """Checkpoint cadence when --save-every is not given: every ~10% of the run (at least every step), so a
    49-step GRPO run or a 190-step SFT run has about ten checkpoints to resume from."""
    return max(1, math.ceil(total_steps / 10))


# ----------------------------------------------------------------------------------------------------
# What one rank holds: named model tensors, optimizer state by parameter name, RNG


def model_tensors(model):
    """{name: tensor} of what a checkpoint holds of the model: the parameters (a tied weight once) and the
    persistent buffers; with LoRA adapters, those alone. Under FSDP2 these are the sharded DTensors: every FSDP
    unit is resharded first, as a forward without backward (generation) can leave the root unsharded."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    keys = set(model.state_dict().keys())
    tensors = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if n in keys}
    adapters = {n: t for n, t in tensors.items() if lora.is_adapter(n)}
    return adapters or tensors  # LoRA: the adapters only (the base is --model's, in the run identity)


def _param_names(model, optimizer):
    """The parameter names of each optimizer group, in the optimizer's order (its state is indexed by it)."""
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    except KeyError:
        raise ValueError("the optimizer holds a parameter the model does not (create it after shard_model)") from None


def _rng_state():
    rng = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["rng/cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return rng


def rank_state(model, optimizer):
    """(tensors, meta) of this rank: tensors for safetensors (`model/<name>`, `optim/<name>/<key>`, `rng/...`,
    all local shards on CPU), meta for JSON (names, hyperparameters)."""
    tensors = {f"model/{n}": _local(t).detach().cpu().contiguous() for n, t in model_tensors(model).items()}
    groups = _param_names(model, optimizer)
    sd = optimizer.state_dict()  # state: {index in the optimizer's order: {"step": t, "exp_avg": DTensor, ...}}
    flat = [n for g in groups for n in g]
    for i, state in sd["state"].items():
        for key, v in state.items():
            if not torch.is_tensor(v):
                raise TypeError(f"optimizer state {flat[i]}/{key} is a {type(v).__name__}; only tensors are saved")
            tensors[f"optim/{flat[i]}/{key}"] = _local(v).detach().cpu().contiguous()
    tensors |= _rng_state()
    hyper = [{k: v for k, v in g.items() if k not in IMPLEMENTATION_FLAGS
              and (v is None or isinstance(v, (int, float, bool, str, list, tuple)))} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "hyperparameters": hyper}


# ----------------------------------------------------------------------------------------------------
# Save


def save_checkpoint(out, step, model, optimizer, extra, rank=0, keep=2, run_id=None):
    """A resumable checkpoint in OUT/checkpoints/ckpt-STEP (a collective: every rank calls). Each rank writes its
    own shards; rank 0 then writes trainer.json ({**extra, step, world, run_id}) and DONE, and deletes this run's
    older checkpoints, keeping `keep`. Returns the folder."""
    from safetensors.torch import save_file

    from vlaa.training import any_rank

    world = _world()
    path = os.path.join(out, "checkpoints", f"ckpt-{step}")
    tensors, meta = rank_state(model, optimizer)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"  # NCCL's
    if any_rank(finite.nonfinite_names(tensors), world, device):  # every rank refuses, before anything is touched
        finite.refuse_nonfinite(tensors, path)
        raise ValueError(f"not writing {path}: another rank holds NaN or Inf")
    if rank == 0:  # a stale or half-written folder of the same step goes first: DONE before anything else
        if os.path.exists(os.path.join(path, "DONE")):
            os.remove(os.path.join(path, "DONE"))
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    _barrier()
    save_file(tensors, os.path.join(path, f"rank-{rank}.safetensors"), metadata={"format": "vlaa-ckpt-1"})
    write_json(os.path.join(path, f"rank-{rank}.json"), {"step": step, "rank": rank, "world": world,
                                                           "run_id": run_id, **meta})
    _barrier()
    if rank == 0:
        write_json(os.path.join(path, "trainer.json"), {**extra, "step": step, "world": world, "run_id": run_id})
        open(os.path.join(path, "DONE"), "w").close()
        _prune(out, path, run_id, keep)
    _barrier()
    return path


# ----------------------------------------------------------------------------------------------------
# Load: safetensors and JSON only, every tensor checked against what this rank holds


def _read_tensors(path):
    """{key: tensor} of a rank's safetensors file. The safetensors parser refuses an oversized or malformed
    header and offsets outside the file; a pickle or anything else is refused, never run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: not a complete checkpoint of this format")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, ValueError, OSError) as e:
        raise InputError(f"{path}: not a valid safetensors file ({e})") from None


def _take(tensors, key, like, path):
    """The saved tensor `key`, checked to match `like` (this rank's shard) in shape and dtype."""
    if key not in tensors:
        raise InputError(f"{path}: no tensor {key!r}: the checkpoint is of another model or configuration")
    t = tensors.pop(key)
    if t.shape != like.shape or t.dtype != like.dtype:
        raise InputError(f"{path}: {key!r} is {t.dtype}{list(t.shape)}, this rank holds "
                         f"{like.dtype}{list(like.shape)}: the checkpoint is of another model or configuration")
    return t


def _check_world(folder, trainer):
    world = _world()
    saved = trainer.get("world")
    if saved != world:
        raise InputError(f"{folder} was written by {saved} rank(s); this run has {world}. Resume with the same "
                         f"number of ranks: resharding a checkpoint to another world size is not supported.")


def _restore_optimizer(optimizer, model, tensors, meta, file):
    """Rebuild the optimizer state by parameter name from this rank's tensors (popped from `tensors`) and hand
    it to torch's own load_state_dict, which puts each value where this optimizer keeps it."""
    groups = _param_names(model, optimizer)
    if meta["param_groups"] != groups:
        raise InputError(f"{file}: the optimizer's parameters differ from the checkpoint's (another "
                         "--train-vision or model?)")
    params = dict(model.named_parameters())
    index = {n: i for i, n in enumerate(n for g in groups for n in g)}
    state = {}
    for k in [k for k in tensors if k.startswith("optim/")]:
        name, _, key = k[len("optim/"):].rpartition("/")
        if name not in index:
            raise InputError(f"{file}: optimizer state {k!r} of a parameter the optimizer does not hold")
        if key == "step":  # a scalar count
            value = tensors.pop(k)
            if value.dim() != 0 or not value.is_floating_point():
                raise InputError(f"{file}: {k!r} is not a scalar step count")
        else:  # a DTensor like its parameter (same mesh and placements), this rank's shard filled in
            value = torch.zeros_like(params[name])
            _local(value).copy_(_take(tensors, k, _local(value), file))
        state.setdefault(index[name], {})[key] = value
    saved = [{**g, **{k: tuple(v) if isinstance(g.get(k), tuple) else v for k, v in h.items()
                      if k not in IMPLEMENTATION_FLAGS}}
             for g, h in zip(optimizer.state_dict()["param_groups"], meta["hyperparameters"])]
    optimizer.load_state_dict({"state": state, "param_groups": saved})


def _rank_meta(path, rank):
    """rank-R.json, checked to hold what _restore_optimizer reads."""
    meta = _read_json(os.path.join(path, f"rank-{rank}.json")) or {}
    groups, hyper = meta.get("param_groups"), meta.get("hyperparameters")
    if not (isinstance(groups, list) and isinstance(hyper, list) and len(groups) == len(hyper)
            and all(isinstance(h, dict) for h in hyper)):
        raise InputError(f"{path}/rank-{rank}.json is missing or not a checkpoint's rank file")
    return meta


def read_trainer(path):
    """A checkpoint's trainer.json, checked: its step is the folder's (ckpt-STEP, at least 1) and its world a
    number of ranks. Missing, damaged or impossible: an InputError naming the file and what to do."""
    fix = (f"not a checkpoint of this format, or a damaged one: delete {path} to resume from the one before it, "
           "or start again with --overwrite (torch.distributed.checkpoint folders are not read: their .metadata is "
           "a pickle)")
    file = os.path.join(path, "trainer.json")
    trainer = read_json(file, fix, need=("step", "world"))
    m = CKPT_DIR.fullmatch(os.path.basename(os.path.normpath(path)))
    for key, ok in (("step", lambda v: m is None or v == int(m.group(1))), ("world", lambda v: True)):
        value = trainer[key]
        if not (type(value) is int and value >= 1 and ok(value)):
            raise InputError(f"{file}: {key} {value!r} is impossible here; {fix}")
    return trainer


def load_checkpoint(path, model, optimizer, rank=0):
    """Restore what save_checkpoint wrote into this rank's shards, in place; returns trainer.json (step, data
    position, ...). Executes nothing from the folder: only this rank's .safetensors and the JSON are read."""
    if not os.path.exists(os.path.join(path, "DONE")):
        raise InputError(f"{path} has no DONE file: an incomplete checkpoint (its writer stopped mid-save)")
    trainer = read_trainer(path)
    _check_world(path, trainer)
    meta = _rank_meta(path, rank)
    file = os.path.join(path, f"rank-{rank}.safetensors")
    tensors = _read_tensors(file)
    with torch.no_grad():  # the model: copied into this rank's shards
        for name, t in model_tensors(model).items():
            _local(t).copy_(_take(tensors, f"model/{name}", _local(t), file))
    _restore_optimizer(optimizer, model, tensors, meta, file)
    torch.set_rng_state(_take(tensors, "rng/torch", torch.get_rng_state(), file))
    if "rng/cuda" in tensors and torch.cuda.is_available():  # a CPU run's checkpoint has none; on CPU a GPU
        torch.cuda.set_rng_state(_take(tensors, "rng/cuda", torch.cuda.get_rng_state(), file))  # run's is moot
    tensors.pop("rng/cuda", None)
    if tensors:
        raise InputError(f"{file}: tensors this model does not have: {sorted(tensors)[:5]}")
    return trainer
