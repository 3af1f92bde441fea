"""05_grpo.py's colocated vLLM rollouts: one engine per rank, in the trainer's own process.

    llm = make_vllm_engine(args, rank)            before the policy is on the GPU (vLLM checks free memory)
    push_weights_to_vllm(llm, model, skip_vision) before each rollout: the policy's weights into the engine
    comp, mask, logp = rollout_vllm(llm, records, G, args, tokenizer, system, vision_ids)
                                                  G completions per prompt, and the engine's log-prob of
                                                  each sampled token (for the sampling-mismatch correction)
    close_vllm_engine(llm)                        at the very end: vLLM's teardown closes the process group

Each rank's engine samples its own prompts (distributed_executor_backend="external_launcher": no extra
processes, tensor parallel 1). On a GPU the engine sleeps between rollouts (weights copied to host RAM, KV
cache freed) so the trainer gets the memory back; vLLM's CPU build has no sleep mode, and there the engine
simply stays up. docs/vllm.md says what has run where.
"""

import os
import socket

import torch

from vlaa import lora
from vlaa.backends import check_vllm_cpu, vllm_memory, vllm_requests
from vlaa.images import load_image
from vlaa.qwen import resolve_dtype


def vllm_weight_name(name):
    """HF parameter name -> the name vLLM's loader expects, for Qwen2.5-VL and Qwen3-VL alike. transformers
    v5 names (model.language_model.*, model.visual.*, lm_head.*) pass through: each vLLM model maps them
    itself (its hf_to_vllm_mapper; Qwen3-VL's DeepStack mergers, model.visual.deepstack_merger_list.*, too),
    as it does for a checkpoint on disk; only the wrappers' prefixes go (activation checkpointing,
    torch.compile, FSDP1)."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def launcher_env():
    """external_launcher makes vLLM join torchrun's process group: it reads RANK and LOCAL_RANK and meets
    the other ranks through env://. Plain `python` sets none of these; default them to a world of one on a
    free local port (as TRL's colocate mode does), and vLLM then starts that one-rank group itself."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)


def engine_context(args):
    """The engine's context length: the longest prompt 05 keeps (--max-prompt-length, image tokens
    included) plus the longest completion. Prompts over the limit are dropped when the data is loaded;
    one here would make vLLM refuse the whole rollout."""
    return args.max_prompt_length + args.max_new_tokens


def make_vllm_engine(args, rank):
    """One engine per rank, in this process, computing in the trainer's precision (bf16 on GPU, fp32 on
    CPU: the weight push copies the policy as it is). Built before the policy lands on the GPU: vLLM checks
    free memory at start. Under torchrun the process group must exist already (05 makes it first)."""
    from transformers import AutoConfig

    dtype = resolve_dtype("auto", "cuda" if torch.cuda.is_available() else "cpu")
    check_vllm_cpu(args.model, AutoConfig.from_pretrained(args.model), dtype)  # Qwen3.5 on a CPU: fp32 refused
    launcher_env()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process: weights reachable
    from vllm import LLM
    from vllm.platforms import current_platform

    sleep = current_platform.is_sleep_mode_available()  # GPU builds; vLLM's CPU build refuses sleep mode
    pixels = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v}
    context = engine_context(args)
    llm = LLM(model=args.model, tensor_parallel_size=1, distributed_executor_backend="external_launcher",
              dtype=dtype, seed=args.seed + rank,
              max_model_len=context, max_num_batched_tokens=max(8192, context), enable_sleep_mode=sleep,
              enable_prefix_caching=True, limit_mm_per_prompt={"image": 1, "video": 0}, mm_processor_cache_gb=0,
              mm_processor_kwargs=pixels or None,
              logprobs_mode="processed_logprobs",  # log-probs after temperature, as the trainer computes them
              **vllm_memory(args.vllm_gpu_memory, gpu_default=0.3))
    if sleep:
        llm.sleep(level=1)  # level 1 keeps a host copy of the weights: a push that skips the vision tower is right
    return llm


def engine_sleeps(llm):
    return llm.llm_engine.model_config.enable_sleep_mode


def push_weights_to_vllm(llm, model, skip_vision):
    """Load the policy's weights into the engine, cast to the engine's dtype, then drop what the old
    weights computed: the prefix cache (KV blocks) and the encoder cache (vision embeddings of images seen
    before). One load_weights call over a generator: tensors are gathered one at a time (full_tensor() is
    a collective: every rank walks the same names in the same order), and a tied lm_head, which vLLM skips
    in favour of the embedding, arrives in the same call as that embedding (vLLM refuses it alone). Every
    engine parameter must be written (the frozen vision tower's excepted with skip_vision): a name vLLM
    could not map would otherwise leave a stale weight behind without a word."""
    if engine_sleeps(llm):
        torch.cuda.empty_cache()
        llm.wake_up(tags=["weights"])
    runner_model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    dtype = llm.llm_engine.model_config.dtype

    def weights():
        state = {n: t for n, t in model.state_dict().items() if not (skip_vision and ".visual." in f".{n}")}
        # skipped: frozen, the engine's copy is already right (every rank skips the same names). With LoRA
        # the engine gets the merged weights under the base names, W + scale * B @ A per tensor: simpler than
        # vLLM's own LoRA path (an adapter loaded per request) and the same numbers
        whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
        for name, t in lora.merged(state, lora.scales(model), whole):
            yield vllm_weight_name(name), t.to(dtype)

    loaded = runner_model.load_weights(weights())
    missed = [n for n, _ in runner_model.named_parameters()
              if n not in loaded and not (skip_vision and n.startswith("visual."))]
    if missed:
        raise RuntimeError(f"the weight push left {len(missed)} engine parameters unwritten, e.g. {missed[:3]}")
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()
    if engine_sleeps(llm):
        llm.wake_up(tags=["kv_cache"])


def rollout_vllm(llm, records, group_size, args, tokenizer, system, vision_ids):
    """G completions per prompt from the colocated engine -> (ids [N, T], mask [N, T], log-probs [N, T]),
    N = prompts * G, rows p*G .. p*G+G-1 for prompt p; mask covers each completion up to and including its
    EOS; log-probs are the engine's own for the sampled tokens, after temperature, 0 on padding.

    Prompts are built as 06's vllm backend builds them (backends.vllm_requests): token ids with one
    <|image_pad|> per image, which the engine expands to the image's size as the trainer's image processor does,
    so no BOS or template difference creeps in."""
    from vllm import SamplingParams

    sp = SamplingParams(n=group_size, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
                        logit_bias={i: -100.0 for i in vision_ids},  # never sample vision tokens
                        logprobs=0)  # 0: the sampled token's log-prob only
    reqs = vllm_requests(tokenizer, [{"prompt": r["question"], "image": load_image(r["image"], r["id"]),
                                      "system": system} for r in records])
    outs = llm.generate(reqs, sp, use_tqdm=False)
    if engine_sleeps(llm):
        llm.sleep(level=1)
    samples = [o for out in outs for o in out.outputs]  # N, grouped by prompt
    T = max(1, max(len(o.token_ids) for o in samples))
    comp = torch.full((len(samples), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(samples), T), dtype=torch.long)
    logp = torch.zeros((len(samples), T))
    for i, o in enumerate(samples):
        ids = list(o.token_ids)
        comp[i, :len(ids)], mask[i, :len(ids)] = torch.tensor(ids, dtype=torch.long), 1
        logp[i, :len(ids)] = torch.tensor([o.logprobs[t][tok].logprob for t, tok in enumerate(ids)])
    return comp, mask, logp


def close_vllm_engine(llm):
    """Shut the engine down. Its teardown also destroys torch's default process group (the trainer's,
    under torchrun): call it after the last collective, in place of destroy_process_group."""
    llm.llm_engine.engine_core.shutdown()
