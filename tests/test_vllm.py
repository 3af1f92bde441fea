"""Every vLLM path, run for real on vLLM's CPU build with the toy `small` model of each family, Qwen2.5-VL and
Qwen3-VL (`make test-vllm`; `-k qwen3` picks one family).

The colocated engine of 05 in this process (each weight push, greedy parity with the policy, the engine's
log-probs against the trainer's), then the stages as a user runs them: the `vllm` backend of 01, 02 and
06, 05 --rollout vllm under torchrun and as a plain process, and 06 on the folder 05 exported.

Without vLLM (`make test`) these tests skip; with VLAA_REQUIRE_VLLM=1 (`make test-vllm`) a missing or
broken vLLM fails them. The toy `tiny` model cannot be used: its head size 16 is below what vLLM's CPU
attention supports. tests/vllm_cpu/sitecustomize.py, on PYTHONPATH here, keeps the CPU build's linear
layers on plain weights so that the weight push has somewhere to write (GPU builds need nothing).
"""

import importlib
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT

import toy
from vlaa import colocate, qwen
from vlaa.images import load_image
from vlaa.records import load_records

pytestmark = pytest.mark.vllm
SHIM = os.path.join(ROOT, "tests", "vllm_cpu")
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module", autouse=True)
def vllm_cpu():
    """Skip without vLLM, or fail when `make test-vllm` requires it; then the CPU shim, here and below."""
    try:
        import vllm._custom_ops as ops
    except Exception as e:  # a broken install raises anything, and must not pass as a skip
        if os.environ.get("VLAA_REQUIRE_VLLM") == "1":
            pytest.fail(f"vLLM is required here (VLAA_REQUIRE_VLLM=1) but does not import: {e!r}")
        pytest.skip("vLLM is not installed (`make test-vllm` runs these tests in a venv of their own)")
    ops._supports_onednn = False  # what the shim does in the processes these tests start


def run(cmd, timeout=600):
    """A stage as a user runs it, with the CPU shim and without the launcher variables of this process."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join([SHIM, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    t0 = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "Traceback" not in r.stderr, r.stderr[-4000:]  # nothing may fail at exit either
    print(f"{' '.join(map(str, cmd[1:3]))}: {time.perf_counter() - t0:.1f}s")  # shown with -s
    return r


# every family vLLM's CPU build runs; Qwen3.5's gated delta-net layers it runs only in bf16 with a conv layout the
# weight push cannot write (docs/qwen3.5.md), so on a CPU the project refuses it (tests/test_backends.py)
VLLM_CPU_FAMILIES = [f for f in toy.FAMILIES if f != "qwen3.5"]


@pytest.fixture(scope="module", params=VLLM_CPU_FAMILIES)
def small_dir(request, tmp_path_factory):
    return toy.build_model(str(tmp_path_factory.mktemp("small")), "small", family=request.param)


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """Every rule-based verifier type (count: digit, colour: mcq, sum: math, box: iou), 112 px images."""
    out = str(tmp_path_factory.mktemp("mixed"))
    toy.make_data(out, n=32, test_n=8, seed=0, kinds="colour,count,sum,box")
    return os.path.join(out, "train.jsonl")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------------
# 05's colocated engine, in this process


MAX_PIXELS = 56 * 56 * 2  # below the toy's 112 x 112 images: both sides must resize them alike


@pytest.fixture(scope="class")
def colocated(small_dir):
    """The engine as 05 builds it for rank 0 of a plain `python` run, and the policy it follows."""
    saved = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    args = SimpleNamespace(model=small_dir, seed=0, min_pixels=None, max_pixels=MAX_PIXELS, vllm_gpu_memory=None,
                           max_prompt_length=256, max_new_tokens=16, temperature=1.0, top_p=1.0)
    llm = colocate.make_vllm_engine(args, rank=0)
    policy = qwen.load_model(small_dir, "float32", "cpu", max_pixels=MAX_PIXELS)
    yield llm, args, policy
    colocate.close_vllm_engine(llm)
    for k, v in saved.items():  # launcher_env() set them for this process only
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def hf_greedy(policy, records, max_new_tokens):
    model, tok, ip = policy
    encode = qwen.prompt_encoder(tok, ip, qwen.SYSTEM_PROMPT)
    batch = qwen.collate([encode(r) for r in records], tok.pad_token_id)
    comp, mask = qwen.sample_completions(model.eval(), batch, max_new_tokens, temperature=0.0,
                                         pad_id=tok.pad_token_id)
    return comp, mask


def perturb(model, scale, seed):
    """A stand-in for an optimizer update that changes every weight (vision tower and tied embeddings
    included) enough for greedy decoding to change."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


class TestColocatedEngine:
    def test_launcher_variables_default_to_a_world_of_one(self, colocated):
        assert [os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")] == ["0", "0", "1"]
        assert int(os.environ["MASTER_PORT"]) > 0

    def test_engine_runs_in_the_trainers_precision_and_sees_the_trainers_image_size(self, colocated, mixed_data):
        from vllm import SamplingParams

        llm, args, (model, tok, ip) = colocated
        assert llm.llm_engine.model_config.dtype == torch.float32 == model.dtype  # fp32 on CPU
        rec = load_records(mixed_data)[0]
        ex = qwen.encode_example(tok, ip, rec["question"], load_image(rec["image"]))
        assert ex["image_grid_thw"].tolist() == [[1, 4, 4]]  # 112 px resized to 56 px (Qwen3-VL: 64): 4 tokens
        prompt = {"prompt_token_ids": tok.encode(qwen.chat_prompt(tok, rec["question"], 1), add_special_tokens=False),
                  "multi_modal_data": {"image": load_image(rec["image"])}}
        out = llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)[0]
        assert list(out.prompt_token_ids) == ex["input_ids"].tolist()  # the same expanded prompt, token for token

    def test_after_each_push_the_engine_decodes_greedily_like_the_policy(self, colocated, mixed_data):
        llm, args, policy = colocated
        model, tok, _ = policy
        records = load_records(mixed_data)[:4]
        greedy = SimpleNamespace(**{**vars(args), "temperature": 0.0})
        vision = qwen.vision_token_ids(model.config)
        changed = []
        for update in range(3):  # the start weights, then two "updates"
            if update:
                perturb(model, 0.5, seed=update)
            colocate.push_weights_to_vllm(llm, model, skip_vision=False)
            comp, mask, _ = colocate.rollout_vllm(llm, records, 1, greedy, tok, qwen.SYSTEM_PROMPT, vision)
            hf_comp, hf_mask = hf_greedy(policy, records, args.max_new_tokens)
            assert torch.equal(mask, hf_mask) and torch.equal(comp * mask, hf_comp * hf_mask), (comp, hf_comp)
            changed.append(comp)
        # the same images before and after each push: a stale vision embedding would show here
        assert not torch.equal(changed[0], changed[1]) and not torch.equal(changed[1], changed[2])

    def test_a_push_that_leaves_a_weight_out_is_refused(self, colocated):
        llm, _, (model, _, _) = colocated
        partial = SimpleNamespace(state_dict=lambda: {k: v for k, v in model.state_dict().items()
                                                      if not k.endswith("language_model.norm.weight")},
                                  named_modules=model.named_modules)
        with pytest.raises(RuntimeError, match="1 engine parameters unwritten.*language_model.model.norm.weight"):
            colocate.push_weights_to_vllm(llm, partial, skip_vision=False)
        colocate.push_weights_to_vllm(llm, model, skip_vision=False)  # whole again for the tests below

    def test_a_lora_policy_is_pushed_merged_and_the_engine_decodes_like_it(self, colocated, mixed_data, small_dir):
        """--lora-rank: the engine gets W + scale * B @ A under the base names (every engine weight written, or
        the push refuses), and after each push decodes greedily like the policy with its adapters."""
        from vlaa import lora, training

        llm, args, (_, tok, ip) = colocated
        records = load_records(mixed_data)[:4]
        greedy = SimpleNamespace(**{**vars(args), "temperature": 0.0})
        model = training.load_trainable(small_dir, torch.device("cpu"), 1, 1e-3, max_pixels=MAX_PIXELS, lora={
            "rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": lora.TARGETS.split(","), "base": small_dir})[0]
        vision, changed = qwen.vision_token_ids(model.config), []
        for update in (1, 2):  # two adapter "updates": B from zero to random, then another random
            gen = torch.Generator().manual_seed(update)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if ".lora_B." in n:
                        p.copy_(torch.randn(p.shape, generator=gen))
            # the vision tower too: earlier tests of the class pushed a changed one, this policy has the checkpoint's
            colocate.push_weights_to_vllm(llm, model, skip_vision=False)
            comp, mask, _ = colocate.rollout_vllm(llm, records, 1, greedy, tok, qwen.SYSTEM_PROMPT, vision)
            hf_comp, hf_mask = hf_greedy((model, tok, ip), records, args.max_new_tokens)
            assert torch.equal(mask, hf_mask) and torch.equal(comp * mask, hf_comp * hf_mask), (comp, hf_comp)
            changed.append(comp)
        assert not torch.equal(changed[0], changed[1])
        colocate.push_weights_to_vllm(llm, colocated[2][0], skip_vision=False)  # the class's policy again

    def test_engine_logprobs_match_the_trainers_on_the_same_tokens(self, colocated, mixed_data):
        """The engine's log-probs of its own samples (processed: after temperature) against 05's
        token_logprobs on the same weights and tokens. Both compute in fp32 here, so they differ only by
        the order of floating-point sums in different kernels: measured mean 2e-5 and max 5e-4 per token.
        The bounds, 1e-3 and 1e-2, leave 20-50x room for another CPU and still catch every real fault,
        each of which costs 0.1 or more: raw log-probs (temperature not applied), stale weights or caches,
        a prompt or image the trainer sees differently, shifted positions."""
        grpo = importlib.import_module("05_grpo")
        llm, args, (model, tok, ip) = colocated
        records = load_records(mixed_data)[4:12]
        G, T = 4, 0.8
        vision = qwen.vision_token_ids(model.config)
        colocate.push_weights_to_vllm(llm, model, skip_vision=False)
        sampling = SimpleNamespace(**{**vars(args), "temperature": T, "max_new_tokens": 24})
        comp, mask, engine_logp = colocate.rollout_vllm(llm, records, G, sampling, tok, qwen.SYSTEM_PROMPT, vision)
        assert comp.shape[0] == len(records) * G and (engine_logp[mask == 0] == 0).all()
        encode = qwen.prompt_encoder(tok, ip, qwen.SYSTEM_PROMPT, model=model)
        batch, width = grpo.sequence_batch([encode(r) for r in records], list(range(len(comp))), G, comp, mask,
                                           tok.pad_token_id)
        with torch.no_grad():
            trainer_logp, _ = grpo.token_logprobs(model, batch, width, comp, T, vision, torch.device("cpu"))
            at_t1, _ = grpo.token_logprobs(model, batch, width, comp, 1.0, vision, torch.device("cpu"))
        gap = (trainer_logp - engine_logp).abs()[mask > 0]
        wrong_t = (at_t1 - engine_logp).abs()[mask > 0]
        print(f"engine vs trainer log-prob gap over {len(gap)} tokens: mean {gap.mean():.2e}, max {gap.max():.2e}; "
              f"against the trainer at temperature 1: mean {wrong_t.mean():.2e}")
        assert gap.mean() < 1e-3 and gap.max() < 1e-2
        assert wrong_t.mean() > 0.05  # what the bound would catch: log-probs without the temperature


# ----------------------------------------------------------------------------------------------------
# The stages, as a user runs them


def test_vllm_backend_of_01_and_02(tmp_path, small_dir, mixed_data):
    py = sys.executable
    # sampled, not greedy: the random model's greedy caption can be empty, which 02 rightly refuses
    run([py, "01_caption.py", "--in", mixed_data, "--out", tmp_path / "captioned.jsonl", "--backend", "vllm",
         "--model", small_dir, "--limit", 4, "--max-new-tokens", 16, "--temperature", 1.0])
    captioned = read_jsonl(tmp_path / "captioned.jsonl")
    assert len(captioned) == 4 and all(r["caption"] for r in captioned)
    run([py, "02_distill.py", "--in", tmp_path / "captioned.jsonl", "--out", tmp_path / "distilled.jsonl",
         "--backend", "vllm", "--model", small_dir, "--max-new-tokens", 16, "--temperature", 0.7])
    distilled = read_jsonl(tmp_path / "distilled.jsonl")
    assert [r["id"] for r in distilled] == [r["id"] for r in captioned]
    assert all(isinstance(r["reasoning"], str) for r in distilled)


def test_vllm_backend_of_06_on_the_toy_bench(tmp_path, small_dir):
    run([sys.executable, "06_eval.py", "--model", small_dir, "--bench", "toy", "--backend", "vllm", "--limit", 8,
         "--max-new-tokens", 16, "--out", tmp_path / "eval"])
    assert any(name.endswith(".json") for name in os.listdir(tmp_path / "eval"))


def grpo_args(model, data, out, *extra):
    return ["05_grpo.py", "--model", model, "--data", data, "--out", out, "--rollout", "vllm",
            "--rollout-batch", 4, "--group-size", 4, "--train-batch", 16, "--micro-batch", 8,
            "--max-new-tokens", 12, "--temperature", 1.0, "--lr", 1e-3, "--min-lr", 1e-3, "--warmup-ratio", 0,
            "--max-prompt-length", 256, *extra]


def check_metrics(out, steps):
    lines = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [m["step"] for m in lines] == list(range(1, steps + 1))
    for m in lines:  # the measured mismatch is logged, and small: same weights, fp32 on both sides
        assert m["vllm/logp_diff_mean"] < 1e-3 and m["vllm/logp_diff_max"] < 1e-2, m
    print(f"05's engine-trainer log-prob gap over {steps} steps: mean up to "  # shown with -s
          f"{max(m['vllm/logp_diff_mean'] for m in lines):.1e}, max {max(m['vllm/logp_diff_max'] for m in lines):.1e}")
    return lines


def test_grpo_with_vllm_rollouts_on_two_ranks_with_mixed_verifier_types(tmp_path, small_dir, mixed_data):
    out = tmp_path / "run"
    args = grpo_args(small_dir, mixed_data, out, "--max-steps", 3, "--kl-coef", 0.01)
    args[args.index("--rollout-batch") + 1] = 8  # 4 prompts per rank, of different types on the two ranks
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2, *args])
    for m in check_metrics(out, 3):
        counts = {t: m[f"count/{t}"] for t in ("digit", "mcq", "math", "iou")}
        assert sum(counts.values()) == 32 and sum(c > 0 for c in counts.values()) >= 2, counts


def test_grpo_with_vllm_rollouts_as_one_plain_process_then_06_loads_its_export(tmp_path, small_dir, mixed_data):
    out = tmp_path / "run"
    run([sys.executable, *grpo_args(small_dir, mixed_data, out, "--max-steps", 2)])
    check_metrics(out, 2)
    run([sys.executable, "06_eval.py", "--model", out / "model", "--bench", "toy", "--backend", "vllm", "--limit", 4,
         "--max-new-tokens", 16, "--out", tmp_path / "eval"])
