"""05_grpo.py by example: the objective by hand, log-prob consistency, torchrun, resume, learning."""

import importlib
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, solid_image

import toy
from vlaa import colocate, jsonl, qwen

grpo = importlib.import_module("05_grpo")
sft = importlib.import_module("04_sft")


# ---- group_advantages -----------------------------------------------------------------------------


def test_group_advantages_normalise_within_each_group():
    adv = grpo.group_advantages([1.0, 0.0, 0.0, 0.0, 1.0, 1.0], group_size=3)
    # group 1: mean 1/3, unbiased std 0.57735; group 2: mean 2/3, same std
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]) / (0.57735027 + 1e-4)
    assert torch.allclose(adv, expected, atol=1e-5)


def test_dr_grpo_only_centres():
    assert torch.allclose(grpo.group_advantages([1.0, 0.0, 0.5, 0.5], 2, scale="none"),
                          torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_zero_variance_group_gives_zero_advantage_not_nan():
    adv = grpo.group_advantages([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], 3)
    assert torch.equal(adv, torch.zeros(6))


# ---- kl_k3 and policy_loss ------------------------------------------------------------------------


def test_kl_k3_by_hand():
    logp, ref = torch.log(torch.tensor([0.5, 0.25])), torch.log(torch.tensor([0.25, 0.25]))
    # k3 = exp(ref - logp) - (ref - logp) - 1: 0.5 + ln 2 - 1 for the first token, 0 where they agree
    assert torch.allclose(grpo.kl_k3(logp, ref), torch.tensor([0.5 + 0.693147 - 1, 0.0]), atol=1e-6)
    assert torch.isfinite(grpo.kl_k3(torch.tensor([-200.0]), torch.tensor([0.0]))).all()  # clamped, no inf


def one_token(ratio, adv, **kw):
    logp = torch.log(torch.tensor([[ratio]]))
    loss, stats = grpo.policy_loss(logp, torch.zeros(1, 1), None, torch.tensor([adv]), torch.ones(1, 1), **kw)
    return loss.item(), stats


@pytest.mark.parametrize("ratio, adv, expected, clipped", [
    (1.5, 1.0, -1.2, True),   # positive advantage: the gain is capped at 1 + clip
    (1.5, -1.0, 1.5, False),  # negative advantage: the pessimistic, unclipped term wins
    (0.5, 1.0, -0.5, False),  # ratio fell: unclipped is the pessimistic one
    (0.5, -1.0, 0.8, True),   # negative advantage, ratio below 1 - clip: clipped at 0.8
    (1.0, 2.0, -2.0, False),  # on-policy: loss is -advantage
])
def test_clipping_on_both_sides(ratio, adv, expected, clipped):
    loss, stats = one_token(ratio, adv, clip_low=0.2, clip_high=0.2)
    assert loss == pytest.approx(expected, abs=1e-6)
    assert stats["clip_frac"] == (1.0 if clipped else 0.0)


def test_clip_higher_lets_the_ratio_grow_further():
    assert one_token(1.25, 1.0, clip_high=0.2)[0] == pytest.approx(-1.2, abs=1e-6)
    assert one_token(1.25, 1.0, clip_high=0.28)[0] == pytest.approx(-1.25, abs=1e-6)  # DAPO


def test_token_vs_sequence_aggregation():
    # row 0: 3 tokens with advantage 1, row 1: 1 token with advantage -1; on-policy so per-token loss = -adv
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -1.0])
    token, _ = grpo.policy_loss(logp, logp, None, adv, mask, loss_agg="token")
    seq, _ = grpo.policy_loss(logp, logp, None, adv, mask, loss_agg="seq")
    assert token.item() == pytest.approx((-3 + 1) / 4)  # every token weighs the same
    assert seq.item() == pytest.approx((-1 + 1) / 2)  # every sequence weighs the same


def test_fully_masked_row_contributes_nothing():
    logp = torch.zeros(2, 2)
    adv = torch.tensor([1.0, 100.0])
    masked = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    for agg in ("token", "seq"):
        both, _ = grpo.policy_loss(logp, logp, None, adv, masked, loss_agg=agg)
        alone, _ = grpo.policy_loss(logp[:1], logp[:1], None, adv[:1], masked[:1], loss_agg=agg)
        assert both.item() == pytest.approx(alone.item()) == pytest.approx(-1.0)


def test_kl_term_is_added_with_its_coefficient():
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    loss, stats = grpo.policy_loss(logp, logp.detach(), ref, torch.tensor([0.0]), torch.ones(1, 1), kl_coef=0.1)
    assert loss.item() == pytest.approx(0.1 * (0.5 + 0.693147 - 1), abs=1e-6)
    assert stats["kl"] == pytest.approx(0.5 + 0.693147 - 1, abs=1e-6)


def test_adaptive_kl_moves_toward_the_target():
    assert grpo.adaptive_kl_coef(1e-3, kl=1e-3, target=5e-4, n_samples=2048, horizon=10000) == \
        pytest.approx(1e-3 * (1 + 0.2 * 2048 / 10000))  # KL too high: the coefficient grows (error capped 0.2)
    assert grpo.adaptive_kl_coef(1e-3, kl=0.0, target=5e-4, n_samples=2048, horizon=10000) < 1e-3


def test_vllm_weight_names_keep_hf_v5_names_and_drop_wrappers():
    assert colocate.vllm_weight_name("model.language_model.layers.0.self_attn.q_proj.weight") == \
        "model.language_model.layers.0.self_attn.q_proj.weight"
    assert colocate.vllm_weight_name("model.language_model.layers.3._checkpoint_wrapped_module.mlp.up_proj.weight") == \
        "model.language_model.layers.3.mlp.up_proj.weight"
    assert colocate.vllm_weight_name("_orig_mod.model.visual.blocks.0.attn.qkv.weight") == \
        "model.visual.blocks.0.attn.qkv.weight"


# ---- log-probs on the tiny model ------------------------------------------------------------------


@pytest.mark.parametrize("reuse_vision", [False, True])
def test_recomputed_logprobs_equal_the_sampling_distribution(tiny, reuse_vision, tmp_path):
    """Left padding, three image sizes, temperature: the loss's log-probs are the sampler's (1e-5)."""
    model, tok, ip = tiny
    qs = ["What colour is the square?", "hi", "What colour is the big red square? A. red"]
    encode = qwen.prompt_encoder(tok, ip, qwen.SYSTEM_PROMPT, model=model)
    for q, s in zip(qs, (56, 112, 84)):
        solid_image(s).save(tmp_path / f"{s}.png")
    prompts = [encode({"id": q, "question": q, "image": str(tmp_path / f"{s}.png")}) for q, s in zip(qs, (56, 112, 84))]
    G, T = 2, 1.3
    batch = qwen.repeat_batch(qwen.collate(prompts, tok.pad_token_id), G)
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=12, do_sample=True, temperature=T, top_k=0, top_p=1.0,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                         suppress_tokens=qwen.vision_token_ids(model.config), eos_token_id=tok.eos_token_id)
    comp = out.sequences[:, batch["input_ids"].shape[1]:]
    is_eos = comp == tok.eos_token_id
    mask = ((is_eos.cumsum(1) - is_eos.long()) == 0).long()
    sampled = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)
    features = grpo.image_features(model, prompts) if reuse_vision else None
    b, P = grpo.sequence_batch(prompts, list(range(len(comp))), G, comp, mask, tok.pad_token_id, features)
    with torch.no_grad():
        logp, _ = grpo.token_logprobs(model, b, P, comp, T, qwen.vision_token_ids(model.config))
    assert ((logp - sampled).abs() * mask).max() < 1e-5
    assert b["input_ids"].shape[0] == 6 and (b["attention_mask"][:, 0] == 0).any()  # really left-padded


# ---- the whole loop -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    """The toy colour question (one solid square, lettered options): GRPO's measured learnable task."""
    out = str(tmp_path_factory.mktemp("colour"))
    toy.make_data(out, n=256, test_n=32, seed=0, kinds="colour")
    return os.path.join(out, "train.jsonl")


def grpo_args(model, data, out, *extra):
    return ["--model", model, "--data", data, "--out", str(out), "--rollout-batch", "4", "--group-size", "4",
            "--train-batch", "16", "--micro-batch", "8", "--max-new-tokens", "12", "--temperature", "1.0",
            "--lr", "1e-3", "--min-lr", "1e-3", "--warmup-ratio", "0", *map(str, extra)]


def test_two_ranks_under_torchrun(tmp_path, tiny_model_dir, colour_data):
    args = grpo_args(tiny_model_dir, colour_data, tmp_path / "run", "--max-steps", 3, "--kl-coef", 0.01)
    args[args.index("--rollout-batch") + 1] = "8"  # 4 prompts per rank
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "05_grpo.py", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(m["count/mcq"] == 32 for m in lines)  # 8 prompts x 4 samples, summed over the 2 ranks
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "model")  # the gathered export loads


def test_resume_gives_the_same_weights(tmp_path, tiny_model_dir, colour_data):
    from safetensors.torch import load_file

    common = grpo_args(tiny_model_dir, colour_data, "OUT", "--kl-coef", 0.01, "--kl-target", 0.001)

    def run(out, *extra):
        args = list(common)
        args[args.index("OUT")] = str(out)
        grpo.main(args + [str(e) for e in extra])

    run(tmp_path / "straight", "--max-steps", 4)
    run(tmp_path / "halves", "--max-steps", 2)
    run(tmp_path / "halves", "--max-steps", 4, "--resume")
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "halves" / "model" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    metrics = [json.loads(line) for line in open(tmp_path / "halves" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]


def format_only_sft(model_dir, data_path, out, steps):
    """The 'format-only start' of docs/toy.md: SFT on the right format with a random letter."""
    rng = random.Random(0)
    folder = os.path.dirname(data_path)
    sft_path = os.path.join(folder, "format_sft.jsonl")
    with open(sft_path, "w") as f:
        for _, r in jsonl.read_jsonl(data_path):
            r["response"] = f"<think> </think> <answer>{rng.choice('ABCD')}</answer>"
            f.write(json.dumps(r) + "\n")
    sft.main(["--model", model_dir, "--data", sft_path, "--out", str(out), "--global-batch", "32",
              "--micro-batch", "32", "--lr", "2e-3", "--min-lr", "2e-3", "--warmup-ratio", "0",
              "--max-steps", str(steps)])
    return os.path.join(str(out), "model")


@pytest.mark.slow
def test_grpo_learns_the_colour_question_from_a_format_only_start(tmp_path, tiny_model_dir, colour_data):
    start = format_only_sft(tiny_model_dir, colour_data, tmp_path / "sft", steps=100)
    out = tmp_path / "grpo"
    args = grpo_args(start, colour_data, out, "--max-steps", 150, "--kl-coef", 0)
    args[args.index("--rollout-batch") + 1] = "8"
    args[args.index("--group-size") + 1] = "8"
    args[args.index("--train-batch") + 1] = "64"
    args[args.index("--micro-batch") + 1] = "64"
    grpo.main(args)
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    first = sum(m["reward"] for m in metrics[:25]) / 25
    last = sum(m["reward"] for m in metrics[-25:]) / 25
    print(f"colour GRPO: mean reward {first:.3f} (steps 1-25) -> {last:.3f} (steps 126-150)")
    assert metrics[0]["no_answer_share"] < 0.5  # the format start writes <answer> blocks
    assert last - first >= 0.3


def test_rollout_with_precomputed_vision_features_samples_the_same(tiny):
    """generate() fed the vision features once per prompt == generate() running the tower on G copies."""
    model, tok, ip = tiny
    prompts = [qwen.encode_example(tok, ip, q, solid_image(s)) for q, s in (("a?", 56), ("bb?", 112))]
    args = type("A", (), {"max_new_tokens": 10, "temperature": 1.0, "top_p": 1.0})
    torch.manual_seed(0)
    with_pixels = grpo.rollout_hf(model, prompts, 3, args, tok.pad_token_id)
    torch.manual_seed(0)
    with_features = grpo.rollout_hf(model, prompts, 3, args, tok.pad_token_id, grpo.image_features(model, prompts))
    model.eval()
    assert torch.equal(with_pixels[0], with_features[0]) and torch.equal(with_pixels[1], with_features[1])
