"""The Qwen-VL layer: the system prompt, turning (question, image) into model inputs, batching,
loading a checkpoint, and sampling with exactly the distribution GRPO's loss scores. Qwen2.5-VL and Qwen3-VL
alike: what differs is read from the checkpoint (patch size from its image processor, M-RoPE positions from
its model's get_rope_index, the chat template from its tokenizer); cached vision features: vlaa/vision.py.

Used by 04_sft.py and 05_grpo.py (encoding, batching, sampling), by vlaa.backends (the hf backend)
and by 06_eval.py. Qwen2.5-VL's processor class needs torchvision; we only need its image path, which is
a few lines (`encode_example`): run the image processor, then expand the one `<|image_pad|>` of the chat
template into as many pads as the image has merged patches.

Two traps this file handles (docs/qwen2.5-vl.md measures both):
- image tokens get 3-D M-RoPE positions (time, height, width) only when the batch carries
  `mm_token_type_ids`; without it transformers silently gives every token 1-D positions;
- `generate` merges the checkpoint's generation_config.json (Qwen's ship repetition_penalty, top_k,
  temperature): `sample_completions` samples with none of it, only what the caller asks.
"""

import contextlib

import torch

# VLAA-Thinker's system prompt, verbatim (the paper's App. Fig. 12 and the released inference.py): training,
# eval and the released checkpoints all use it
SYSTEM_PROMPT = (
    "You are VL-Thinking🤔, a helpful assistant with excellent reasoning ability. A user asks you a question, "
    "and you should try to solve it. You should first think about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within <think> </think> "
    "and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>"
)

# The largest image budget 04, 05 and 05's vLLM engine use unless --max-pixels says otherwise: the paper's
# evaluation setting (256*32*32 = 262,144 px, at most 334 image tokens; docs/paper.md). A checkpoint's own is
# far larger (Qwen2.5-VL's: 12.8 Mpx, ~16k tokens), which a prompt budget would have to hold.
MAX_PIXELS = 256 * 32 * 32


# ----------------------------------------------------------------------------------------------------
# Prompts and encoding


def build_messages(question, image=True, system=SYSTEM_PROMPT):
    """Chat messages for one question: system turn (optional), then one image and the text."""
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": content}]


def chat_prompt(tokenizer, question, n_image_tokens=None, system=SYSTEM_PROMPT):
    """The prompt text up to the assistant turn, the image's one <|image_pad|> expanded to n_image_tokens."""
    text = tokenizer.apply_chat_template(build_messages(question, n_image_tokens is not None, system),
                                         tokenize=False, add_generation_prompt=True)
    if n_image_tokens is not None:
        text = text.replace(tokenizer.image_token, tokenizer.image_token * n_image_tokens, 1)
    return text


def image_token_count(image_processor, path):
    """How many image tokens an image becomes, from its size alone (the header; no pixel decoding)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    with Image.open(path) as im:
        w, h = im.size
    factor = image_processor.patch_size * image_processor.merge_size
    size = image_processor.size
    rh, rw = smart_resize(h, w, factor=factor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    return (rh // factor) * (rw // factor)


def prompt_length(tokenizer, image_processor, question, image_path=None, response=None, system=SYSTEM_PROMPT):
    """Tokens of the encoded example (prompt, plus response and <|im_end|> when given), without decoding pixels."""
    n_image = image_token_count(image_processor, image_path) if image_path else None
    n = len(tokenizer(chat_prompt(tokenizer, question, n_image, system), add_special_tokens=False)["input_ids"])
    if response is not None:
        n += len(tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
    return n


def fitting(records, tokenizer, image_processor, max_length, system=SYSTEM_PROMPT, response=False):
    """The records whose encoding (image tokens included; with response, the answer too) fits in max_length
    tokens -> (kept, number dropped). A record is never cut: a cut through its image tokens would break the
    model's input, and a cut answer teaches a wrong one. Lengths are exact, from the image headers alone."""
    kept = [r for r in records if prompt_length(tokenizer, image_processor, r["question"], r["image"],
                                                r["response"] if response else None, system) <= max_length]
    return kept, len(records) - len(kept)


def encode_example(tokenizer, image_processor, question, image=None, response=None, system=SYSTEM_PROMPT):
    """One example -> unpadded tensors. With `response`, also the index where the answer starts.

    Returns {"input_ids": [L], "pixel_values": [patches, C*T*P*P] or None, "image_grid_thw": [1, 3] or
    None, "n_prompt": int}. Tokens from n_prompt on are the assistant's (the response and its
    <|im_end|>): the only ones SFT puts a loss on.
    """
    pixel_values = grid = n_image_tokens = None
    if image is not None:
        vis = image_processor(images=[image], return_tensors="pt")
        pixel_values, grid = vis["pixel_values"], vis["image_grid_thw"]  # [h*w, 1176], [1, 3]
        n_image_tokens = int(grid.prod()) // image_processor.merge_size ** 2  # 2x2 patches -> 1 token
    prompt_ids = tokenizer(chat_prompt(tokenizer, question, n_image_tokens, system),
                           add_special_tokens=False)["input_ids"]
    ids = prompt_ids
    if response is not None:
        ids = prompt_ids + tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return {"input_ids": torch.tensor(ids), "pixel_values": pixel_values, "image_grid_thw": grid,
            "n_prompt": len(prompt_ids), "image_token_id": tokenizer.image_token_id}


def prompt_encoder(tokenizer, image_processor, system=SYSTEM_PROMPT, cache_size=2000, model=None, response=False):
    """record -> encode_example of its question and image (and `response`, for SFT), cached for up to
    cache_size records so each image is processed once per run, not once per epoch or per GRPO sample.

    With `model`, each example also gets its M-RoPE `positions` [3, L] (time, height, width per token),
    computed once here: transformers' position code is a Python loop that GRPO would otherwise run on
    every forward of every sample."""
    from vlaa.images import load_image

    cache = {}

    def encode(r):
        if r["id"] in cache:
            return cache[r["id"]]
        ex = encode_example(tokenizer, image_processor, r["question"], load_image(r["image"], r["id"]),
                            response=r["response"] if response else None, system=system)
        if model is not None:
            ids = ex["input_ids"][None]  # [1, L]
            image_tokens = (ids == tokenizer.image_token_id).int()
            ex["positions"] = model.model.get_rope_index(  # [3, L]
                ids, mm_token_type_ids=image_tokens, image_grid_thw=ex["image_grid_thw"])[0][:, 0]
        if len(cache) < cache_size:
            cache[r["id"]] = ex
        return ex

    return encode


def collate(examples, pad_id, label_examples=False):
    """Left-pad a list of encode_example outputs into one batch (Qwen's M-RoPE reads the mask).

    With label_examples, adds `labels` [B, L]: -100 on padding, system, user and image tokens.
    """
    L = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(examples), L), dtype=torch.long)
    labels = torch.full((len(examples), L), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, L - n:] = e["input_ids"]
        mask[i, L - n:] = 1
        labels[i, L - n + e["n_prompt"]:] = e["input_ids"][e["n_prompt"]:]
    batch = {"input_ids": ids, "attention_mask": mask}
    with_images = [e for e in examples if e["pixel_values"] is not None]
    if with_images:
        # 1 marks image tokens: transformers needs it to give them 3-D (t, h, w) M-RoPE positions;
        # without it every token silently gets plain 1-D positions
        batch["mm_token_type_ids"] = (ids == examples[0]["image_token_id"]).int()
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])  # [sum patches, 1176]
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images])  # [n_images, 3]
    if label_examples:
        batch["labels"] = labels
    return batch


def repeat_batch(batch, n):
    """Repeat every prompt of a batch n times in a row (GRPO groups): rows i*n .. i*n+n-1 share prompt i."""
    out = {k: v.repeat_interleave(n, 0) for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    if "pixel_values" in batch:
        # pixel_values is a flat concatenation over images: split it per image, repeat each block
        sizes = batch["image_grid_thw"].prod(-1).tolist()
        blocks = torch.split(batch["pixel_values"], sizes)
        out["pixel_values"] = torch.cat([b for b in blocks for _ in range(n)])
        out["image_grid_thw"] = batch["image_grid_thw"].repeat_interleave(n, 0)
    return out


def to_device(batch, device, dtype=None):
    """Move a batch; pixel_values take the model's dtype (bf16 on GPU)."""
    out = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if dtype is not None and "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


# ----------------------------------------------------------------------------------------------------
# Loading


def resolve_dtype(dtype, device):
    if dtype in (None, "auto"):  # bf16 on GPU, fp32 on CPU
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_model(path, dtype="auto", device="cpu", min_pixels=None, max_pixels=None, trust_remote_code=False):
    """Load a Qwen2.5-VL or Qwen3-VL (local folder or hub id) -> (model, tokenizer, image_processor).

    min/max_pixels bound the image size the processor resizes to (the paper evaluated with
    max_pixels = 256*32*32); None keeps the checkpoint's setting.
    """
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    kw = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=resolve_dtype(dtype, device),
                                                        trust_remote_code=trust_remote_code)
    return model.to(device), tokenizer, image_processor


def training_max_pixels(path, max_pixels=None):
    """The image budget of a training run: max_pixels when given, else the checkpoint's own, at most
    MAX_PIXELS. 05 resolves it before building its vLLM engine, so the engine and the trainer agree."""
    if max_pixels is not None:
        return max_pixels
    from transformers import AutoImageProcessor

    return min(AutoImageProcessor.from_pretrained(path).size["longest_edge"], MAX_PIXELS)


def vision_token_ids(config):
    """Vision special tokens: a sampled <|image_pad|> would break the next forward (its image has no features)."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [getattr(config, n) for n in names if getattr(config, n, None) is not None]


# ----------------------------------------------------------------------------------------------------
# Sampling


@contextlib.contextmanager
def plain_generation_config(model):
    """generate() fills every setting its caller leaves unset from model.generation_config, i.e. from the
    checkpoint's generation_config.json (Qwen2.5-VL-Instruct ships repetition_penalty 1.05, top_k, top_p,
    temperature). Inside this block the model has a blank one: only what the caller passes applies."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id,
                                               pad_token_id=saved.pad_token_id)
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def sample_completions(model, batch, max_new_tokens, temperature=1.0, top_p=1.0, eos_id=None, pad_id=0,
                       return_logprobs=False):
    """Sample one completion per row of `batch` -> (ids [B, T], mask [B, T]), and with return_logprobs the
    sampler's own log-probability of each sampled token [B, T] (for tests: it costs a [B, T, V] tensor).

    The distribution is exactly softmax(logits / temperature) with the vision tokens removed (truncated to
    top_p if below 1, which GRPO's loss does not model: 05 refuses it): no repetition penalty, top-k or other
    processor from the checkpoint's generation config, so that GRPO's loss scores the tokens under the
    distribution that sampled them. temperature 0 is
    greedy. mask keeps each completion up to and including its first EOS. Under torchrun every rank keeps
    stepping until all are done (synced_gpus), so sharded (FSDP2) generation cannot deadlock.
    """
    import torch.distributed as dist

    synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    eos_id = model.generation_config.eos_token_id if eos_id is None else eos_id
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        sampling = dict(do_sample=False)
    with plain_generation_config(model):
        out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
                             suppress_tokens=vision_token_ids(model.config), synced_gpus=synced,
                             output_scores=return_logprobs, return_dict_in_generate=True, **sampling)
    comp = out.sequences[:, batch["input_ids"].shape[1]:]  # [B, T]
    eos_ids = eos_id if isinstance(eos_id, (list, tuple)) else [eos_id]
    is_eos = torch.isin(comp, torch.tensor(eos_ids, device=comp.device))
    mask = (is_eos.cumsum(1) - is_eos.long()) == 0  # True up to and including the first EOS
    comp = comp.masked_fill(~mask, pad_id)
    if not return_logprobs:
        return comp, mask.long()
    scores = torch.stack(out.scores, 1).float().log_softmax(-1)  # [B, T, V]: the processed logits generate sampled
    return comp, mask.long(), scores.gather(-1, comp.unsqueeze(-1)).squeeze(-1) * mask
