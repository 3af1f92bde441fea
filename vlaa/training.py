"""Training plumbing shared by 04_sft.py and 05_grpo.py: torchrun, FSDP2, the LR schedule, metrics.

The trainers call these by name so that their own files show the algorithm: `init_distributed` (the
same script runs under `python` and `torchrun`), `shard_model` (FSDP2, one unit per decoder layer),
`cosine_lr` (per optimizer update), `step_indices` (which records a step sees: resumable), and the
metric reductions over ranks.
"""

import json
import os

import torch


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
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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
    if world == 1:
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


def autocast(device):
    """bf16 compute on a single GPU (FSDP2's policy does it when sharded); fp32 on CPU."""
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def cosine_lr(step, total_steps, peak_lr, warmup_steps=0, min_lr=0.0):
    """Linear warmup, then cosine from peak_lr down to min_lr (paper, GRPO: LR1/LR2 set min LR and warmup)."""
    import math

    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
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


def reduce_metrics(means, sums, world, device="cpu"):
    """One step's metrics over all ranks: `sums` (counts, totals) are added, `means` averaged (each rank holds
    the same number of samples). Returns one dict; on one process, the two merged."""
    if world == 1:
        return {**means, **sums}
    import torch.distributed as dist

    mean_keys, sum_keys = sorted(means), sorted(sums)
    same_keys_on_all_ranks(mean_keys + ["|"] + sum_keys, device)
    t = torch.tensor([float(means[k]) for k in mean_keys] + [float(sums[k]) for k in sum_keys],
                     dtype=torch.float64, device=device)
    dist.all_reduce(t)
    values = t.tolist()
    out = {k: v / world for k, v in zip(mean_keys, values)}
    return out | dict(zip(sum_keys, values[len(mean_keys):]))


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


def clip_grad_norm(params, max_norm):
    """Clip the gradient norm over all ranks' shards; returns the norm before clipping, as a float."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
