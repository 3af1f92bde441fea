"""What every stage shares: JSONL with resume, records, images, prompts, encoding, generation, torchrun setup.

This file is a library, not a stage: 01-06 import it. Read it in this order:

    JSONL        read_jsonl, open_output/append_jsonl (resume: ids already written are skipped,
                 a torn last line from a killed run is dropped and redone)
    records      load_records(path, fmt="auto"): our schema and the released VLAA-Thinking files
    images       load_image: RGB, relative paths, clear errors, decompression-bomb guard
    prompts      SYSTEM_PROMPT (VLAA-Thinker's, verbatim), build_messages, encode_example, collate, encode
    models       load_model(path_or_hub_id, dtype, device) -> (model, tokenizer, image_processor)
    generation   sample_completions (token ids, for GRPO) and make_backend(name, model) -> gen(requests, n)
                 with backends hf (transformers generate), toy (toy.py's teacher), vllm and openai
    distributed  init_distributed(): the same script runs under `python` and under `torchrun`

Qwen2.5-VL's processor class needs torchvision; we only need its image path, which is ~10 lines
(`encode_example`): run the image processor, then expand the one `<|image_pad|>` of the chat
template into as many pads as the image has merged patches.
"""

import json
import os
import re

import torch

# ----------------------------------------------------------------------------------------------------
# Constants shared by the stages

# VLAA-Thinker's system prompt, verbatim (SPEC §4): training, eval and released checkpoints all use it.
SYSTEM_PROMPT = (
    "You are VL-Thinking🤔, a helpful assistant with excellent reasoning ability. A user asks you a question, "
    "and you should try to solve it. You should first think about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within <think> </think> "
    "and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>"
)

# paper (§2 #6, App. A.2): an "aha moment" is any of these, as a substring of the lower-cased text
AHA_WORDS = ("wait", "again", "double-check", "hmm", "mistake", "alternatively", "check", "i should confirm")

VERIFIER_TYPES = ("digit", "mcq", "math", "iou", "open")
# names seen for the same verifiers in the released GRPO file and third-party loaders (SPEC §1, inferred)
VERIFIER_ALIASES = {
    "digit": "digit", "digits": "digit", "number": "digit", "count": "digit", "counting": "digit",
    "mcq": "mcq", "choice": "mcq", "multiple_choice": "mcq", "multi_choice": "mcq", "option": "mcq",
    "math": "math", "math_verify": "math", "expression": "math", "latex": "math",
    "iou": "iou", "bbox": "iou", "box": "iou", "grounding": "iou",
    "open": "open", "open_ended": "open", "open-ended": "open", "rm": "open", "reward_model": "open",
    "general": "open",
}

MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # decompression-bomb guard: refuse images above 64 Mpx


def has_aha(text, words=AHA_WORDS):
    low = (text or "").lower()
    return any(w in low for w in words)


# ----------------------------------------------------------------------------------------------------
# JSONL: errors name file, line and field; outputs are appended as we go and resume after a kill


def read_jsonl(path):
    """Yield (line_number, record). A bad line is an error naming the file and line, never a skip."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            yield i, rec


def require(rec, fields, where):
    """Check that `rec` has every field, non-empty; `where` is 'file:line' for the message."""
    for f in fields:
        if rec.get(f) in (None, ""):
            raise ValueError(f"{where}: missing field '{f}' (record has: {', '.join(sorted(rec)) or 'nothing'})")


def open_output(path):
    """Open a JSONL output for appending; return (ids already written, file handle).

    A run killed mid-write leaves a torn last line (no newline, or not valid JSON): it is cut off
    here, and its record is simply redone, so nothing is lost and nothing is duplicated.
    """
    done = set()
    if os.path.exists(path):
        with open(path, "rb") as f:
            data = f.read()
        keep = 0  # byte offset after the last good line
        for line in data.splitlines(keepends=True):
            try:
                rec = json.loads(line)
            except ValueError:
                break
            if not line.endswith(b"\n"):
                break
            done.add(rec.get("id"))
            keep += len(line)
        if keep < len(data):
            with open(path, "r+b") as f:
                f.truncate(keep)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return done, open(path, "a", encoding="utf-8")


def append_jsonl(f, rec):
    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    f.flush()  # a record is either fully on disk or torn on its last line, which open_output repairs


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # all or nothing


# ----------------------------------------------------------------------------------------------------
# Records: our schema and the released VLAA-Thinking files, through one loader


def _iter_json_or_jsonl(path):
    """The released `.json` files are JSONL despite the extension (SPEC §1); accept a JSON array too."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1024).lstrip()
    if head.startswith("["):
        with open(path, encoding="utf-8") as f:
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: bad JSON ({e.msg})") from None
        for i, rec in enumerate(items, 1):
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: item {i}: expected a JSON object")
            yield i, rec
    else:
        yield from read_jsonl(path)


def normalize_verifier(value, where):
    v = VERIFIER_ALIASES.get(str(value).strip().lower())
    if v is None:
        raise ValueError(f"{where}: unknown verifier_type {value!r}; known: {', '.join(VERIFIER_TYPES)} "
                         f"(aliases: {', '.join(sorted(VERIFIER_ALIASES))})")
    return v


def _answer_block(text):
    m = re.search(r"<answer>(.*?)</answer>", text, re.S)
    return m.group(1).strip() if m else None


def _from_released(rec, where):
    """Released VLAA-Thinking record -> our schema (field names inferred, SPEC §1)."""
    out = dict(rec)
    answer = str(rec.get("answer", ""))
    if "<think>" in answer:  # SFT file: `answer` is the whole <think>/<answer> response
        out["response"] = answer
        gold = rec.get("gt") or _answer_block(answer)
    else:  # GRPO file: the ground truth is in `gt` (or `answer`)
        gold = rec.get("gt") or answer or None
    if gold in (None, ""):
        raise ValueError(f"{where}: no ground truth: looked in 'gt', 'answer' and the <answer> block of 'answer'")
    out["answer"] = str(gold)
    return out


def load_records(path, fmt="auto", image_root=None, need=("question", "answer")):
    """Read a data file into a list of records in our schema, with `image` made absolute.

    fmt: "ours" (DESIGN schema), "vlaa" (released VLAA-Thinking SFT/GRPO files) or "auto" (released
    when a record has `gt` or a `<think>` inside `answer`). Images resolve against `image_root`, else
    the file's folder. Errors name the file, the line and the field.
    """
    root = image_root or os.path.dirname(os.path.abspath(path))
    records, seen = [], set()
    for i, rec in _iter_json_or_jsonl(path):
        where = f"{path}:{i}"
        released = fmt == "vlaa" or (fmt == "auto" and ("gt" in rec or "<think>" in str(rec.get("answer", ""))))
        if released:
            rec = _from_released(rec, where)
        rec.setdefault("id", f"{os.path.basename(path)}:{i}")  # the released files may have no id
        require(rec, ("image",) + tuple(need), where)
        if rec["id"] in seen:
            raise ValueError(f"{where}: duplicate id {rec['id']!r}")
        seen.add(rec["id"])
        if rec.get("verifier_type") not in (None, ""):
            rec["verifier_type"] = normalize_verifier(rec["verifier_type"], where)
        image = rec["image"] if os.path.isabs(rec["image"]) else os.path.join(root, rec["image"])
        if not os.path.exists(image):
            raise FileNotFoundError(f"{where}: field 'image': no such file {image}")
        rec["image"] = image
        records.append(rec)
    return records


# ----------------------------------------------------------------------------------------------------
# Images


def load_image(path, where=""):
    """Open an image as RGB; a missing, corrupt or absurdly large file is an error naming the path."""
    from PIL import Image, UnidentifiedImageError

    prefix = f"{where}: " if where else ""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{prefix}image not found: {path}")
    try:
        with Image.open(path) as im:  # reads only the header: the size is known before decoding
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{prefix}image too large ({im.width}x{im.height} px, limit "
                                 f"{MAX_IMAGE_PIXELS} px): {path}")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{prefix}unreadable image {path}: {e}") from None


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


def collate(examples, pad_id, label_examples=False):
    """Left-pad a list of encode_example outputs into one batch (Qwen's M-RoPE reads the mask).

    With label_examples, adds `labels` [B, L]: -100 on padding, system, user and image tokens.
    """
    L = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
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


def encode(tokenizer, image_processor, questions, images, system=SYSTEM_PROMPT):
    """A batch of prompts (images may be None) -> left-padded model inputs ending in the assistant turn."""
    examples = [encode_example(tokenizer, image_processor, q, im, system=system) for q, im in zip(questions, images)]
    return collate(examples, tokenizer.pad_token_id)


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
# Models


def resolve_dtype(dtype, device):
    if dtype in (None, "auto"):  # bf16 on GPU, fp32 on CPU
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_model(path, dtype="auto", device="cpu", min_pixels=None, max_pixels=None, trust_remote_code=False):
    """Load a Qwen2.5-VL (local folder or hub id) -> (model, tokenizer, image_processor).

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


def vision_token_ids(config):
    """Vision special tokens: a sampled <|image_pad|> would break the next forward (cpu-env.md §4)."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [getattr(config, n) for n in names if getattr(config, n, None) is not None]


# ----------------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def sample_completions(model, batch, max_new_tokens, temperature=1.0, top_p=1.0, eos_id=None, pad_id=0):
    """Sample one completion per row of `batch` -> (ids [B, T], mask [B, T]).

    mask keeps each completion up to and including its first EOS. Under torchrun, every rank keeps
    stepping until all ranks are done (synced_gpus), so sharded (FSDP2) generation cannot deadlock.
    temperature 0 means greedy.
    """
    import torch.distributed as dist

    synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    eos_id = model.generation_config.eos_token_id if eos_id is None else eos_id
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
                         suppress_tokens=vision_token_ids(model.config), synced_gpus=synced, **sampling)
    comp = out[:, batch["input_ids"].shape[1]:]  # [B, T]
    eos_ids = eos_id if isinstance(eos_id, (list, tuple)) else [eos_id]
    is_eos = torch.isin(comp, torch.tensor(eos_ids, device=comp.device))
    mask = (is_eos.cumsum(1) - is_eos.long()) == 0  # True up to and including the first EOS
    return comp.masked_fill(~mask, pad_id), mask.long()


def make_backend(name, model, **opts):
    """A generation backend: gen(requests, n=1, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None)
    -> list of n strings per request. A request is {"prompt": str, "image": PIL or None, "system": str or None}.

    name: "hf" (model = folder or hub id, or a loaded (model, tokenizer, image_processor) triple),
    "toy" (model = "ROLE[:key=value,...]", toy.py's teacher), "vllm", "openai".
    """
    if name == "hf":
        return _hf_backend(model, **opts)
    if name == "toy":
        import toy

        return toy.make_teacher(*toy.parse_teacher_spec(model))
    if name == "vllm":
        return _vllm_backend(model, **opts)
    if name == "openai":
        return _openai_backend(model, **opts)
    raise ValueError(f"unknown backend {name!r}; known: hf, toy, vllm, openai")


def _hf_backend(model, batch_size=16, device=None, dtype="auto", min_pixels=None, max_pixels=None):
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
            examples = [encode_example(tokenizer, image_processor, r["prompt"], r.get("image"),
                                       system=r.get("system", SYSTEM_PROMPT)) for r in chunk]  # each its own system
            batch = to_device(repeat_batch(collate(examples, tokenizer.pad_token_id), n), model.device, model.dtype)
            comp, _ = sample_completions(model, batch, max_new_tokens, temperature, top_p,
                                         pad_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(comp, skip_special_tokens=True)
            outs += [texts[i * n:(i + 1) * n] for i in range(len(chunk))]
        return outs

    return gen


# --- vllm: one offline engine, tensor parallel over this node's GPUs (vllm imported only here)

_VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_end|>")


def _vllm_requests(tokenizer, requests):
    """Our requests -> vLLM prompts: chat-template token ids with ONE image placeholder, and the image.

    vLLM's Qwen2.5-VL processor expands the single <|image_pad|> to the image's token count itself,
    so unlike encode_example we must not expand it here. Token ids (not text) so that a template
    that already holds a BOS token does not get a second one.
    """
    prompts = []
    for r in requests:
        image = r.get("image")
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


def _vision_logit_bias(tokenizer):
    """{token id: -100} for the vision special tokens: a text answer must never sample them."""
    vocab = tokenizer.get_vocab()
    return {vocab[t]: -100.0 for t in _VISION_TOKENS if t in vocab}


def _vllm_backend(model, tensor_parallel_size=1, max_model_len=None, gpu_memory_utilization=0.9, min_pixels=None,
                  max_pixels=None, limit_mm_per_prompt=None, dtype="auto", seed=0, trust_remote_code=False,
                  **engine_kwargs):
    """An offline vllm.LLM (GPU). One engine per process: tensor_parallel_size = the node's GPUs for a
    72B model; for several nodes run `vllm serve` on each and use the openai backend instead."""
    from transformers import AutoConfig, AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    multimodal = getattr(config, "vision_config", None) is not None  # text-only models refuse image options
    if multimodal:
        engine_kwargs["limit_mm_per_prompt"] = limit_mm_per_prompt or {"image": 1, "video": 0}
        pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        if pixels:
            engine_kwargs["mm_processor_kwargs"] = pixels
    llm = LLM(model=model, tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
              gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, seed=seed,
              trust_remote_code=trust_remote_code, **engine_kwargs)
    bias = _vision_logit_bias(tokenizer) or None

    def gen(requests, n=1, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None, **_):
        if not multimodal and any(r.get("image") is not None for r in requests):
            raise ValueError(f"{model} is a text-only model but a request has an image")
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed,
                                logit_bias=bias)
        outs = llm.generate(_vllm_requests(tokenizer, requests), params, use_tqdm=False)
        return [[c.text for c in o.outputs] for o in outs]

    return gen


# --- openai: any OpenAI-compatible chat-completions server (vllm serve, SGLang, hosted APIs), stdlib HTTP


def _image_data_url(image):
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat_payload(model, request):
    """One request -> the messages of a chat completion; the image goes in as a data URL."""
    system = request.get("system", SYSTEM_PROMPT)
    if request.get("image") is None:  # plain string content: some text-only APIs reject content lists
        content = request["prompt"]
    else:
        content = [{"type": "image_url", "image_url": {"url": _image_data_url(request["image"])}},
                   {"type": "text", "text": request["prompt"]}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return {"model": model, "messages": messages}


def _choice_text(choice):
    """R1-style servers return the thinking apart (`reasoning_content`; newer vLLM: `reasoning`): put it back
    in front of the answer as <think>...</think>, the shape every stage parses."""
    msg = choice.get("message") or {}
    content, thinking = msg.get("content") or "", msg.get("reasoning_content") or msg.get("reasoning")
    return f"<think>{thinking}</think>{content}" if isinstance(thinking, str) and thinking else content


def _openai_backend(model, base_url=None, api_key=None, concurrency=16, timeout=120.0, retries=5, backoff=1.0,
                    max_backoff=60.0, extra_body=None):
    """Chat completions over plain urllib, `concurrency` requests in flight, spread round-robin over the
    servers of `base_url` (comma list or list: one `vllm serve` per node), each failed attempt retried
    on the next server after an exponential backoff with jitter. Retried: connection errors, timeouts,
    HTTP 408, 429 and 5xx; any other HTTP error is raised at once with the server's message.
    api_key: None reads $OPENAI_API_KEY, "" sends none. extra_body: more fields for every request."""
    import itertools
    import random
    import threading
    import time
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor
    from http.client import HTTPException

    base_url = base_url or os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
    bases = [b.strip().rstrip("/") for b in (base_url.split(",") if isinstance(base_url, str) else base_url)]
    bases = [b for b in bases if b]
    api_key = os.environ.get("OPENAI_API_KEY") if api_key is None else api_key  # "": send no key
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    turn, lock = itertools.count(), threading.Lock()

    def post(payload):
        """One chat completion, retried; -> the list of choice texts."""
        body = json.dumps(payload).encode()
        for attempt in range(retries + 1):
            with lock:
                url = f"{bases[next(turn) % len(bases)]}/chat/completions"
            wait = None
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    data = json.loads(resp.read())
                choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
                return [_choice_text(c) for c in choices]
            except urllib.error.HTTPError as e:
                try:
                    detail = e.read().decode(errors="replace")[:500]
                except (OSError, HTTPException):
                    detail = ""
                if e.code not in (408, 429) and e.code < 500:  # our request is wrong: retrying will not help
                    raise RuntimeError(f"{url}: HTTP {e.code}: {detail}") from None
                error = f"HTTP {e.code}: {detail}"
                retry_after = e.headers.get("Retry-After", "") if e.headers else ""
                wait = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None
            except (OSError, HTTPException, ValueError, KeyError) as e:  # refused, reset, timed out, bad JSON
                error = f"{type(e).__name__}: {e}"
            if attempt == retries:
                raise RuntimeError(f"openai backend: {retries + 1} attempts failed, last from {url}: {error}")
            delay = wait if wait is not None else backoff * 2 ** attempt * random.uniform(0.5, 1.5)
            time.sleep(min(delay, max_backoff))

    def one(request, n, sampling, seed):
        """n completions of one request; servers that ignore `n` are simply asked again."""
        payload = {**_chat_payload(model, request), **sampling, **(extra_body or {})}
        texts = []
        for k in itertools.count():
            want = n - len(texts)
            if want <= 0:
                return texts[:n]
            if k > n:
                raise RuntimeError(f"openai backend: asked {k} times for {n} completions, got {len(texts)}")
            texts += post({**payload, **({"n": want} if want > 1 else {}),
                           **({"seed": seed + k} if seed is not None else {})})

    def gen(requests, n=1, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None, **_):
        sampling = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        pool = ThreadPoolExecutor(max(1, min(concurrency, len(requests))))
        try:
            return list(pool.map(lambda r: one(r, n, sampling, seed), requests))
        finally:  # on Ctrl-C or an error, start no queued request
            pool.shutdown(wait=False, cancel_futures=True)

    return gen


# --- the loop of the data stages (01, 02, 03, and 06's generation): resume, progress, batches


def _relocate_image(rec, from_dir, to_dir):
    """`image` is relative to its JSONL's folder; rewrite it for a JSONL that lives in to_dir."""
    image = rec.get("image")
    if not isinstance(image, str) or not image:
        return rec
    path = image if os.path.isabs(image) else os.path.join(from_dir, image)
    return dict(rec, image=path if to_dir is None else os.path.relpath(path, to_dir))


def run_stage(in_path, out_path, process, prepare=None, need=("id",), batch_size=64, limit=None, skip_bad=False,
              desc=None):
    """Read IN, skip ids already in OUT, prepare each record, process them in batches, append to OUT.

    prepare(rec, where) -> item: per-record work that can fail on bad input (load its image, ...). `where`
    is "file:line"; a ValueError or FileNotFoundError stops the stage, or with skip_bad is reported,
    counted and left out (so a rerun tries it again). process(items) -> one output record per item,
    in order: the backend call. `rec["image"]` is absolute while it is prepared and processed, and
    written relative to OUT's folder, so it still resolves wherever OUT lives.
    Returns {"total", "done_before", "written", "bad": [message, ...]}.
    """
    from tqdm import tqdm

    in_dir, out_dir = (os.path.dirname(os.path.abspath(p)) for p in (in_path, out_path))
    records, seen = [], set()
    for i, rec in read_jsonl(in_path):  # bad JSON stops here, before any model is called
        if limit is not None and len(records) >= limit:
            break
        where = f"{in_path}:{i}"
        require(rec, ("id",), where)
        if rec["id"] in seen:  # else the second copy would be skipped as "already done"
            raise ValueError(f"{where}: duplicate id {rec['id']!r}")
        seen.add(rec["id"])
        records.append((where, rec))
    done, f = open_output(out_path)
    todo = [(w, r) for w, r in records if r["id"] not in done]
    stats = {"total": len(records), "done_before": len(records) - len(todo), "written": 0, "bad": []}
    if stats["done_before"]:
        print(f"{out_path}: {stats['done_before']} of {len(records)} records already done, resuming")
    with f, tqdm(total=len(records), initial=stats["done_before"], desc=desc, unit="rec") as bar:
        for s in range(0, len(todo), batch_size):
            chunk, items = todo[s:s + batch_size], []
            for where, rec in chunk:
                rec = _relocate_image(rec, in_dir, None)
                try:
                    require(rec, need, where)
                    items.append(prepare(rec, where) if prepare else rec)
                except (ValueError, FileNotFoundError) as e:
                    if not skip_bad:
                        raise
                    stats["bad"].append(str(e))
                    tqdm.write(f"skipped bad record: {e}")
            outs = process(items) if items else []
            if len(outs) != len(items):
                raise RuntimeError(f"process returned {len(outs)} records for {len(items)} inputs")
            for out in outs:
                append_jsonl(f, _relocate_image(out, in_dir, out_dir))
            stats["written"] += len(outs)
            bar.update(len(chunk))
    if stats["bad"]:
        print(f"{in_path}: skipped {len(stats['bad'])} bad records (--skip-bad); a rerun retries them")
    return stats


# --- command-line flags every data stage shares


def add_generation_args(parser, batch_size=64, max_new_tokens=1024, temperature=0.0, top_p=1.0):
    """The backend, sampling and loop flags of 01, 02 and 03 (each stage adds its own --model)."""
    g = parser.add_argument_group("generation")
    g.add_argument("--backend", choices=["toy", "hf", "vllm", "openai"], default="toy",
                   help="toy: toy.py's teacher (CPU); hf: transformers; vllm: offline engine on this node's GPUs; "
                        "openai: any OpenAI-compatible server (default: %(default)s)")
    g.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                   help="openai: server URL, or a comma list of them (one per node; requests are spread "
                        "round-robin) (default: $OPENAI_BASE_URL or %(default)s)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="openai: name of the environment variable holding the API key; unset: no key is sent "
                        "(default: %(default)s)")
    g.add_argument("--concurrency", type=int, default=16, help="openai: requests in flight (default: %(default)s)")
    g.add_argument("--timeout", type=float, default=600.0,
                   help="openai: seconds to wait for one response (default: %(default)s)")
    g.add_argument("--retries", type=int, default=5,
                   help="openai: retries of a request after errors, timeouts, 408, 429 and 5xx "
                        "(default: %(default)s)")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="vllm: GPUs one engine spans (8 for a 72B model) (default: %(default)s)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="vllm: context length; None keeps the model's (default: %(default)s)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="vllm: share of each GPU's memory the engine may take (default: %(default)s)")
    g.add_argument("--max-pixels", type=int, default=None,
                   help="hf/vllm: resize images to at most this many pixels (default: the model's setting)")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help="records per backend call, appended to the output after each; with openai, make it "
                        "several times --concurrency (default: %(default)s)")
    g.add_argument("--limit", type=int, default=None, help="only the first N input records (default: all)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help="the longest completion, in tokens (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    g.add_argument("--skip-bad", action="store_true",
                   help="report and count bad records (missing field or image) instead of stopping")


def backend_from_args(args, model):
    """make_backend with the options of `args.backend` taken from add_generation_args' flags."""
    opts = {
        "hf": {"batch_size": args.batch_size, "max_pixels": args.max_pixels},
        "toy": {},
        "vllm": {"tensor_parallel_size": args.tensor_parallel_size, "max_model_len": args.max_model_len,
                 "gpu_memory_utilization": args.gpu_memory_utilization, "max_pixels": args.max_pixels,
                 "seed": args.seed},
        "openai": {"base_url": args.base_url, "api_key": os.environ.get(args.api_key_env, ""),
                   "concurrency": args.concurrency, "timeout": args.timeout, "retries": args.retries},
    }[args.backend]
    return make_backend(args.backend, model, **opts)


def sampling_from_args(args):
    """The sampling keywords of a backend call, from add_generation_args' flags."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "seed": args.seed}


# ----------------------------------------------------------------------------------------------------
# Distributed


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


# ----------------------------------------------------------------------------------------------------
# Training plumbing shared by 04_sft.py and 05_grpo.py: FSDP2, LR schedule, checkpoints, export, metrics


def freeze_vision_tower(model, freeze=True):
    """paper (SFT, App. B.1): the vision encoder stays frozen; a flag trains it."""
    for p in model.model.visual.parameters():
        p.requires_grad_(not freeze)


def shard_model(model, device, world, cpu_offload=False):
    """FSDP2 under torchrun: one unit per decoder layer, the vision tower as its own unit, then the root.

    The vision tower must be its own unit: generate() calls it directly, outside the root's hooks
    (cpu-env.md §5). With one process the model is returned as is. On GPU, parameters are
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
