"""Resumable checkpoints and the final Hugging Face export, shared by 04_sft.py and 05_grpo.py.

OUT/checkpoints/ckpt-STEP holds the model and optimizer state, the step, the data position and each
rank's RNG; a DONE file marks it complete, so a run killed while saving resumes from the previous one.
OUT/model is a plain Hugging Face folder that transformers and vLLM load like any Qwen2.5-VL checkpoint.
"""

import json
import os

import torch


def latest_checkpoint(out):
    """The newest complete checkpoint folder OUT/ckpt-STEP, or None."""
    root = os.path.join(out, "checkpoints")
    steps = [int(d.split("-")[1]) for d in os.listdir(root) if d.startswith("ckpt-")
             and os.path.exists(os.path.join(root, d, "DONE"))] if os.path.isdir(root) else []
    return os.path.join(root, f"ckpt-{max(steps)}") if steps else None


def save_checkpoint(out, step, model, optimizer, extra, rank=0, keep=2):
    """A resumable checkpoint (torch.distributed.checkpoint): sharded model and optimizer, the step,
    the data position and this rank's RNG, in OUT/checkpoints/ckpt-STEP. A `DONE` file marks it complete,
    so a run killed while saving resumes from the previous one."""
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = os.path.join(out, "checkpoints", f"ckpt-{step}")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    torch.save({"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                else []}, os.path.join(path, f"rng-{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        with open(os.path.join(path, "trainer.json"), "w") as f:
            json.dump({"step": step, **extra}, f)
        open(os.path.join(path, "DONE"), "w").close()
        old = sorted((d for d in os.listdir(os.path.dirname(path)) if d.startswith("ckpt-")),
                     key=lambda d: int(d.split("-")[1]))[:-keep]
        for d in old:
            shutil.rmtree(os.path.join(os.path.dirname(path), d), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def load_checkpoint(path, model, optimizer, rank=0):
    """Restore what save_checkpoint wrote; returns trainer.json (step, data position, ...)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = torch.load(os.path.join(path, f"rng-{rank}.pt"), weights_only=True)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    with open(os.path.join(path, "trainer.json")) as f:
        return json.load(f)


def export_hf(model, tokenizer, image_processor, out, rank=0, dtype=None):
    """The final model as a plain Hugging Face folder that transformers and vLLM load like any
    Qwen2.5-VL checkpoint. Under FSDP2 the full weights are gathered (a collective: every rank calls)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    dtype = dtype or next(iter(sd.values())).dtype
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    # FSDP2 renames the class (FSDPQwen2_5_VL...): record the real architecture for from_pretrained
    arch = next(c.__name__ for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))
    model.config.architectures = [arch]
    model.save_pretrained(out, state_dict=sd)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out


def finish_training(out, step, model, optimizer, extra, tokenizer, image_processor, env):
    """The end of 04 and 05: a last checkpoint, the Hugging Face export (bf16 from a GPU run), and the
    process group closed. Returns the model folder on rank 0."""
    import torch.distributed as dist

    save_checkpoint(out, step, model, optimizer, extra, env["rank"])
    dtype = torch.bfloat16 if env["device"].type == "cuda" else torch.float32
    folder = export_hf(model, tokenizer, image_processor, os.path.join(out, "model"), env["rank"], dtype)
    if env["master"]:
        print(f"saved {folder}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return folder
