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


def encode_example(tokenizer, image_processor, question, image=None, response=None, system=SYSTEM_PROMPT):
    """One example -> unpadded tensors. With `response`, also the index where the answer starts.

    Returns {"input_ids": [L], "pixel_values": [patches, C*T*P*P] or None, "image_grid_thw": [1, 3] or
    None, "n_prompt": int}. Tokens from n_prompt on are the assistant's (the response and its
    <|im_end|>): the only ones SFT puts a loss on.
    """
    text = tokenizer.apply_chat_template(build_messages(question, image is not None, system),
                                         tokenize=False, add_generation_prompt=True)
    pixel_values = grid = None
    if image is not None:
        vis = image_processor(images=[image], return_tensors="pt")
        pixel_values, grid = vis["pixel_values"], vis["image_grid_thw"]  # [h*w, 1176], [1, 3]
        n_image_tokens = int(grid.prod()) // image_processor.merge_size ** 2  # 2x2 patches -> 1 token
        pad = tokenizer.image_token
        text = text.replace(pad, pad * n_image_tokens, 1)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = prompt_ids
    if response is not None:
        ids = prompt_ids + tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return {"input_ids": torch.tensor(ids), "pixel_values": pixel_values, "image_grid_thw": grid,
            "n_prompt": len(prompt_ids)}


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
    out = {k: v.to(device) for k, v in batch.items()}
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
            batch = encode(tokenizer, image_processor, [r["prompt"] for r in chunk], [r.get("image") for r in chunk],
                           system=chunk[0].get("system", SYSTEM_PROMPT))
            batch = to_device(repeat_batch(batch, n), model.device, model.dtype)
            comp, _ = sample_completions(model, batch, max_new_tokens, temperature, top_p,
                                         pad_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(comp, skip_special_tokens=True)
            outs += [texts[i * n:(i + 1) * n] for i in range(len(chunk))]
        return outs

    return gen


def _vllm_backend(model, **opts):
    raise NotImplementedError("the vllm backend comes with the data-pipeline stages")


def _openai_backend(model, **opts):
    raise NotImplementedError("the openai backend comes with the data-pipeline stages")


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
