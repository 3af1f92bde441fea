"""The tiny random models of the offline world: Qwen2.5-VL (the default), Qwen3-VL and Qwen3.5, saved like real ones.

toy.py's `build-model` command calls this (toy.py re-exports `build_model`, which tests, demo.py and bench/
call as `toy.build_model`):

    python toy.py build-model runs/tiny [--size tiny|small]                 # random Qwen2.5-VL
    python toy.py build-model runs/tiny3 --family qwen3-vl                 # random Qwen3-VL
    python toy.py build-model runs/tiny35 --family qwen3.5                 # random Qwen3.5 (hybrid attention)

The folder holds what `from_pretrained` expects of a real checkpoint (config, safetensors, a byte-level BPE
tokenizer with Qwen's special tokens and the family's chat template, the family's image processor), so every
stage loads it with the code that loads Qwen/Qwen2.5-VL-3B-Instruct or Qwen/Qwen3-VL-4B-Instruct. It builds
in about a second. The two families differ where the real ones do: Qwen3-VL has 16 px patches (32 px per
merged image token instead of 28), a chat template with no default system turn, interleaved M-RoPE,
q/k-norm in attention, a learned position embedding in the vision tower and DeepStack (vision features of
several vision layers added into the first language layers).
"""

import os

# The VLAA-Thinker system prompt, verbatim (the paper's App. Fig. 12); vlaa/qwen.py holds the same text.
VLAA_SYSTEM_PROMPT = (
    "You are VL-Thinking🤔, a helpful assistant with excellent reasoning ability. A user asks you a question, "
    "and you should try to solve it. You should first think about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within <think> </think> "
    "and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>"
)

SIZES = {
    # docs/toy.md: "tiny" learns colour, boxes and counts in minutes on 2 cores. head_dim 16 for both
    # families: vLLM's CPU attention accepts it (tests/test_vllm.py)
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, vision_hidden=32, vision_depth=2),
    "small": dict(hidden=128, layers=4, heads=4, kv_heads=2, vision_hidden=64, vision_depth=2),
}
FAMILIES = ("qwen2.5-vl", "qwen3-vl", "qwen3.5")
VOCAB_SIZE = 1024  # BPE stops early when the corpus runs out of merges
# Image budgets: 4..16 merged image tokens, so sequences stay short on a CPU. Qwen2.5-VL's token covers
# 28x28 px: a 112 px toy image is 4x4 tokens, one toy-world cell (toy.CELL = 28) per token. Qwen3-VL's covers
# 32x32 px: its processor rounds 112 px to the nearest multiple of 32, 128 px (smart_resize), a uniform 32/28
# upscale, so the image is again 4x4 tokens and each 28 px cell still lands on exactly one token (measured:
# tests/test_qwen.py::test_a_toy_image_is_sixteen_tokens_in_both_families). 56 px -> 64 px -> 2x2 tokens.
PIXELS_PER_TOKEN = {"qwen2.5-vl": 28, "qwen3-vl": 32, "qwen3.5": 32}
SPECIAL_TOKENS = [  # listed first, so their ids are fixed (0..6), Qwen's own names
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL / Qwen2.5-VL chat template (same layout as the real one: default system turn, one
# <|image_pad|> per image that the processor expands to the image's token count).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-Instruct's chat template, the structure of the real one without tools and video: a system turn
# only when the messages have one (no default "You are a helpful assistant."), content as a string or a
# list of parts, images numbered with add_vision_id ("Picture 1: ").
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def tokenizer_corpus():
    """Lines the BPE is trained on: what the tiny model reads and writes most should be few tokens."""
    from toy import world_corpus  # the toy world's questions and traces (toy.py imports this module at its top)

    return [VLAA_SYSTEM_PROMPT, "You are a helpful assistant.", "system user assistant",
            *["<think> </think> <answer> </answer>"] * 50, *world_corpus()]


def build_tokenizer(corpus, chat_template=CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    # byte-level: any text encodes, no unknown token. use_regex=False lets merges cross word
    # boundaries, so the 60-word system prompt becomes a handful of tokens instead of 60.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        chat_template=chat_template,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})


def text_ids(ids):
    """The language model's special ids (every family's config says them alike)."""
    return dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=True)


def vision_ids(ids):
    """The image and video placeholders and the vision span's markers (every family's alike)."""
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                tie_word_embeddings=True)


def qwen25_vl(s, ids, vocab):
    """A Qwen2.5-VL config at sizes s: 14 px patches, windowed vision attention, M-RoPE in sections."""
    from transformers import Qwen2_5_VLConfig

    h, head_dim = s["hidden"], s["hidden"] // s["heads"]
    # M-RoPE splits head_dim/2 rotary pairs over (time, height, width); the sections must add up
    mrope = [head_dim // 2 - 2 * (3 * head_dim // 16), 3 * head_dim // 16, 3 * head_dim // 16]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            **text_ids(ids)),
        vision_config=dict(
            depth=s["vision_depth"], hidden_size=s["vision_hidden"], intermediate_size=2 * s["vision_hidden"],
            num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=h,
            window_size=56, fullatt_block_indexes=[s["vision_depth"] - 1]),
        **vision_ids(ids))


def qwen3_vl(s, ids, vocab):
    """A Qwen3-VL config at sizes s, laid out like Qwen/Qwen3-VL-4B-Instruct's config.json: 16 px patches,
    interleaved M-RoPE, DeepStack from every vision layer (the real one: layers 8, 16, 24 of 27, added
    after language layers 0, 1, 2), a learned 16x16 grid of vision position embeddings (the real: 48x48)."""
    from transformers import Qwen3VLConfig

    h, head_dim = s["hidden"], s["hidden"] // s["heads"]
    # interleaved: rotary pair i goes to height if i % 3 == 1, width if i % 3 == 2, within 3 * section;
    # the real [24, 20, 20] of 64 pairs, here [4, 2, 2] of 8 (head_dim 16)
    mrope = [head_dim // 2 - 2 * (head_dim // 8), head_dim // 8, head_dim // 8]
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=head_dim,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope,
                             "mrope_interleaved": True},
            **text_ids(ids)),
        vision_config=dict(
            depth=s["vision_depth"], hidden_size=s["vision_hidden"], intermediate_size=2 * s["vision_hidden"],
            num_heads=2, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=h,
            num_position_embeddings=256, deepstack_visual_indexes=list(range(min(s["vision_depth"], s["layers"])))),
        **vision_ids(ids))


def qwen3_5(s, ids, vocab):
    """A Qwen3.5 config at sizes s (its vision tower is Qwen3-VL's without DeepStack, its language model
    Qwen3-Next's): 3 of every 4 layers gated delta-net linear attention (the last layer full attention), full
    attention with an output gate and partial rotary, laid out like Qwen/Qwen3.5-9B's config.json. The delta-net
    heads are 64 wide (the real: 128), the narrowest vLLM's CPU kernel takes (docs/qwen3.5.md)."""
    from transformers import Qwen3_5Config

    h, head_dim = s["hidden"], s["hidden"] // s["heads"]
    pairs = head_dim // 4  # rotary pairs: half the head is rotated (the real: a quarter of 256, [11, 11, 10])
    every = min(4, s["layers"])
    return Qwen3_5Config(
        text_config=dict(
            vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=s["layers"],
            layer_types=["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(s["layers"])],
            num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=head_dim,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                             "mrope_section": [pairs - 2 * (pairs // 4), pairs // 4, pairs // 4],
                             "mrope_interleaved": True},
            **text_ids(ids)),
        vision_config=dict(
            depth=s["vision_depth"], hidden_size=s["vision_hidden"], intermediate_size=2 * s["vision_hidden"],
            num_heads=2, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=h,
            num_position_embeddings=256),
        **vision_ids(ids))


def build_model(out, size="tiny", seed=0, family="qwen2.5-vl"):
    """Write a random Qwen2.5-VL, Qwen3-VL or Qwen3.5 to `out`; returns the folder. No download, about a second."""
    import torch
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen3_5ForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}: one of {', '.join(FAMILIES)}")
    qwen3 = family != "qwen2.5-vl"  # Qwen3.5 takes Qwen3-VL's processor and chat template
    tokenizer = build_tokenizer(tokenizer_corpus(), QWEN3_VL_CHAT_TEMPLATE if qwen3 else CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    make_config, model_class = {"qwen2.5-vl": (qwen25_vl, Qwen2_5_VLForConditionalGeneration),
                                "qwen3-vl": (qwen3_vl, Qwen3VLForConditionalGeneration),
                                "qwen3.5": (qwen3_5, Qwen3_5ForConditionalGeneration)}[family]
    config = make_config(SIZES[size], ids, len(tokenizer))
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.update(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], do_sample=False)
    px = PIXELS_PER_TOKEN[family]
    # Qwen3-VL's real processor is Qwen2-VL's with 16 px patches and mean = std = 0.5 (preprocessor_config.json)
    norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if qwen3 else {}
    image_processor = Qwen2VLImageProcessorPil(min_pixels=px * px * 4, max_pixels=px * px * 16, patch_size=px // 2,
                                               merge_size=2, temporal_patch_size=2, **norm)
    os.makedirs(out, exist_ok=True)
    for part in (model, tokenizer, image_processor):  # what from_pretrained of a real checkpoint reads
        part.save_pretrained(out)
    return out
