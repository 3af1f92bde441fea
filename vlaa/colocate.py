"""05_grpo.py's colocated vLLM rollouts: one engine per rank, in the trainer's own process.

    llm = make_vllm_engine(args, rank)          before the policy is on the GPU (vLLM checks free memory)
    push_weights_to_vllm(llm, model, ...)       after each update: the policy's weights into the engine
    rollout_vllm(llm, records, G, args, ...)    G completions per prompt -> (ids [N, T], mask [N, T])

Each rank's engine samples its own prompts (external_launcher: no extra processes, tensor parallel 1);
between rollouts it sleeps (GPU only) so the trainer gets its memory back.
"""

import os

import torch

from vlaa.qwen import chat_prompt
from vlaa.records import load_image


def vllm_weight_name(name):
    """HF parameter name -> the name vLLM's Qwen2.5-VL loader expects. transformers v5 names
    (model.language_model.*, model.visual.*, lm_head.*) pass through: vLLM maps them itself; only the
    wrappers' prefixes go (activation checkpointing, torch.compile, FSDP1)."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def make_vllm_engine(args, rank):
    """One engine per rank, in this process (external_launcher), asleep until the first rollout.
    Built before the training model lands on the GPU: vLLM checks free memory at start."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process: weights reachable
    from vllm import LLM

    mm_kwargs = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v}
    llm = LLM(model=args.model, tensor_parallel_size=1, distributed_executor_backend="external_launcher",
              dtype="bfloat16", seed=args.seed + rank, gpu_memory_utilization=args.vllm_gpu_memory,
              max_model_len=args.max_new_tokens + 4096, enable_sleep_mode=True, enable_prefix_caching=True,
              limit_mm_per_prompt={"image": 1, "video": 0}, mm_processor_cache_gb=0,
              mm_processor_kwargs=mm_kwargs or None, max_num_batched_tokens=max(8192, args.max_new_tokens + 4096))
    llm.sleep(level=1)  # level 1 keeps a CPU copy of the weights: a partial push stays correct
    return llm


def push_weights_to_vllm(llm, model, skip_vision):
    """Wake the engine's weights and load the policy's, one full tensor at a time (full_tensor() is a
    collective: every rank walks the same names in the same order), then wake the KV cache."""
    torch.cuda.empty_cache()
    llm.wake_up(tags=["weights"])
    runner_model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    for name, t in model.state_dict().items():
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        if skip_vision and ".visual." in f".{name}":
            continue  # frozen: the engine's copy is already right
        runner_model.load_weights([(vllm_weight_name(name), full.to(torch.bfloat16))])
    llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
    llm.wake_up(tags=["kv_cache"])


def rollout_vllm(llm, records, group_size, args, tokenizer, system, vision_ids):
    """Generate with the colocated engine; it expands the one <|image_pad|> per prompt itself."""
    from vllm import SamplingParams

    sp = SamplingParams(n=group_size, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
                        logit_bias={i: -100.0 for i in vision_ids})  # never sample vision tokens
    reqs = [{"prompt": chat_prompt(tokenizer, r["question"], 1, system),
             "multi_modal_data": {"image": load_image(r["image"], r["id"])}} for r in records]
    outs = llm.generate(reqs, sp, use_tqdm=False)
    llm.sleep(level=1)
    seqs = [list(o.token_ids) for out in outs for o in out.outputs]  # P*G, grouped by prompt
    T = max(1, max(len(s) for s in seqs))
    comp = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        comp[i, :len(s)], mask[i, :len(s)] = torch.tensor(s, dtype=torch.long), 1
    return comp, mask
