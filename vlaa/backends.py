"""Generation backends for the data stages (01-03) and eval (06): one interface, four engines.

    gen = make_backend(name, model, **options)
    gen(requests, n=1, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None) -> [[text] * n per request]

A request is {"prompt": str, "image": a path, a PIL image or None, "system": str or None}. Images given
as paths are decoded only when their request is sent (a chunk at a time), so a batch of large images
never sits in memory at once. Backends:

    hf      transformers generate, any device (CPU for the toy model)
    toy     toy.py's teacher (captioner, reasoner, rewriter, judge), CPU, no model at all
    vllm    an offline vLLM engine on this node (tensor parallel over its GPUs; vLLM's CPU build in tests)
    openai  any OpenAI-compatible server (vllm serve, SGLang, hosted APIs): vlaa/openai_client.py
"""

import torch

from vlaa.images import load_image
from vlaa.jsonl import InputError
from vlaa.qwen import (
    SYSTEM_PROMPT,
    build_messages,
    collate,
    encode_example,
    load_model,
    repeat_batch,
    sample_completions,
    to_device,
)


def make_backend(name, model, **opts):
    """name: "hf" (model = folder or hub id, or a loaded (model, tokenizer, image_processor) triple),
    "toy" (model = "ROLE[:key=value,...]"), "vllm" (folder or hub id), "openai" (a served model name)."""
    if name == "hf":
        return hf_backend(model, **opts)
    if name == "toy":
        import toy  # the offline world, imported only when asked for (it imports nothing of the project)

        teacher = toy.make_teacher(*toy.parse_teacher_spec(model))  # its pixels come through the one loader too
        return lambda requests, **kw: teacher([r | {"image": request_image(r)} for r in requests], **kw)
    if name == "vllm":
        return vllm_backend(model, **opts)
    if name == "openai":
        from vlaa.openai_client import openai_backend

        return openai_backend(model, **opts)
    raise ValueError(f"unknown backend {name!r}; known: hf, toy, vllm, openai")


def request_image(request):
    """The request's image as RGB PIL through the one loader (decoded now if it is a path), or None."""
    image = request.get("image")
    return None if image is None else load_image(image)


# ----------------------------------------------------------------------------------------------------
# hf: transformers generate


def hf_backend(model, batch_size=16, device=None, dtype="auto", min_pixels=None, max_pixels=None):
    if isinstance(model, (tuple, list)):
        model, tokenizer, image_processor = model
    else:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer, image_processor = load_model(model, dtype, device, min_pixels, max_pixels)
    model.eval()

    def gen(requests, n=1, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None, **_):
        if seed is not None:
            torch.manual_seed(seed)
        outs = []
        per_call = max(1, batch_size // n)  # prompts per generate call, each sampled n times
        for s in range(0, len(requests), per_call):
            chunk = requests[s:s + per_call]
            examples = [encode_example(tokenizer, image_processor, r["prompt"], request_image(r),
                                       system=r.get("system", SYSTEM_PROMPT)) for r in chunk]  # each its own system
            batch = to_device(repeat_batch(collate(examples, tokenizer.pad_token_id), n), model.device, model.dtype)
            comp, _ = sample_completions(model, batch, max_new_tokens, temperature, top_p,
                                         pad_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(comp, skip_special_tokens=True)
            outs += [texts[i * n:(i + 1) * n] for i in range(len(chunk))]
        return outs

    return gen


# ----------------------------------------------------------------------------------------------------
# vllm: one offline engine, tensor parallel over this node's GPUs (vllm is imported only here)

VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_end|>")
VLLM_CHUNK = 256  # requests whose images are decoded and handed to the engine at once
CPU_KV_CACHE_BYTES = 1 << 30  # vLLM's CPU build: 1 GiB of KV cache (the toy model: ~500k tokens)


def vllm_memory(gpu_memory_utilization=None, gpu_default=0.9):
    """The engine's memory keywords. On a GPU: the share of its memory the engine may take (gpu_default
    unless given). vLLM's CPU build reads the same share as host RAM that must hold this whole process too
    (it subtracts the process's resident memory), so any default share refuses to start on some machine;
    there the KV cache gets a fixed size instead, unless a share is given."""
    if gpu_memory_utilization is not None:
        return {"gpu_memory_utilization": gpu_memory_utilization}
    if not torch.cuda.is_available():
        return {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
    return {"gpu_memory_utilization": gpu_default}


def check_vllm_cpu(model, config, dtype):
    """Refuse, before an engine starts, a model that vLLM's CPU build cannot run at `dtype`: its kernel for gated
    delta-net (linear attention) layers, 3 of every 4 of Qwen3.5's, takes bf16 only and heads 64 or 128 wide
    (vllm/model_executor/layers/mamba/ops/cpu/gdn_attention.py, "CPU GDN attention requires BF16."; C++:
    "Unexpected head dim size"). It fails at the first prompt, with a traceback. GPU builds have other kernels."""
    text = getattr(config, "text_config", config)
    if (torch.cuda.is_available() or "linear_attention" not in (getattr(text, "layer_types", None) or [])
            or not hasattr(text, "linear_key_head_dim")):  # Qwen3-Next's and Qwen3.5's layout only
        return
    if dtype in (None, "auto"):  # vLLM's "auto": the checkpoint's dtype, fp32 when it names none
        dtype = getattr(config, "dtype", None) or "float32"
    dtype = str(dtype).removeprefix("torch.")
    heads = {text.linear_key_head_dim, text.linear_value_head_dim}
    if dtype != "bfloat16" or not heads <= {64, 128}:
        raise InputError(f"{model}: vLLM's CPU build runs gated delta-net (linear attention) layers in bfloat16 "
                         f"with 64- or 128-wide heads only, not {dtype} with {sorted(heads)}: on a CPU, generate "
                         "with transformers (--backend hf, --rollout hf)")


def vllm_requests(tokenizer, requests):
    """Our requests -> vLLM prompts: chat-template token ids with ONE image placeholder, and the image.

    vLLM's Qwen2.5-VL and Qwen3-VL processors expand the single <|image_pad|> to the image's token count,
    so unlike encode_example we must not expand it here. Token ids (not text) so that a template
    that already holds a BOS token does not get a second one.
    """
    prompts = []
    for r in requests:
        image = request_image(r)
        messages = build_messages(r["prompt"], image is not None, r.get("system", SYSTEM_PROMPT))
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
        if image is not None:
            if text.count("<|image_pad|>") != 1:
                raise ValueError("the vllm backend needs a Qwen-VL chat template (one <|image_pad|> per image); "
                                 "serve other VLMs with `vllm serve` and use the openai backend")
            prompt["multi_modal_data"] = {"image": image}
        prompts.append(prompt)
    return prompts


def vision_logit_bias(tokenizer):
    """{token id: -100} for the vision special tokens: a text answer must never sample them."""
    vocab = tokenizer.get_vocab()
    return {vocab[t]: -100.0 for t in VISION_TOKENS if t in vocab}


def vllm_backend(model, tensor_parallel_size=1, max_model_len=None, gpu_memory_utilization=None, min_pixels=None,
                 max_pixels=None, limit_mm_per_prompt=None, dtype="auto", seed=0, trust_remote_code=False,
                 **engine_kwargs):
    """An offline vllm.LLM. One engine per process: tensor_parallel_size = the node's GPUs for a 72B
    model; for several nodes run `vllm serve` on each and use the openai backend instead."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    check_vllm_cpu(model, config, dtype)
    from vllm import LLM, SamplingParams
    multimodal = getattr(config, "vision_config", None) is not None  # text-only models refuse image options
    if multimodal:
        engine_kwargs["limit_mm_per_prompt"] = limit_mm_per_prompt or {"image": 1, "video": 0}
        pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        if pixels:
            engine_kwargs["mm_processor_kwargs"] = pixels
    llm = LLM(model=model, tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, dtype=dtype,
              seed=seed, trust_remote_code=trust_remote_code, **vllm_memory(gpu_memory_utilization), **engine_kwargs)
    bias = vision_logit_bias(tokenizer) or None

    def gen(requests, n=1, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None, **_):
        if not multimodal and any(r.get("image") is not None for r in requests):
            raise ValueError(f"{model} is a text-only model but a request has an image")
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed,
                                logit_bias=bias)
        outs = []
        for s in range(0, len(requests), VLLM_CHUNK):
            done = llm.generate(vllm_requests(tokenizer, requests[s:s + VLLM_CHUNK]), params, use_tqdm=False)
            outs += [[c.text for c in o.outputs] for o in done]
        return outs

    return gen

