"""The end of a training run (04_sft.py, 05_grpo.py): OUT/model, a plain Hugging Face folder that transformers
and vLLM load like any checkpoint of the model's family, written whole or not at all. With LoRA (vlaa/lora.py)
it is the merged model (W + scale * B @ A under the base names), and --save-adapter adds OUT/adapter, the
adapter alone as a peft folder. vlaa/training.py's finish_training calls it; vlaa/runs.py asks export_complete
whether a finished run's export is whole. Resumable checkpoints are vlaa/checkpoints.py.
"""

import os
import shutil

from vlaa import finite, lora
from vlaa.checkpoints import _read_json


def export_hf(model, tokenizer, image_processor, out, rank=0, dtype=None, adapter=None):
    """The final model as a plain Hugging Face folder that transformers and vLLM load like the
    checkpoint it started from. Under FSDP2 the full weights are gathered (a collective: every rank calls).
    Atomic: written into OUT.partial, then renamed to OUT, so OUT is complete or absent (a kill mid-export
    leaves no torn folder; --resume of a finished run exports again). Refused if any weight is NaN or Inf.
    A model with LoRA adapters is exported merged; `adapter`: a folder for the adapter alone as well."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    if adapter:
        lora.save_adapter(model, sd, adapter)
    sd = dict(lora.merged(sd, lora.scales(model)))  # no adapters: the same tensors
    dtype = dtype or next(iter(sd.values())).dtype
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    finite.refuse_nonfinite(sd, out)  # after the cast: a value too large for dtype is Inf there
    # FSDP2 renames the class (FSDPQwen2_5_VL...): record the real architecture for from_pretrained
    arch = next(c.__name__ for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))
    model.config.architectures = [arch]
    partial = out.rstrip(os.sep) + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # a killed export's leftovers
    model.save_pretrained(partial, state_dict=sd)
    tokenizer.save_pretrained(partial)
    image_processor.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)  # a torn or older export: replaced whole
    os.rename(partial, out)
    return out


EXPORT_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json")


def export_complete(folder):
    """True when `folder` is a whole export: its config files are JSON and every weight file its index names
    (or model.safetensors) is a safetensors file whose header matches its size (a truncated file fails here)."""
    from safetensors import safe_open

    if not all(isinstance(_read_json(os.path.join(folder, f)), dict) for f in EXPORT_FILES):
        return False
    index = _read_json(os.path.join(folder, "model.safetensors.index.json"))
    names = set(index.get("weight_map", {}).values()) if index else {"model.safetensors"}
    try:
        for name in names:
            with safe_open(os.path.join(folder, name), framework="pt"):
                pass
    except Exception:  # missing, truncated, not safetensors: all the same here, export again
        return False
    return bool(names)
