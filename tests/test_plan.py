"""bench/plan.py by example: parameter counts against transformers' own models, the CPU stand-in for the
allocator's peak on tensors of known size, and every GPU command the README gives fits its card by the plan."""

import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("plan", os.path.join(ROOT, "bench", "plan.py"))
plan = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plan)


@pytest.mark.parametrize("size, total", [("3b", 3_754_622_976), ("7b", 8_292_166_656)])  # the released counts
def test_param_counts_match_transformers(size, total):
    from transformers import Qwen2_5_VLForConditionalGeneration

    import toy
    from bench.gpu_check import qwen25_vl_config

    tok = toy.build_tokenizer(toy.tokenizer_corpus())
    config = qwen25_vl_config({t: tok.convert_tokens_to_ids(t) for t in toy.SPECIAL_TOKENS}, size)
    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2_5_VLForConditionalGeneration(config)
    vision = sum(p.numel() for p in model.model.visual.parameters())
    assert plan.param_counts(plan.QWEN25_VL[size]) == (total, total - vision, vision)
    assert sum(p.numel() for p in model.parameters()) == total


def qwen3_vl_config(m):
    """A Qwen3-VL config with bench/plan.py's shapes (Qwen/Qwen3-VL-4B- and -8B-Instruct's config.json)."""
    from transformers import Qwen3VLConfig

    v = m["vision"]
    return Qwen3VLConfig(
        text_config=dict(vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["intermediate"],
                         num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
                         num_key_value_heads=m["kv_heads"], head_dim=m["head_dim"], tie_word_embeddings=m["tied"],
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=v["depth"], hidden_size=v["hidden"], intermediate_size=v["intermediate"],
                           num_heads=v["heads"], patch_size=v["patch"], temporal_patch_size=v["temporal"],
                           spatial_merge_size=v["merge"], out_hidden_size=m["hidden"],
                           num_position_embeddings=v["positions"],
                           deepstack_visual_indexes=[5, 11, 17][:v["deepstack"]]),
        tie_word_embeddings=m["tied"])


@pytest.mark.parametrize("size", ["q3-4b", "q3-8b"])
def test_qwen3_vl_param_counts_match_transformers(size):
    """Qwen3-VL's terms (head_dim 128, no q/k/v bias, q/k norms; LayerNorm vision blocks with a plain MLP,
    position embeddings, DeepStack mergers) against transformers' own model of the same shapes."""
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(qwen3_vl_config(plan.QWEN3_VL[size]))
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    print(f"{size}: {total:,} parameters, vision {vision:,}")
    assert plan.param_counts(plan.QWEN3_VL[size], plan.QWEN3_VL[size]["vision"]) == (total, total - vision, vision)


def test_live_bytes_by_hand():
    before = torch.ones(500)  # made before: neither it nor its views count
    tracker = plan.live_bytes_tracker()
    with tracker:
        before[:100].t()
        a = torch.ones(1000)  # 4,000 bytes
        b = a * 2  # 4,000 more
        a[:10].mul_(3)  # a view and an in-place op allocate nothing
        del a
        c = b.to(torch.bfloat16)  # 2,000
    assert (tracker.peak, tracker.now) == (8000, 6000)
    del b, c
    assert tracker.now == 0


def test_terms_by_hand():
    p = plan.plan("grpo", "3b", 8, 4, True)
    gib = 2 ** 30
    assert p["weights"] == 4 * 3_754_622_976 / 8 / gib and p["ref"] == 2 * 3_754_622_976 / 8 / gib
    assert p["adam"] == 2 * p["grads"] == 8 * 3_085_938_688 / 8 / gib
    assert plan.plan("grpo", "3b", 1, 2, True, ref_offload=True)["ref"] == 0.0
    # checkpointing keeps one layer's input per layer instead of everything each layer saves
    assert p["activations_ckpt"] < p["activations_no_ckpt"] / 10


def test_chunked_logprob_term_by_hand():
    from vlaa import logprobs

    assert plan.CHUNK == logprobs.CHUNK == 128
    v, h = 151_936, 2048  # the 3B; 2 rows of 1,024 new tokens
    # one GPU, backward: the head's weight gradient, bf16 and its fp32 copy (6 V H) outgrows one chunk's 16 C V;
    # the scored positions' hidden states (fp32) and their gradient
    assert plan.logprob_bytes("grpo", "chunked", v, 2, 1664, 1024, h) == 6 * v * h + 2 * 4 * 2 * 1024 * h
    assert plan.logprob_bytes("grpo", "chunked", v, 2, 1664, 1024, h, r=2) == 2 * v * h + 2 * 2 * 2 * 1024 * h
    assert plan.logprob_bytes("grpo", "chunked", v, 2, 1664, 1024, h, grad=False) == 8 * 128 * v + 4 * 2048 * h
    assert plan.logprob_bytes("sft", "chunked", v, 1, 4096, 0, 64) == 16 * 128 * v + 8 * 4096 * 64  # one chunk
    p = plan.plan("grpo", "3b", 1, 2, True, True)  # the chunked path is the plan's
    assert p["logprob"] == plan.logprob_bytes("grpo", "chunked", v, 2, 1664, 1024, h) / 2 ** 30


@pytest.mark.parametrize("command", plan.COMMANDS, ids=lambda c: "-".join(map(str, c)))
def test_every_readme_command_fits_its_card(command):
    stage, size, gpus, card, micro, ckpt, offload = command
    p = plan.plan(stage, size, gpus, micro, ckpt, offload, card)
    assert p["peak"] <= 0.9 * plan.CARDS[card], p["phases"]  # a 10% margin for what the estimate misses
