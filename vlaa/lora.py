"""LoRA for 04_sft.py and 05_grpo.py: low-rank adapters on the language model's linear layers, so that the
recipe trains on one 24 GB GPU (README, "What do I need"). Off unless --lora-rank is given.

    lora.add_flags(p)                         --lora-rank/-alpha/-dropout/-targets, --save-adapter
    training.load_trainable(..., lora=lora.settings(args))
                                              the model, the adapters injected in place, only they train
    with lora.disabled(model): ...            05's reference: the policy with its adapters off (no second copy)
    lora.merged(state_dict, lora.scales(model))
                                              (name, W + scale * B @ A) under the base names: the merged
                                              export (vlaa/export.py) and the weight push to vLLM (colocate.py)
    lora.save_adapter(model, folder)          the adapter alone, a folder that peft's PeftModel.from_pretrained reads

Targets are chosen by module name under the language model (`model.model.language_model`), never by model
family: every nn.Linear there whose own name is in --lora-targets (Qwen2.5-VL and Qwen3-VL name their
projections alike; Qwen3.5 has q/k/v/o_proj in its full-attention layers only, its gated delta-net layers'
in_proj_qkv/in_proj_z/out_proj are adapted when named). Every name given must name a layer: a typo is refused,
never skipped (the defaults exist in all three families). Qwen2.5-VL's vision tower's MLP has gate_proj/up_proj/
down_proj too, so a bare list of names given to peft would adapt it as well (EasyR1 excludes ".*visual.*" for
the same reason): the full names are given.

The adapters go into the model in place (peft.inject_adapter_in_model, as transformers' add_adapter does)
rather than in a PeftModel wrapper (TRL's get_peft_model): the model keeps its class and attribute paths,
so FSDP2's units, generate() and the frozen vision tower stay as they are. The reference is then TRL's
`with model.disable_adapter()`, done with the switch that context uses (BaseTunerLayer.enable_adapters).
Checkpoints hold the adapters only (the base weights are --model's, part of the run identity); the final
OUT/model is the merged model, a plain Hugging Face folder, and --save-adapter adds OUT/adapter.

    # one 24 GB GPU: Qwen2.5-VL-3B, GRPO with LoRA (the README's command)
    python 05_grpo.py --model Qwen/Qwen2.5-VL-3B-Instruct --data ... --lora-rank 64 --lr 1e-5 --rollout vllm ...
"""

import contextlib
import os

import torch

from vlaa.flags import nonneg_int, positive_float, probability

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
ADAPTER = "default"  # peft's adapter name; one adapter per model here


def add_flags(parser):
    parser.add_argument("--lora-rank", type=nonneg_int, default=0, help="LoRA rank R: train low-rank adapters on "
                        "the language model's linear layers, not the model; 0: off, full fine-tuning (default)")
    parser.add_argument("--lora-alpha", type=positive_float, default=None,
                        help="LoRA alpha; the update is scaled by alpha / R (default: 2 x R)")
    parser.add_argument("--lora-dropout", type=probability, default=0.0, help="dropout on the adapters' input "
                        "(default: %(default)s, so the loss scores the distribution that was sampled)")
    parser.add_argument("--lora-targets", default=TARGETS, help="comma-separated names of the language model's "
                        "linear layers to adapt (default: %(default)s); the vision tower is never adapted")
    parser.add_argument("--save-adapter", action="store_true", help="with --lora-rank: also write the adapter "
                        "alone to OUT/adapter (a peft folder); OUT/model is always the merged model")


def check(args):
    """The LoRA flags' combinations -> the first problem or None (flags.check_sft and check_grpo call it)."""
    given = [f for f, v in (("--lora-alpha", args.lora_alpha is not None), ("--lora-dropout", args.lora_dropout),
                            ("--lora-targets", args.lora_targets != TARGETS), ("--save-adapter", args.save_adapter))
             if v]
    if not args.lora_rank:
        return given and f"{given[0]} needs --lora-rank R (LoRA is off without it)"
    if args.train_vision:
        return "--train-vision with --lora-rank: the adapters are on the language model only; the vision tower " \
               "would train in full beside them. Choose one"
    if getattr(args, "ref_offload", False):
        return "--ref-offload with --lora-rank: there is no reference copy to offload (it is the policy with its " \
               "adapters off)"
    if not [t for t in args.lora_targets.split(",") if t.strip()]:
        return "--lora-targets names no layer"


def settings(args):
    """The LoRA settings load_trainable takes, or None when --lora-rank is 0."""
    if not args.lora_rank:
        return None
    return {"rank": args.lora_rank, "alpha": args.lora_alpha or 2.0 * args.lora_rank, "dropout": args.lora_dropout,
            "targets": [t.strip() for t in args.lora_targets.split(",") if t.strip()], "base": args.model}


# ----------------------------------------------------------------------------------------------------
# Adapters in, only they train


def target_names(model, targets):
    """Full names of the nn.Linear layers under model.model.language_model whose own name is in `targets`.
    A target that names none of them is an error naming what the language model's linear layers are called."""
    root = "model.language_model"
    linears = [(n, n.rpartition(".")[2]) for n, m in model.get_submodule(root).named_modules()
               if isinstance(m, torch.nn.Linear)]
    unknown = sorted(set(targets) - {leaf for _, leaf in linears})
    if unknown:
        raise SystemExit(f"--lora-targets {','.join(unknown)}: no linear layer of the language model has this name "
                         f"(it has: {', '.join(sorted({leaf for _, leaf in linears}))})")
    return [f"{root}.{n}" for n, leaf in linears if leaf in targets]


def add_adapters(model, rank, alpha, dropout, targets, base, seed=0):
    """Freeze the whole model, then inject LoRA adapters (A random, B zero: the model computes as before) into
    the target layers; only the adapters require grad. The init draws from its own generator seeded with
    `seed`, so every rank (05 seeds each rank differently) and a rerun start from the same adapters."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_names(model, targets),
                        base_model_name_or_path=base, bias="none")
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for n, p in model.named_parameters():  # peft makes them in the base's dtype: fp32 masters for AdamW
        if is_adapter(n):
            p.data = p.data.float()
    return model


def is_adapter(name):
    """True for an adapter tensor's name (…q_proj.lora_A.default.weight)."""
    return ".lora_" in name


def adapter_layers(model):
    """{module name: LoRA layer} of a model with adapters ({} without)."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@contextlib.contextmanager
def disabled(model):
    """Inside the block the model computes as its base: every adapter off (peft's disable_adapter, TRL's
    reference for a peft model). Adapters are switched back on, and to requires_grad, afterwards."""
    layers = adapter_layers(model).values()
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


# ----------------------------------------------------------------------------------------------------
# Out: merged weights under the base names, or the adapter alone


def scales(model):
    """{adapted layer's name: alpha / rank} (peft's `scaling`; rsLoRA's, had it been chosen)."""
    return {n: m.scaling[ADAPTER] for n, m in adapter_layers(model).items()}


def merged(state, layer_scales, full=lambda t: t):
    """Yield (name, tensor) of the model as it computes, from its state dict: an adapted layer's weight as
    W + scale * B @ A under the base name (`q_proj.weight`, not `q_proj.base_layer.weight`), its adapter
    tensors not at all, every other tensor as it is. `full` makes each tensor whole (FSDP2: full_tensor, a
    collective, so every rank walks the same names); the merge is computed in fp32 and cast back."""
    for name, t in state.items():
        if is_adapter(name):
            continue
        owner, _, leaf = name.rpartition(".")
        if not owner.endswith(".base_layer"):
            yield name, full(t)
            continue
        owner = owner[:-len(".base_layer")]
        w = full(t)
        if leaf == "weight" and owner in layer_scales:
            a = full(state[f"{owner}.lora_A.{ADAPTER}.weight"]).float()  # [R, in]
            b = full(state[f"{owner}.lora_B.{ADAPTER}.weight"]).float()  # [out, R]
            w = (w.float() + layer_scales[owner] * (b @ a)).to(w.dtype)  # [out, in]
        yield f"{owner}.{leaf}", w


def save_adapter(model, state, folder):
    """The adapter alone as a peft folder (adapter_config.json, adapter_model.safetensors) that
    PeftModel.from_pretrained(base model, folder) loads. `state`: the full state dict (rank 0's)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    model.peft_config[ADAPTER].save_pretrained(folder)
    # peft's file format: the names under a PeftModel (base_model.model.), without the adapter's name
    tensors = {"base_model.model." + n.replace(f".{ADAPTER}.", "."): t.contiguous() for n, t in state.items()
               if is_adapter(n)}
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder
