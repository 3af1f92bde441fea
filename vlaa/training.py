"""Training plumbing shared by 04_sft.py and 05_grpo.py: torchrun, FSDP2, the LR schedule, metrics.

The trainers call these by name so that their own files show the algorithm: `init_distributed` (the
same script runs under `python` and `torchrun`), `shard_model` (FSDP2, one unit per decoder layer),
`cosine_lr` (per optimizer update), `step_indices` (which records a step sees: resumable), the
metric reductions over ranks, and the checkpoint cadence, the save on SIGTERM and the end of a run.
Held-out accuracy during training is vlaa/heldout.py; the NaN/Inf guards, vlaa/finite.py.
"""

import atexit
import contextlib
import json
import math
import os
import signal
import sys

import torch

from vlaa import finite

# FSDP2 and a process group even on one process: bench/gpu_check.py sets it to exercise NCCL and FSDP2's
# bf16 mixed precision on a single GPU. Normal runs shard only under torchrun with several ranks.
FORCE_FSDP = os.environ.get("VLAA_FORCE_FSDP") == "1"


def init_distributed():
    """Rank, world size and device from torchrun's environment; plain `python` is rank 0 of 1.

    NCCL on GPU, gloo on CPU. Multi-node is torchrun's job (--nnodes, --rdzv-endpoint): nothing here.
    """
    import torch.distributed as dist

    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if (world > 1 or FORCE_FSDP) and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # a rank that ends without finish_training (an error, a refused run, a script) still closes the group:
        # exiting with a live gloo group can abort the process ("terminate called without an active exception")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return {"rank": rank, "world": world, "local_rank": local, "device": device, "master": rank == 0}


def freeze_vision_tower(model, freeze=True):
    """paper (SFT, App. B.1): the vision encoder stays frozen; a flag trains it."""
    for p in model.model.visual.parameters():
        p.requires_grad_(not freeze)


def shard_model(model, device, world, cpu_offload=False):
    """FSDP2 under torchrun: one unit per decoder layer, the vision tower as its own unit, then the root.

    The vision tower must be its own unit: generate() calls it directly, outside the root's hooks
    (docs/qwen2.5-vl.md). With one process the model is returned as is. On GPU, parameters are
    all-gathered in bf16 and gradients reduced in fp32, over fp32 master weights. cpu_offload keeps
    the shards in CPU memory (for a frozen reference model).
    """
    if world == 1 and not FORCE_FSDP:
        return model
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
    kw = dict(mp_policy=mp, offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for layer in model.model.language_model.layers:
        fully_shard(layer, **kw)
    fully_shard(model.model.visual, **kw)
    fully_shard(model, **kw)
    # generate() and get_image_features() are not forward(): registered, they run the root's hooks
    # first; otherwise their direct call into the vision tower would initialise it as a root of its own
    for method in ("generate", "get_image_features"):
        register_fsdp_forward_method(model, method)
    return model


def load_trainable(path, device, world, lr, weight_decay=0.0, train_vision=False, activation_checkpointing=False,
                   min_pixels=None, max_pixels=None, betas=(0.9, 0.999), lora=None):
    """The model 04 and 05 train -> (model, tokenizer, image_processor, params, optimizer): fp32 master
    weights (bf16 compute on GPU comes from autocast or FSDP2's policy), the vision tower frozen unless
    asked (paper, SFT: frozen), sharded under torchrun, AdamW (`betas`) over what trains: with `lora`
    (vlaa.lora.settings), the adapters on the language model's linear layers and nothing else."""
    from vlaa import lora as adapters
    from vlaa.qwen import load_model

    # with LoRA on a GPU the frozen base is bf16 (no optimizer steps it; TRL, EasyR1), the adapters fp32
    dtype = "bfloat16" if lora and device.type == "cuda" else "float32"
    model, tokenizer, image_processor = load_model(path, dtype, device, min_pixels, max_pixels)
    freeze_vision_tower(model, not train_vision)
    if lora:
        adapters.add_adapters(model, **lora)
    if activation_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    model = shard_model(model, device, world)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=device.type == "cuda")
    return model, tokenizer, image_processor, params, optimizer


def load_frozen(path, device, world, offload=False):
    """A frozen copy of a model (GRPO's reference), sharded like the policy; with offload its shards live in
    CPU memory between uses. bf16 on a GPU (half the memory; no optimizer needs an fp32 master; OpenRLHF, verl)."""
    from vlaa.qwen import load_model, resolve_dtype

    model = load_model(path, resolve_dtype("auto", device), torch.device("cpu") if offload else device)[0]
    return shard_model(model.eval().requires_grad_(False), device, world, cpu_offload=offload)


@contextlib.contextmanager
def visiting(model, device, move):
    """Inside the block the model is on `device`; after it, back in CPU memory (when move is True)."""
    if move:
        model.to(device)
    try:
        yield model
    finally:
        if move:
            model.to("cpu")


def autocast(device):
    """bf16 compute on a single GPU (FSDP2's policy does it when sharded); fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def warmup_updates(total_updates, warmup_ratio):
    """Warmup length in optimizer updates, rounded up (OpenRLHF: ceil(updates * lr_warmup_ratio)), so a short
    run with warmup on still warms up."""
    return math.ceil(total_updates * warmup_ratio)


def cosine_lr(update, total_updates, peak_lr, warmup=0, min_lr=0.0):
    """The LR of optimizer update `update` (0-based): linear warmup from 0 over `warmup` updates, then cosine
    from peak_lr down to min_lr. The schedule has one point per optimizer update, not per rollout step: the
    paper's 49 GRPO steps (25,195 // 512) of 512 x 4 / 256 = 8 updates are 392 (transformers' cosine_with_min_lr
    schedule, which OpenRLHF steps once per update; the paper's LR1/LR2 set min LR and warmup)."""
    if update < warmup:
        return peak_lr * update / warmup
    progress = min(1.0, (update - warmup) / max(1, total_updates - warmup))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))


def step_indices(step, n_records, batch, seed):
    """The record indices of one optimizer step: a fresh permutation each epoch, so the data position
    is just the step number (a resumed run sees exactly the batches it would have seen)."""
    per_epoch = max(1, n_records // batch)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n_records, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[k * batch:(k + 1) * batch].tolist()


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr


def peak_memory(device):
    """{"peak_memory_gb": ...} since the last call, on GPU; {} on CPU (host memory is not the question there)."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    torch.cuda.reset_peak_memory_stats(device)
    return {"peak_memory_gb": peak}


def log_metrics(path, rec):
    """One JSON line per step in OUT/metrics.jsonl (rank 0 only, the caller checks)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def same_keys_on_all_ranks(keys, device):
    """Raise (on every rank, so none hangs) unless all ranks hold the same metric names. A rank whose batch
    lacked a verifier type once sent a shorter tensor: gloo aborted, NCCL would hang or sum misaligned values."""
    import zlib

    import torch.distributed as dist

    h = zlib.crc32("|".join(keys).encode())
    t = torch.tensor([h, -h], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # [max h, -min h]
    if int(t[0]) != -int(t[1]):
        raise RuntimeError(f"ranks log different metrics; this rank has: {', '.join(keys)}")


def reduce_metrics(means, sums, world, device="cpu", maxes=None):
    """One step's metrics over all ranks: `sums` (counts, totals) are added, `maxes` maxed, `means` averaged:
    equally (each rank holds the same number of samples), or weighted where a value is a pair (mean, count),
    as a token mean is when ranks hold different numbers of tokens. Returns one dict of floats."""
    maxes = maxes or {}
    pairs = {k: v if isinstance(v, tuple) else (v, 1.0) for k, v in means.items()}
    if world == 1:
        return {**{k: v for k, (v, _) in pairs.items()}, **sums, **maxes}
    import torch.distributed as dist

    mean_keys, sum_keys, max_keys = sorted(means), sorted(sums), sorted(maxes)
    same_keys_on_all_ranks(mean_keys + ["|"] + sum_keys + ["|"] + max_keys, device)
    t = torch.tensor([float(pairs[k][0]) * float(pairs[k][1]) for k in mean_keys] + [float(pairs[k][1]) for k in
                     mean_keys] + [float(sums[k]) for k in sum_keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    values, n = t.tolist(), len(mean_keys)
    out = {k: v / w if w else 0.0 for k, v, w in zip(mean_keys, values, values[n:])}
    out |= dict(zip(sum_keys, values[2 * n:]))
    if max_keys:
        m = torch.tensor([float(maxes[k]) for k in max_keys], dtype=torch.float64, device=device)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        out |= dict(zip(max_keys, m.tolist()))
    return out


def global_sum(x, world, device="cpu"):
    """A float or tensor summed over all ranks (a normaliser must count every rank's tokens). NCCL needs
    the tensor on this rank's GPU: pass device."""
    if world == 1:
        return x
    import torch.distributed as dist

    t = x.clone() if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t


def gradient_sync(model, on):
    """FSDP2: reduce gradients over ranks only on the last micro-batch of an update (no-op unsharded)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(on)


def clip_grad_norm(params, max_norm, loss=None):
    """Clip the gradient norm over all ranks' shards; returns the norm before clipping, as a float. A non-finite
    norm or (global) loss drops the gradients, so the optimizer.step that follows changes nothing (vlaa/finite.py)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    finite.skip_if_nonfinite(params, norm, loss)
    return norm


# ----------------------------------------------------------------------------------------------------
# Checkpoint cadence, the save on SIGTERM, the end of a run (04 and 05)

_previous_sigterm_handlers = []  # what install_sigterm_handler replaced, put back when the run ends


def install_sigterm_handler():
    """On SIGTERM (a preempted or cancelled job; torchrun forwards it to every worker) only a flag is set;
    returns a function that reads it. The loop checks it once per step through any_rank, saves and exits. A
    second SIGTERM does not kill the save in progress: SIGKILL does. A forked child (a DataLoader or Pool
    worker) inherits the handler but not the loop: it dies of SIGTERM, or `Pool.terminate` would hang."""
    got, pid = [], os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        got.append(signum)

    _previous_sigterm_handlers.append(signal.signal(signal.SIGTERM, on_sigterm))
    return lambda: bool(got)


def restore_sigterm_handler():
    """The handler that was there before install_sigterm_handler: a run called in-process (tests, a notebook)
    leaves SIGTERM as it found it."""
    if _previous_sigterm_handlers:
        signal.signal(signal.SIGTERM, _previous_sigterm_handlers.pop())


def any_rank(flag, world, device="cpu"):
    """True on every rank when it is True on any (one all-reduce), so that all ranks save together."""
    return bool(global_sum(float(bool(flag)), world, device) > 0)


def exit_after_sigterm(path, step, rank=0):
    """After the checkpoint that a SIGTERM asked for: say where it is, close the process group, and exit with
    143 (128 + SIGTERM), the status a shell reports for a process that SIGTERM ended."""
    import torch.distributed as dist

    restore_sigterm_handler()
    if rank == 0:
        print(f"SIGTERM: stopped after step {step}; saved {path}; continue with --resume", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(143)


def checkpoint_if_due(out, step, total_steps, save_every, stop_requested, model, optimizer, extra, env, run_id):
    """After step `step` (1-based): a checkpoint every save_every steps (None: every ~10% of the run), and one
    at once when any rank got SIGTERM, after which the run stops (exit code 143; --resume continues). The last
    step is saved by finish_training."""
    from vlaa import checkpoints

    finite.stop_if_refused(out, step, run_id, env)  # a NaN/Inf loss or gradient norm in this step: stop here
    save_every = save_every or checkpoints.default_save_every(total_steps)
    stopping = any_rank(stop_requested(), env["world"], env["device"])
    if step < total_steps and (stopping or step % save_every == 0):
        path = checkpoints.save_checkpoint(out, step, model, optimizer, {**extra, "total_steps": total_steps},
                                           env["rank"], run_id=run_id)
        if stopping:
            exit_after_sigterm(path, step, env["rank"])


def finish_training(out, step, model, optimizer, extra, tokenizer, image_processor, env, run_id=None,
                    close_group=True, save_adapter=False):
    """The end of 04 and 05: a last checkpoint (kept if this run's is there: a --resume that only exports), the
    Hugging Face export (atomic; bf16 from a GPU run; LoRA merged, and the adapter alone in OUT/adapter with
    save_adapter), SIGTERM's handler put back, OUT's lock released, and the process group closed (unless a vLLM
    engine closes it in its own teardown). Returns the model folder on rank 0."""
    import torch.distributed as dist

    from vlaa import checkpoints, export, locks

    if os.path.basename(checkpoints.latest_checkpoint(out, run_id=run_id) or "") != f"ckpt-{step}":
        checkpoints.save_checkpoint(out, step, model, optimizer, {**extra, "total_steps": step}, env["rank"],
                                    run_id=run_id)
    dtype = torch.bfloat16 if env["device"].type == "cuda" else torch.float32
    folder = export.export_hf(model, tokenizer, image_processor, os.path.join(out, "model"), env["rank"], dtype,
                              adapter=os.path.join(out, "adapter") if save_adapter else None)
    if env["master"]:
        print(f"saved {folder}")
        locks.release(os.path.join(out, ".lock"))
    restore_sigterm_handler()
    if close_group and dist.is_initialized():
        dist.destroy_process_group()
    return folder
