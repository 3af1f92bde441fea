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
from vlaa import colocate, jsonl, qwen, vision

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


def test_kl_k3_is_capped_at_10_like_verl():
    # ref - logp = 20: exp(20) - 21 = 4.9e8 uncapped; 2 is still below the cap (e^2 - 3 = 4.389)
    k3 = grpo.kl_k3(torch.tensor([-20.0, -2.0]), torch.tensor([0.0, 0.0]))
    assert torch.allclose(k3, torch.tensor([10.0, 4.389056]), atol=1e-5)


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


# ---- the loss modes, by hand ----------------------------------------------------------------------


def test_loss_aggregations_with_global_normalisers():
    # two completions: 3 tokens with loss 1 each (advantage -1), 1 token with loss -2 (advantage 2); on-policy
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    adv = torch.tensor([-1.0, 2.0])
    loss = lambda agg, **kw: grpo.policy_loss(logp, logp, None, adv, mask, loss_agg=agg, **kw)[0].item()  # noqa: E731
    assert loss("seq") == pytest.approx((1 + -2) / 2)  # each completion's mean, then their mean
    assert loss("token") == pytest.approx((3 - 2) / 4)  # every token weighs the same
    assert loss("dr_grpo", normalizer=2 * 8) == pytest.approx((3 - 2) / 16)  # 2 completions x max_new_tokens 8
    # the normaliser a caller sums over ranks, for each mode
    assert grpo.loss_normalizer(mask, "seq", 8).item() == 2
    assert grpo.loss_normalizer(mask, "token", 8).item() == 4
    assert grpo.loss_normalizer(mask, "dr_grpo", 8).item() == 16
    # a micro-batch split with the global normaliser adds up to the whole batch
    halves = sum(grpo.policy_loss(logp[i:i + 1], logp[i:i + 1], None, adv[i:i + 1], mask[i:i + 1], loss_agg="seq",
                                  normalizer=2)[0].item() for i in range(2))
    assert halves == pytest.approx(loss("seq"))


def test_gspo_uses_one_clipped_ratio_per_completion():
    # token log-ratios 0.2 and 0.4: the sequence ratio is exp(0.3) = 1.3499, clipped at 1.2 for A > 0
    logp, old = torch.tensor([[0.2, 0.4]]), torch.zeros(1, 2)
    loss, stats = grpo.policy_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 2), importance_level="sequence")
    assert loss.item() == pytest.approx(-1.2) and stats["clip_frac"] == 1.0
    assert stats["ratio"] == pytest.approx(1.349859, abs=1e-5)
    # per token, the first token (ratio 1.2214) is clipped too, but not at the same value
    token, _ = grpo.policy_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 2), clip_high=0.25)
    assert token.item() == pytest.approx(-(1.221403 + 1.25) / 2, abs=1e-5)


@pytest.mark.parametrize("ratio, adv, expected", [
    (5.0, -1.0, 3.0),    # negative advantage, ratio far above 1: PPO's loss 5 is capped at c |A| = 3
    (2.0, -1.0, 2.0),    # below c: unchanged
    (0.5, -1.0, 0.8),    # below 1 - clip: PPO's clipped value, unchanged
    (5.0, 1.0, -1.2),    # positive advantage: dual clip does nothing
])
def test_dual_clip_caps_the_loss_of_negative_advantages(ratio, adv, expected):
    assert one_token(ratio, adv, dual_clip=3.0)[0] == pytest.approx(expected, abs=1e-5)


def test_truncated_importance_weights_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.9, 0.2]]))  # the trainer's probabilities of the sampled tokens
    vllm = torch.log(torch.tensor([[0.4, 0.3, 0.2]]))  # the engine's
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w = grpo.truncated_is_weights(old, vllm, mask, cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.25, 2.0, 1.0]]))  # 0.9 / 0.3 = 3 is capped at 2; masked -> 1
    seq = grpo.truncated_is_weights(old, vllm, mask, cap=10.0, level="sequence")
    assert torch.allclose(seq, torch.tensor([[3.75]]))  # the product 1.25 x 3
    # in the loss the weight multiplies the policy term, not the KL
    logp = torch.zeros(1, 3)
    loss, _ = grpo.policy_loss(logp, logp, None, torch.tensor([1.0]), mask, loss_agg="token", is_weights=w)
    assert loss.item() == pytest.approx(-(1.25 + 2.0) / 2)


def test_truncated_completions_leave_the_loss_and_its_normaliser():
    eos = 2
    comp = torch.tensor([[5, 6, eos], [5, 6, 7]])  # the second hit max_new_tokens without EOS
    truncated = ~torch.isin(comp, torch.tensor([eos])).any(1)
    mask = torch.ones(2, 3) * (~truncated).float()[:, None]
    assert truncated.tolist() == [False, True] and grpo.loss_normalizer(mask, "token", 3).item() == 3
    logp = torch.zeros(2, 3)
    loss, _ = grpo.policy_loss(logp, logp, None, torch.tensor([1.0, -5.0]), mask, loss_agg="seq")
    assert loss.item() == pytest.approx(-1.0)  # only the finished completion counts


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
    features = vision.image_features(model, prompts) if reuse_vision else None
    b, P = grpo.sequence_batch(prompts, list(range(len(comp))), G, comp, mask, tok.pad_token_id, features)
    with torch.no_grad():
        logp, _ = grpo.token_logprobs(model, b, P, comp, T, qwen.vision_token_ids(model.config), "cpu")
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


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """Every rule-based verifier type in one file (count: digit, colour: mcq, sum: math, box: iou), and a
    held-out test file: the paper's mix, so ranks see different types in one step."""
    out = str(tmp_path_factory.mktemp("mixed"))
    toy.make_data(out, n=64, test_n=12, seed=0, kinds="colour,count,sum,box")
    return os.path.join(out, "train.jsonl")


def test_two_ranks_with_mixed_verifier_types_under_torchrun(tmp_path, each_model_dir, mixed_data):
    args = grpo_args(each_model_dir, mixed_data, tmp_path / "run", "--max-steps", 3, "--kl-coef", 0.01)
    args[args.index("--rollout-batch") + 1] = "8"  # 4 prompts per rank, of different types on the two ranks
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "05_grpo.py", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:  # per-type counts over both ranks add up to the step's 8 prompts x 4 samples
        counts = {t: m[f"count/{t}"] for t in ("digit", "mcq", "math", "iou", "open")}
        assert sum(counts.values()) == 32 and sum(c > 0 for c in counts.values()) >= 2, counts
        for t, c in counts.items():  # each type's mean reward is its reward sum over its count, on both ranks
            assert (f"reward/{t}" in m) == (c > 0) and m[f"reward_sum/{t}"] <= c
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "model")  # the gathered export loads


def test_token_means_over_ranks_weigh_each_rank_by_its_tokens(tmp_path):
    """kl (which the adaptive controller reads), clip_frac, ratio and entropy are token means: over two ranks
    holding 3 and 1 tokens, the mean is (3 x 0.1 + 1 x 0.5) / 4 = 0.2, not the ranks' plain average 0.3;
    a plain mean (reward: each rank holds the same number of samples) stays plain, a sum a sum."""
    script = tmp_path / "reduce.py"
    script.write_text(f"""import json, sys
sys.path.insert(0, {ROOT!r})
import torch.distributed as dist
from vlaa import training
dist.init_process_group("gloo")
r = dist.get_rank()
out = training.reduce_metrics({{"kl": (0.1, 3.0) if r == 0 else (0.5, 1.0), "empty": (0.0, 0.0), "reward": r}},
                              {{"count": 2.0}}, 2)
print(json.dumps(out)) if r == 0 else None
dist.destroy_process_group()
""")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == pytest.approx({"kl": 0.2, "empty": 0.0, "reward": 0.5, "count": 4.0})


def straight_and_resumed(tmp_path, common):
    """05 with `common` (its --out "OUT") for 4 steps straight, and for 2 then resumed to 4 -> both exports."""
    from safetensors.torch import load_file

    def run(out, *extra):
        args = list(common)
        args[args.index("OUT")] = str(out)
        grpo.main(args + [str(e) for e in extra])

    run(tmp_path / "straight", "--max-steps", 4)
    run(tmp_path / "halves", "--max-steps", 2)
    run(tmp_path / "halves", "--max-steps", 4, "--resume")
    return tuple(load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("straight", "halves"))


def test_resume_gives_the_same_weights(tmp_path, tiny_model_dir, colour_data):

    a, b = straight_and_resumed(tmp_path, grpo_args(tiny_model_dir, colour_data, "OUT", "--kl-coef", 0.01,
                                                    "--kl-target", 0.001))
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
def test_grpo_learns_the_colour_question_from_a_format_only_start(tmp_path, each_learning_model_dir, colour_data):
    start = format_only_sft(each_learning_model_dir, colour_data, tmp_path / "sft", steps=100)
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


def test_rollout_with_precomputed_vision_features_samples_the_same(each_tiny):
    """generate() fed the vision features once per prompt == generate() running the tower on G copies."""
    model, tok, ip = each_tiny
    prompts = [qwen.encode_example(tok, ip, q, solid_image(s)) for q, s in (("a?", 56), ("bb?", 112))]
    args = type("A", (), {"max_new_tokens": 10, "temperature": 1.0, "top_p": 1.0})
    torch.manual_seed(0)
    with_pixels = grpo.rollout_hf(model, prompts, 3, args, tok.pad_token_id)
    torch.manual_seed(0)
    with_features = grpo.rollout_hf(model, prompts, 3, args, tok.pad_token_id, vision.image_features(model, prompts))
    model.eval()
    assert torch.equal(with_pixels[0], with_features[0]) and torch.equal(with_pixels[1], with_features[1])


def test_rollouts_ignore_the_checkpoints_generation_config(tiny_model_dir, tmp_path):
    """Instruct checkpoints ship sampling settings in generation_config.json; generate() would apply them. A
    checkpoint with repetition_penalty 1.3, top_k 1 and temperature 0.1 still samples softmax(logits / T): the
    loss's log-probs equal the sampler's to 1e-5."""
    import shutil

    quirky = tmp_path / "quirky"
    shutil.copytree(tiny_model_dir, quirky)
    config = json.loads((quirky / "generation_config.json").read_text())
    config.update(repetition_penalty=1.3, top_k=1, temperature=0.1, top_p=0.5, do_sample=True)
    (quirky / "generation_config.json").write_text(json.dumps(config))
    model, tok, ip = qwen.load_model(str(quirky), "float32", "cpu")
    assert model.generation_config.repetition_penalty == 1.3  # the quirk is really there
    solid_image(56).save(tmp_path / "a.png")
    encode = qwen.prompt_encoder(tok, ip, qwen.SYSTEM_PROMPT, model=model)
    prompts = [encode({"id": q, "question": q, "image": str(tmp_path / "a.png")}) for q in ("What colour?", "hi")]
    G, T = 4, 1.0
    torch.manual_seed(0)
    comp, mask, sampler = qwen.sample_completions(model.eval(), qwen.repeat_batch(qwen.collate(prompts, 0), G), 16,
                                                  temperature=T, pad_id=tok.pad_token_id, return_logprobs=True)
    b, width = grpo.sequence_batch(prompts, list(range(len(comp))), G, comp, mask, tok.pad_token_id)
    with torch.no_grad():
        logp, _ = grpo.token_logprobs(model, b, width, comp, T, qwen.vision_token_ids(model.config), "cpu")
    assert ((logp - sampler).abs() * mask).max() < 1e-5
    assert len({tuple(c) for c in comp.tolist()}) > 2  # sampled at T 1, not top_k 1's one answer per prompt


def test_lr_schedule_has_one_point_per_optimizer_update(tmp_path, tiny_model_dir, colour_data, monkeypatch):
    lrs, optimizers = [], []
    set_lr = grpo.training.set_lr
    monkeypatch.setattr(grpo.training, "set_lr", lambda opt, lr: lrs.append(lr) or optimizers.append(opt)
                        or set_lr(opt, lr))
    # 4 prompts x 4 samples, 8 per update: 2 updates a step, 6 in 3 steps; warmup ceil(0.3 x 6) = 2 updates
    args = grpo_args(tiny_model_dir, colour_data, tmp_path / "run", "--max-steps", 3, "--kl-coef", 0,
                     "--warmup-ratio", 0.3, "--min-lr", 1e-4)
    args[args.index("--train-batch") + 1] = "8"
    grpo.main(args)
    assert len(lrs) == 6
    assert lrs[:3] == pytest.approx([0.0, 0.5e-3, 1e-3])  # from 0, below the peak until warmup ends
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] > 1e-4  # cosine down toward the floor
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["lr"] for m in metrics] == pytest.approx(lrs[::2])  # each step logs its first and last update's
    assert [m["lr_last"] for m in metrics] == pytest.approx(lrs[1::2])
    assert optimizers[0].param_groups[0]["betas"] == (0.9, 0.95)  # OpenRLHF's AdamW betas, not torch's 0.999


def test_top_p_below_one_is_refused_before_any_model_loads(tmp_path, capsys):
    """The loss scores softmax(logits / T); a top-p sampler draws from a truncated one: refused, not mis-scored."""
    with pytest.raises(SystemExit) as e:
        grpo.main(["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data.jsonl"), "--out",
                   str(tmp_path / "run"), "--top-p", "0.9"])
    assert e.value.code == 2 and "--top-p 0.9: only 1" in capsys.readouterr().err


def test_reward_model_scores_open_samples_end_to_end(tmp_path, tiny_model_dir, tiny_rm_dir):
    data = tmp_path / "data"
    toy.make_data(str(data), n=16, test_n=0, seed=0, kinds="shapes,colour")  # shapes: open-ended answers
    args = grpo_args(tiny_model_dir, str(data / "train.jsonl"), tmp_path / "run", "--max-steps", 2, "--kl-coef", 0,
                     "--reward-model", tiny_rm_dir)
    grpo.main(args)
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert sum(m["count/open"] for m in metrics) > 0
    assert all(0.0 <= m["reward"] <= 1.0 for m in metrics)


def test_held_out_accuracy_is_logged_during_training(tmp_path, tiny_model_dir, mixed_data):
    test = os.path.join(os.path.dirname(mixed_data), "test.jsonl")
    args = grpo_args(tiny_model_dir, mixed_data, tmp_path / "run", "--max-steps", 2, "--kl-coef", 0,
                     "--eval-data", test, "--eval-every", 1, "--eval-max-new-tokens", 8)
    grpo.main(args)
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(0.0 <= m["eval/accuracy"] <= 1.0 for m in metrics)
    assert {k for k in metrics[0] if k.startswith("eval/accuracy/")} == \
        {f"eval/accuracy/{t}" for t in ("digit", "mcq", "math", "iou")}
