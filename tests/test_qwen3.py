"""Qwen3-VL beside Qwen2.5-VL by example: what differs (16 px patches, its chat template, interleaved M-RoPE,
DeepStack) and what the model layer keeps the same for the stages: token counts, positions, log-probs,
cached vision features, the hf backend, the export. The stages themselves run on both families in
test_sft.py, test_grpo.py and test_eval.py (`each_model_dir`)."""

import importlib
import json

import pytest
import torch
from conftest import solid_image

import toy
from vlaa import export, qwen, vision

grpo = importlib.import_module("05_grpo")


def rollout(model, tok, ip, tmp_path, T=1.3):
    """3 prompts (images of 56, 112 and 84 px, prompts of different lengths: left padding), 2 completions
    each sampled with their log-probs, as 05 encodes and samples them."""
    encode = qwen.prompt_encoder(tok, ip, qwen.SYSTEM_PROMPT, model=model)
    prompts = []
    for q, s in (("What colour is the square?", 56), ("hi", 112), ("What colour is the big red square? A. red", 84)):
        solid_image(s).save(tmp_path / f"{s}.png")
        prompts.append(encode({"id": q, "question": q, "image": str(tmp_path / f"{s}.png")}))
    torch.manual_seed(0)
    batch = qwen.repeat_batch(qwen.collate(prompts, tok.pad_token_id), 2)
    comp, mask, sampler_logp = qwen.sample_completions(model, batch, 12, T, pad_id=tok.pad_token_id,
                                                       return_logprobs=True)
    return prompts, comp, mask, sampler_logp


def loss_logprobs(model, prompts, comp, mask, pad_id, features=None, T=1.3):
    """05's log-probs of the completions (the loss's), the images as pixels or as cached features."""
    b, width = grpo.sequence_batch(prompts, list(range(len(comp))), 2, comp, mask, pad_id, features)
    with torch.no_grad():
        return grpo.token_logprobs(model, b, width, comp, T, qwen.vision_token_ids(model.config), "cpu")[0]


# ---- what differs: patches, template ---------------------------------------------------------------


def token_colours(ip, image):
    """The mean colour (0..255) of the pixels under each merged image token, in token order [tokens, 3]."""
    vis = ip(images=[image], return_tensors="pt")
    _, gh, gw = vis["image_grid_thw"][0].tolist()
    m, P = ip.merge_size, ip.patch_size
    x = vis["pixel_values"].view(gh * gw // m ** 2, m * m, 3, ip.temporal_patch_size, P, P).mean((1, 3, 4, 5))
    return (x * torch.tensor(ip.image_std) + torch.tensor(ip.image_mean)) * 255  # undo the normalisation


def test_a_toy_image_is_sixteen_tokens_in_both_families(each_tiny, tmp_path):
    """112 px -> 16 tokens, 56 px -> 4, whether a token covers 28 px (Qwen2.5-VL) or 32 px (Qwen3-VL: the
    image is scaled to 128 px), and each 28 px cell of the toy world lands on exactly one token."""
    from PIL import Image, ImageDraw

    _, tok, ip = each_tiny
    colours = [(30 + 60 * (i % 4), 30 + 60 * (i // 4), 200 - 40 * (i % 4)) for i in range(16)]
    image = Image.new("RGB", (112, 112))
    draw = ImageDraw.Draw(image)
    for i, c in enumerate(colours):  # cell (row i // 4, column i % 4) in its own flat colour
        draw.rectangle((28 * (i % 4), 28 * (i // 4), 28 * (i % 4) + 27, 28 * (i // 4) + 27), fill=c)
    got = token_colours(ip, image)
    nearest = torch.cdist(got, torch.tensor(colours, dtype=torch.float)).argmin(1)
    assert nearest.tolist() == list(range(16))  # token k shows cell k and no other
    for (w, h), n in (((112, 112), 16), ((56, 56), 4), ((300, 90), None), ((90, 300), None), ((200, 84), None)):
        Image.new("RGB", (w, h), (200, 30, 30)).save(tmp_path / "im.png")
        ex = qwen.encode_example(tok, ip, "q", Image.open(tmp_path / "im.png"))
        n_tokens = int((ex["input_ids"] == tok.image_token_id).sum())  # the processor's count, from the pixels
        assert n_tokens == qwen.image_token_count(ip, tmp_path / "im.png") == (n or n_tokens)  # from the header
    assert ip.patch_size == {"Qwen2_5_VLConfig": 14, "Qwen3VLConfig": 16,
                             "Qwen3_5Config": 16}[type(each_tiny[0].config).__name__]


def test_qwen3_vl_template_has_no_default_system_turn(tiny_qwen3, tiny):
    """Qwen2.5-VL's template adds "You are a helpful assistant." when no system turn is given; Qwen3-VL's does not."""
    three, two = (qwen.chat_prompt(t[1], "Q?", 2, system=None) for t in (tiny_qwen3, tiny))
    assert three == "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Q?<|im_end|>\n" \
                    "<|im_start|>assistant\n"
    assert two == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + three
    with_system = qwen.chat_prompt(tiny_qwen3[1], "Q?", system="S")
    assert with_system == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"


# ---- what the model layer keeps the same -------------------------------------------------------------


def test_completion_positions_are_transformers_own(each_tiny, tmp_path):
    """05 passes M-RoPE positions (the prompt's cached, the completion's continuing from its largest);
    transformers computes them itself when none are given: the same numbers and the same logits."""
    model, tok, ip = each_tiny
    prompts, comp, mask, _ = rollout(model, tok, ip, tmp_path)
    b, _ = grpo.sequence_batch(prompts, list(range(len(comp))), 2, comp, mask, tok.pad_token_id)
    own, _ = model.model.get_rope_index(b["input_ids"], mm_token_type_ids=b["mm_token_type_ids"],
                                        image_grid_thw=b["image_grid_thw"], attention_mask=b["attention_mask"])
    real = b["attention_mask"].bool()  # [b, W+T]: padding's position is never read
    assert torch.equal(own[:, real], b["position_ids"][:, real])
    model.model.rope_deltas = None  # left by the last generate(); a forward without positions starts afresh
    with torch.no_grad():
        ours = model(**b).logits
        theirs = model(**{k: v for k, v in b.items() if k != "position_ids"}).logits
    assert torch.equal(ours[real], theirs[real])


@pytest.mark.parametrize("reuse_vision", [False, True])
def test_sampler_logprobs_equal_the_loss(each_tiny, tmp_path, reuse_vision):
    """What sample_completions sampled from is what 05's loss scores (1e-5), pixels or cached features."""
    model, tok, ip = each_tiny
    prompts, comp, mask, sampler_logp = rollout(model, tok, ip, tmp_path)
    features = vision.image_features(model, prompts) if reuse_vision else None
    logp = loss_logprobs(model, prompts, comp, mask, tok.pad_token_id, features)
    assert mask.sum() > 12 and ((logp - sampler_logp).abs() * mask).max() < 1e-5


def test_cached_features_carry_deepstack_and_give_the_pixels_logprobs(tiny_qwen3, tmp_path):
    """Qwen3-VL's cached features hold DeepStack: the outputs of its vision layers 0 and 1, added into language
    layers 0 and 1. With them the log-probs are the pixels' (1e-6); without their contribution (zeroed) the
    model is another one: log-probs move by far more."""
    model, tok, ip = tiny_qwen3
    prompts, comp, mask, _ = rollout(model, tok, ip, tmp_path)
    features = vision.image_features(model, prompts)
    assert [[tuple(d.shape) for d in deep] for _, deep in features] == [[(4, 64)] * 2, [(16, 64)] * 2, [(9, 64)] * 2]
    pixels = loss_logprobs(model, prompts, comp, mask, tok.pad_token_id)
    cached = loss_logprobs(model, prompts, comp, mask, tok.pad_token_id, features)
    assert ((cached - pixels).abs() * mask).max() < 1e-6
    no_deepstack = [(tokens, [torch.zeros_like(d) for d in deep]) for tokens, deep in features]
    dropped = loss_logprobs(model, prompts, comp, mask, tok.pad_token_id, no_deepstack)
    assert ((dropped - pixels).abs() * mask).max() > 1e-3


def test_qwen25_vl_features_have_no_deepstack(tiny, tmp_path):
    model, tok, ip = tiny
    prompts, *_ = rollout(model, tok, ip, tmp_path)
    assert [(tuple(t.shape), deep) for t, deep in vision.image_features(model, prompts)] == \
        [((4, 64), []), ((16, 64), []), ((9, 64), [])]


def test_export_loads_in_transformers_with_the_same_logits(each_model_dir, tmp_path):
    """export.export_hf of a changed model of each family: Auto classes load it back with its template and
    processor, and it computes the same logits as the model that was exported."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model, tok, ip = qwen.load_model(each_model_dir, "float32", "cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the weights it was loaded from
    export.export_hf(model, tok, ip, str(tmp_path / "export"))
    back = AutoModelForImageTextToText.from_pretrained(tmp_path / "export")
    tok2, ip2 = (auto.from_pretrained(tmp_path / "export") for auto in (AutoTokenizer, AutoImageProcessor))
    assert type(back) is type(model) and ip2.patch_size == ip.patch_size and tok2.chat_template == tok.chat_template
    batch = qwen.collate([qwen.encode_example(tok2, ip2, q, solid_image(s)) for q, s in (("a?", 56), ("bb?", 112))],
                         tok2.pad_token_id)
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, back.eval()(**batch).logits)


def test_caption_and_distill_with_the_hf_backend(each_model_dir, tmp_path):
    """01 and 02 on a checkpoint of each family: --backend hf --model FOLDER, nothing else. (02 reads the toy
    captioner's captions: a random model's may be empty, which 02 rejects as a missing field.)"""
    caption, distill = (importlib.import_module(m) for m in ("01_caption", "02_distill"))
    toy.make_data(str(tmp_path / "data"), n=3, test_n=0, seed=0)
    hf = ["--backend", "hf", "--model", each_model_dir, "--max-new-tokens", "6"]
    for out, backend in (("cap.jsonl", hf), ("toy-cap.jsonl", ["--backend", "toy", "--model", "captioner"])):
        caption.main(["--in", str(tmp_path / "data" / "train.jsonl"), "--out", str(tmp_path / out), *backend])
    distill.main(["--in", str(tmp_path / "toy-cap.jsonl"), "--out", str(tmp_path / "dist.jsonl"), *hf])
    for name, field in (("cap.jsonl", "caption"), ("dist.jsonl", "reasoning")):
        out = [json.loads(line) for line in open(tmp_path / name)]
        assert len(out) == 3 and all(isinstance(r[field], str) for r in out)
