"""Precomputed vision features: run the vision tower once per image, then hand its output to every forward.

05_grpo.py samples G completions per prompt and scores each one three times (reference, old and new policy);
while the vision tower is frozen its output for an image never changes, so 05 computes it once per prompt
(`image_features`) and puts it in each micro-batch in place of the pixels (`with_features`). Works on any
model whose forward takes transformers' `mm_encoder_outputs`; 1 CPU, 1 GPU or FSDP2 ranks alike.

What a feature holds depends on the checkpoint, never on a flag: Qwen2.5-VL's vision tower gives one
[image tokens, hidden] tensor per image, which replaces the <|image_pad|> embeddings. Qwen3-VL's also gives
DeepStack features (arXiv:2406.04334): the outputs of several vision layers (8, 16, 24 of 27 in
Qwen3-VL-4B), each merged to [image tokens, hidden] and added to the image tokens' hidden states after
language layers 0, 1, 2. They are part of the model's input: a batch that carried only the first tensor
would run a different model (tests/test_qwen.py measures it).
"""

from types import SimpleNamespace

import torch

from vlaa import training


def image_features(model, examples):
    """The vision tower on each example's image once, no grad -> one feature per image:
    (tokens [image tokens, hidden], deepstack [[image tokens, hidden] per DeepStack layer; [] for Qwen2.5-VL])."""
    pixel_values = torch.cat([e["pixel_values"] for e in examples]).to(model.device)  # [patches, C*T*P*P]
    grid = torch.cat([e["image_grid_thw"] for e in examples]).to(model.device)  # [images, 3]
    with torch.no_grad(), training.autocast(model.device):
        out = model.get_image_features(pixel_values, image_grid_thw=grid, return_dict=True)
    deepstack = getattr(out, "deepstack_features", None) or []  # [layers][images]: split per image like the tokens
    return [(tokens, [layer[i] for layer in deepstack]) for i, tokens in enumerate(out.pooler_output)]


def with_features(batch, features):
    """A batch whose row i reads features[i] (an `image_features` item) instead of its pixels: the pixels are
    dropped, `mm_encoder_outputs` added in the layout get_image_features returns (per image; DeepStack per
    layer, then per image). image_grid_thw stays: positions are computed from it."""
    out = {k: v for k, v in batch.items() if k != "pixel_values"}
    image = SimpleNamespace(pooler_output=[tokens for tokens, _ in features])
    layers = len(features[0][1])
    if layers:
        image.deepstack_features = [[deep[k] for _, deep in features] for k in range(layers)]
    out["mm_encoder_outputs"] = {"image": image}
    return out
