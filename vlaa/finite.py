"""Non-finite numbers never reach a checkpoint or an export (04_sft.py and 05_grpo.py, through vlaa/training.py
and vlaa/checkpoints.py).

Two guards:

    an update whose loss or gradient norm is NaN or Inf is not applied (its gradients are dropped before
    optimizer.step, so AdamW leaves every weight and moment as it was), and the run stops at the end of that
    step with an error naming the step and the last good checkpoint to --resume from, or to change the
    settings that blew up (a lower --lr, ...). training.clip_grad_norm and training.checkpoint_if_due call it.
    save_checkpoint and export_hf refuse any tensor with a NaN or Inf: nothing non-finite is written, however it
    got there (a parameter set by hand, an overflowing cast).

Stop, not skip-and-count: one non-finite update is rare and almost always the first of many (a diverged
optimizer, a bad flag), and a run that skipped updates silently is a different run from the one its flags
describe. DeepSpeed's fp16 loss scaler and Megatron skip such steps for fp16 overflow; bf16 and fp32, which
this project trains in, do not overflow that way, so a non-finite number here is a real divergence.
"""

import math

import torch

_bad_updates = []  # (what, value) of updates this process refused, until checkpoint_if_due reports them


def skip_if_nonfinite(params, grad_norm, loss=None):
    """Before optimizer.step: a non-finite gradient norm (over all ranks) or loss drops every gradient, so the
    step that follows changes nothing, and is recorded. Returns True when the update is refused."""
    bad = [(what, v) for what, v in (("gradient norm", grad_norm), ("loss", loss))
           if v is not None and not math.isfinite(v)]
    if bad:
        for p in params:
            p.grad = None  # AdamW skips a parameter without a gradient: no moment, decay or step count moves
        _bad_updates.append(bad[0])
    return bool(bad)


def forget_refused():
    """A new run starts clean (a run called in-process after one that crashed mid-step)."""
    _bad_updates.clear()


def stop_if_refused(out, step, run_id, env):
    """At the end of step `step` (1-based, every rank): when an update was refused, stop with an error naming
    the step and the last good checkpoint. Every rank saw the same norm, so every rank stops."""
    from vlaa.checkpoints import latest_checkpoint

    if not _bad_updates:
        return
    what, value = _bad_updates[0]
    _bad_updates.clear()
    last = latest_checkpoint(out, run_id=run_id)
    if not env["master"]:
        raise SystemExit(1)
    raise SystemExit(f"step {step}: the {what} is {value}; that update was not applied and the run stops here. "
                     + (f"The last good checkpoint is {last}: --resume continues from it (a lower --lr or "
                        "--grad-clip may be needed)." if last else "No checkpoint was written yet: start again "
                        "with other settings (a lower --lr, ...) and --overwrite."))


def nonfinite_names(named):
    """The names of the floating tensors of {name: tensor} that hold a NaN or Inf."""
    return [n for n, t in named.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def refuse_nonfinite(named, where):
    """Raise ValueError naming the non-finite tensors of {name: tensor}, before `where` is written."""
    bad = nonfinite_names(named)
    if bad:
        raise ValueError(f"not writing {where}: {len(bad)} tensor(s) hold NaN or Inf ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''})")
