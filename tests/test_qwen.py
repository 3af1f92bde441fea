"""vlaa/qwen.py and the hf backend by example: the tiny model, encoding, batching, generation."""

import torch
from conftest import solid_image

import toy
from vlaa import backends, qwen, training


def encode_batch(tok, ip, questions, images):
    """A left-padded batch of prompts, as the hf backend builds it."""
    return qwen.collate([qwen.encode_example(tok, ip, q, im) for q, im in zip(questions, images)], tok.pad_token_id)


def test_tiny_model_reloads_offline_with_auto_classes(tiny_model_dir):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ip = AutoImageProcessor.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert tok.image_token == "<|image_pad|>" and tok.image_token_id == model.config.image_token_id
    assert ip.merge_size == 2
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2


def test_tokenizer_is_byte_level_and_compact(tiny):
    _, tok, _ = tiny
    weird = "Ünïcode ∑ 数学 🤔 <b>"
    assert tok.decode(tok(weird)["input_ids"]) == weird  # byte-level: no unknown token
    assert len(tok(qwen.SYSTEM_PROMPT)["input_ids"]) <= 8  # the system prompt is a handful of tokens
    assert len(tok("<think> </think> <answer> </answer>")["input_ids"]) <= 4
    assert toy.VLAA_SYSTEM_PROMPT == qwen.SYSTEM_PROMPT


def test_encode_puts_one_image_token_per_merged_patch_for_mixed_sizes(tiny):
    _, tok, ip = tiny
    images = [solid_image(56), solid_image(112), solid_image(84), solid_image(300)]
    batch = encode_batch(tok, ip, ["a?", "bb?", "c?", "d?"], images)
    grid = batch["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4], [1, 8, 8], [1, 6, 6], [1, 6, 6]]  # 300 px is scaled down to max_pixels
    per_row = (batch["input_ids"] == tok.image_token_id).sum(1)
    assert per_row.tolist() == (grid.prod(-1) // 4).tolist() == [4, 16, 9, 9]
    assert batch["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    # left padding: every row ends with the assistant header, pads only at the start
    assert (batch["attention_mask"][:, -1] == 1).all()
    assert batch["attention_mask"][0, 0] == 0


def test_labels_mask_everything_but_the_answer(tiny):
    _, tok, ip = tiny
    ex = qwen.encode_example(tok, ip, "What colour?", solid_image(56), response="<answer>red</answer>")
    batch = qwen.collate([ex, qwen.encode_example(tok, ip, "Hi", solid_image(56), response="A")], tok.pad_token_id,
                        label_examples=True)
    row = batch["labels"][0]
    kept = row[row != -100]
    assert tok.decode(kept) == "<answer>red</answer><|im_end|>"
    n = len(ex["input_ids"])
    L = batch["input_ids"].shape[1]
    assert (row[: L - n + ex["n_prompt"]] == -100).all()  # pads, system, user and image tokens


def test_repeat_batch_repeats_each_prompt_and_its_image_block(tiny):
    _, tok, ip = tiny
    batch = encode_batch(tok, ip, ["a?", "b?"], [solid_image(56), solid_image(112)])
    rep = qwen.repeat_batch(batch, 3)
    assert rep["input_ids"].shape[0] == 6
    assert torch.equal(rep["input_ids"][1], batch["input_ids"][0]) and torch.equal(rep["input_ids"][3],
                                                                                   batch["input_ids"][1])
    assert rep["image_grid_thw"].tolist() == [[1, 4, 4]] * 3 + [[1, 8, 8]] * 3
    assert torch.equal(rep["pixel_values"][16:32], batch["pixel_values"][:16])


def test_hf_backend_samples_n_completions_per_image_prompt(tiny):
    gen = backends.make_backend("hf", tiny)
    reqs = [{"prompt": f"What colour is the square? {i}", "image": solid_image(56 + 28 * i)} for i in range(4)]
    out = gen(reqs, n=8, max_new_tokens=12, temperature=1.0, seed=0)
    assert len(out) == 4 and all(len(o) == 8 and all(isinstance(s, str) for s in o) for o in out)
    assert len({s for o in out for s in o}) > 1  # sampling, not 32 copies of one string


def test_sampled_vision_tokens_are_suppressed(tiny):
    model, tok, ip = tiny
    batch = encode_batch(tok, ip, ["x"], [solid_image(56)])
    # make <|image_pad|> by far the most likely next token everywhere; it must still never be sampled
    bias = torch.zeros(model.lm_head.weight.shape[0])
    bias[tok.image_token_id] = 100.0
    hook = model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        comp, mask = qwen.sample_completions(model, batch, 16, temperature=1.0, pad_id=tok.pad_token_id)
    finally:
        hook.remove()
    assert not torch.isin(comp, torch.tensor(qwen.vision_token_ids(model.config))).any()
    assert mask.shape == comp.shape


def test_text_only_requests_work(tiny):
    gen = backends.make_backend("hf", tiny)
    out = gen([{"prompt": "Hello", "image": None}], n=2, max_new_tokens=4, temperature=1.0, seed=1)
    assert len(out[0]) == 2


def test_init_distributed_without_torchrun():
    d = training.init_distributed()
    assert (d["rank"], d["world"], d["master"]) == (0, 1, True) and d["device"].type == "cpu"


def test_hf_backend_gives_each_request_its_own_system_prompt(tiny, monkeypatch):
    _, tok, _ = tiny
    seen = []
    real = qwen.sample_completions
    spy = lambda m, b, *a, **k: seen.append(b["input_ids"]) or real(m, b, *a, **k)  # the prompts generate sees
    monkeypatch.setattr(backends, "sample_completions", spy)
    plain = {"prompt": "What colour is the square?", "image": solid_image(56), "system": None}
    backends.make_backend("hf", tiny)([plain, dict(plain, system=qwen.SYSTEM_PROMPT)], max_new_tokens=2)
    rows = [tok.decode(r, skip_special_tokens=False) for r in seen[0]]
    assert "You are a helpful assistant." in rows[0] and qwen.SYSTEM_PROMPT not in rows[0]
    assert qwen.SYSTEM_PROMPT in rows[1]
