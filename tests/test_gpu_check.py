"""bench/gpu_check.py by example: its FLOP count by hand, the 3B shapes, and the whole check at toy size on
the CPU (torchrun, gloo, FSDP2 forced on one rank), as the lent GPU runs it at 3B."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
G = importlib.util.module_from_spec(spec)
spec.loader.exec_module(G)


def test_flops_by_hand():
    # N=10 parameters, L=2 layers, d=4; rows of 2 and 3 tokens, forward + backward:
    # 6 * (10 * (2 + 3) + 2 * 4 * (4 + 9)) = 6 * (50 + 104)
    assert G.row_flops(torch.tensor([2, 3]), 6, (10, 2, 4, 0, 0)) == 924
    assert G.row_flops(torch.tensor([2, 3]), 2, (10, 2, 4, 0, 0)) == 308  # a forward alone: a third
    # vision blocks of 100 parameters on 8 patches, a merger of 20 on the 2 merged tokens: 2 * (800 + 40)
    assert G.vision_flops(8, (0, 0, 0, 100, 20)) == 1680


def test_3b_config_has_the_real_shapes():
    from transformers import Qwen2_5_VLForConditionalGeneration

    import toy

    tok = toy.build_tokenizer(toy.tokenizer_corpus())
    config = G.qwen25_vl_config({t: tok.convert_tokens_to_ids(t) for t in toy.SPECIAL_TOKENS})
    assert (config.image_token_id, config.vision_start_token_id) == (5, 3)  # the toy tokenizer's ids
    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2_5_VLForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == 3_754_622_976  # Qwen2.5-VL-3B-Instruct's count
    n_text, layers, hidden, n_blocks, n_merger = G.flop_shape(model)
    assert (n_text, layers, hidden) == (3_085_938_688, 36, 2048)
    assert n_blocks + n_merger == 668_684_288


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def run_check(tmp_path, *flags):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--size", "toy", "--out",
                        str(out), *flags], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out / "gpu_check.json") as f:
        return r.stdout, json.load(f)


def test_toy_check_end_to_end(tmp_path, tiny):
    stdout, data = run_check(tmp_path, "--no-trl")
    for title in ("04 SFT", "05 GRPO", "summary", "TRL: --no-trl"):
        assert title in stdout
    assert data["sft_tokens_per_sample"] == [160, 160]  # the filler response lands exactly on --seq here
    assert [s["step"] for s in data["sft"]] == [s["step"] for s in data["grpo"]] == [1, 2, 3]
    for s in data["sft"] + data["grpo"]:
        for k in ("wall", "train_s", "flops", "tflops", "mfu", "train_tok_s", "peak_memory_gb"):
            assert finite(s[k]) and s[k] > 0, (k, s)
        assert s["train_s"] <= s["wall"]
    for s in data["grpo"]:
        assert 0 < s["completion_len"] <= 16 and finite(s["gen_tok_s"])
        assert s["ref"] + s["update"] <= s["train_s"]  # both inside 05's train timer

    # 04's count, exactly: 4 rows of 160 tokens, forward + backward; the vision tower's forward on 4 images
    # of 112 px (8 x 8 = 64 patches each)
    shape = G.flop_shape(tiny[0])
    assert shape[0] == data["model"]["text_params"]
    expected = G.row_flops(torch.tensor([160] * 4), 6, shape) + G.vision_flops(4 * 64, shape)
    assert [s["flops"] for s in data["sft"]] == [pytest.approx(expected, rel=1e-12)] * 3
    assert [s["train_tokens"] for s in data["sft"]] == [640] * 3

    # one 05 step at the paper's lengths (toy: 24 new tokens), then with --ref-offload, each printed with the
    # plan's prediction; 2 prompts x G 2 in micro-batches of 1, two updates (the old log-probs' pass runs)
    for name, flags in (("grpo-paper", []), ("grpo-offload", ["--ref-offload"])):
        part = data[name]
        assert part["flags"] == flags and part["workload"]["new_tokens"] == 24
        (step,) = part["steps"]
        assert 0 < step["completion_len"] <= 24 and step["seq"] > 24 and step["peak_memory_gb"] > 0
        assert step["ref"] > 0 and step["update"] > 0  # the reference's (and old log-probs') pass, 2 updates
        assert finite(part["plan_peak_gb"]) and part["plan_peak_gb"] > 0
        assert part["plan"]["ref"] == (0.0 if flags else pytest.approx(2 * data["model"]["params"] / 2 ** 30))
    assert "05 at the paper's lengths, reference on the GPU:" in stdout and "05 at the paper's lengths, --ref-offload" \
        in stdout


@pytest.mark.slow
def test_toy_check_with_trl(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("torchvision")  # TRL's Qwen2.5-VL processor needs it
    stdout, data = run_check(tmp_path)
    assert "ours / TRL GRPO step time" in stdout
    assert finite(data["ours_over_trl"]) and data["ours_over_trl"] > 0
    assert [s["step"] for s in data["trl"]] == [1, 2, 3]
