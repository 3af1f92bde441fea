"""Stage 5: GRPO with the mixed perception + cognition reward, written out in plain PyTorch.

The paper's main recipe (§4): start from an instruct model (or 04_sft.py's output, to measure how
SFT hurts), and for each step: take a batch of prompts (image + question), sample G completions each,
score them with rewards.py (digit / multiple choice / math-verify / box IoU / reward model), normalise
the rewards within each group into advantages, and take clipped policy-gradient steps with a KL term
to a frozen reference model. Read top to bottom: arguments, the objective, log-probs for a VLM,
rollouts, the loop. Plumbing (torchrun, FSDP2, checkpoints, the colocated vLLM engine) lives in vlaa/.

    # CPU, the demo's toy instruct base: the reward rises within a minute (the README's toy run has every flag)
    python 05_grpo.py --model assets/toy-base --data runs/data/final/rl.jsonl --out runs/grpo --rollout-batch 8 \
        --group-size 8 --train-batch 64 --micro-batch 64 --max-new-tokens 64 --lr 1e-4 --min-lr 1e-5 --kl-coef 0
    # one H100 (3B), then 8 GPUs (FSDP2 + NCCL), one colocated vLLM engine per GPU; fits: python bench/plan.py
    python 05_grpo.py --model Qwen/Qwen2.5-VL-3B-Instruct --data VLAA-Thinking-GRPO-25K.json --out runs/grpo-3b \
        --rollout vllm --micro-batch 2 --activation-checkpointing --ref-offload --image-root /data/vlaa/images
    torchrun --nproc_per_node 8 05_grpo.py --model Qwen/Qwen2.5-VL-7B-Instruct --data ... --rollout vllm \
        --micro-batch 4 --activation-checkpointing

Defaults are the paper's (docs/paper.md): G=4, temperature 0.8, rollout batch 512 prompts, train batch
256 completions (8 optimizer updates per rollout), 1 episode, cosine LR to a minimum with warmup ("LR2"),
adaptive KL starting at 1e-3 with target 5e-4 ("KL2"). What the paper left open is a flag.

Outputs in --out: run.json (what made the run), metrics.jsonl (one line per step), rollouts.jsonl (sampled
completions), checkpoints/ (every ~10% of the run and on SIGTERM, resumable with --resume; docs/checkpoints.md),
model/ (a Hugging Face folder like the starting checkpoint; merged with --lora-rank).
"""

import argparse
import os
import time

import torch
from tqdm import tqdm

import rewards
from vlaa import colocate, flags, heldout, logprobs, lora, qwen, runs, tracking, training, vision
from vlaa.flags import at_least, fraction, nonneg_float, nonneg_int, positive_float, positive_int, probability
from vlaa.records import has_aha, load_records, normalize_verifier

# ----------------------------------------------------------------------------------------------------
# Arguments

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", required=True, help="starting checkpoint: hub id, 04_sft.py's OUT/model, or a tiny model")
p.add_argument("--data", required=True, help="rl.jsonl from 03 or the released VLAA-Thinking-GRPO-25K.json")
p.add_argument("--fmt", default="auto", choices=["auto", "ours", "vlaa"], help="record format of --data")
p.add_argument("--image-root", default=None, help="folder that image paths are relative to (default: the data file's)")
p.add_argument("--skip-bad", action="store_true", help="leave out and count bad records instead of stopping")
p.add_argument("--out", required=True, help="output folder")
p.add_argument("--no-system-prompt", action="store_true", help="prompt without the VLAA system prompt")
p.add_argument("--min-pixels", type=positive_int, help="image processor min_pixels (default: the checkpoint's)")
p.add_argument("--max-pixels", type=positive_int, help="image processor max_pixels, also the vLLM engine's "
               "(default: the checkpoint's, at most 256*32*32, the paper's evaluation budget)")
# rollouts
p.add_argument("--rollout", default="hf", choices=["hf", "vllm"], help="hf: transformers generate; vllm: colocated")
p.add_argument("--rollout-batch", type=positive_int, default=512, help="prompts per step over all ranks (paper: 512)")
p.add_argument("--group-size", type=at_least(2), default=4, help="completions per prompt, G (paper: 4)")
p.add_argument("--temperature", type=positive_float, default=0.8, help="sampling temperature (paper: 0.8)")
p.add_argument("--top-p", type=fraction, default=1.0, help="only 1 (off): the loss scores softmax(logits / T), "
               "not the truncated distribution a top-p sampler draws from, so below 1 is refused")
p.add_argument("--max-new-tokens", type=positive_int, default=1024, help="completion length cap (paper: not stated)")
p.add_argument("--max-prompt-length", type=positive_int, default=2048, help="prompts longer than this (tokens, the "
               "image's included) are dropped with a count; the vLLM engine's context is this + --max-new-tokens")
p.add_argument("--vllm-gpu-memory", type=fraction, default=None, help="vLLM gpu_memory_utilization per rank (default: "
               "0.3 on GPU; on CPU, where it is a share of host RAM, a fixed 1 GiB KV cache)")
p.add_argument("--vllm-is-cap", type=nonneg_float, default=2.0, help="--rollout vllm: cap of the importance weight "
               "pi_trainer / pi_vllm correcting the engine's sampling mismatch; 0: off (default: %(default)s)")
p.add_argument("--vllm-is-level", default="token", choices=["token", "sequence"], help="that weight per token or per "
               "completion (the product of its token ratios) (default: %(default)s; docs/vllm.md)")
# objective
p.add_argument("--train-batch", type=positive_int, default=256, help="completions per optimizer update over all ranks "
               "(paper: 256, so a rollout of 512x4 gives 8 updates)")
p.add_argument("--micro-batch", type=positive_int, default=8, help="completions per forward pass on one rank")
p.add_argument("--ppo-epochs", type=positive_int, default=1, help="passes over each rollout")
p.add_argument("--clip-low", type=probability, default=0.2, help="ratio clipped below at 1 - clip_low")
p.add_argument("--clip-high", type=nonneg_float, default=0.2, help="ratio clipped above at 1 + clip_high (DAPO: 0.28)")
p.add_argument("--kl-coef", type=nonneg_float, default=1e-3, help="KL coefficient, k3 estimator in the loss; 0 = no "
               "reference model (paper KL2: start 1e-3)")
p.add_argument("--kl-target", type=nonneg_float, default=5e-4, help="adaptive KL target (paper KL2: 5e-4); 0 = fixed")
p.add_argument("--kl-horizon", type=positive_int, default=10000, help="adaptive KL horizon in samples (as OpenRLHF)")
p.add_argument("--scale-rewards", default="group", choices=["group", "none"],
               help="group: (r - mean) / (std + 1e-4), GRPO; none: r - mean, Dr. GRPO (default: %(default)s)")
p.add_argument("--loss-agg", default="seq", choices=["seq", "token", "dr_grpo"], help="seq: mean of each "
               "completion's token mean (the paper's; TRL 'grpo'); token: all tokens' mean (DAPO; TRL 'dapo'); "
               "dr_grpo: token sum / (completions x --max-new-tokens) (default: %(default)s; docs/grpo.md)")
p.add_argument("--importance-level", default="token", choices=["token", "sequence"], help="sequence: one ratio per "
               "completion, exp(mean token log-ratio) (GSPO; TRL importance_sampling_level) (default: %(default)s)")
p.add_argument("--dual-clip", type=nonneg_float, default=0.0, help="c > 1: the loss of a negative advantage is capped "
               "at c x |A| (dual-clip PPO, verl's default 3); 0: off, the paper's (default: %(default)s)")
p.add_argument("--mask-truncated", action="store_true", help="completions cut off by --max-new-tokens leave the "
               "loss; their rewards still shape their group's advantages (TRL mask_truncated_completions)")
p.add_argument("--drop-uniform-groups", action="store_true",
               help="leave out groups whose rewards are all equal (DAPO's dynamic sampling, without resampling)")
p.add_argument("--verifier-types", default="digit,mcq,math,iou,open",
               help="train only on samples of these types (the paper's reward ablation: drop one, Table 5)")
p.add_argument("--format-weight", type=probability, default=0.0, help="weight of the strict format term (paper: 0)")
p.add_argument("--reward-model", default=None, help="HF reward model for `open` samples (paper: "
               "internlm/internlm-xcomposer2d5-7b-reward); without it, open samples are dropped")
p.add_argument("--trust-remote-code", action="store_true", help="allow the reward model's own code")
p.add_argument("--open-beta", type=positive_float, default=0.2, help="beta of the open-ended reward (ScoreRS: 0.2)")
# optimisation
p.add_argument("--lr", type=positive_float, default=5e-6, help="peak LR (paper: not stated; 5e-6 if min LR is 0.1x)")
p.add_argument("--min-lr", type=nonneg_float, default=5e-7, help="cosine floor (paper LR2: 5e-7)")
p.add_argument("--warmup-ratio", type=probability, default=0.03, help="share of steps warming up (paper LR2: 3%%)")
p.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="AdamW weight decay (paper: not stated)")
p.add_argument("--adam-betas", type=flags.adam_beta, nargs=2, default=(0.9, 0.95), metavar=("B1", "B2"),
               help="AdamW betas (default: OpenRLHF's, %(default)s; torch's are 0.9 0.999)")
p.add_argument("--grad-clip", type=positive_float, default=1.0, help="gradient norm clipped to this (OpenRLHF: 1.0)")
p.add_argument("--episodes", type=positive_float, default=1.0, help="passes over the prompts (paper: 1, i.e. 49 steps)")
p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps (overrides --episodes)")
p.add_argument("--train-vision", action="store_true", help="train the vision tower too (default: frozen)")
p.add_argument("--activation-checkpointing", action="store_true", help="recompute activations to save memory")
p.add_argument("--ref-offload", action="store_true", help="keep the reference model in CPU memory (GPU)")
# bookkeeping
p.add_argument("--save-every", type=positive_int, default=None,
               help="resumable checkpoint every N steps (default: every ~10%% of the run); always on SIGTERM")
p.add_argument("--log-rollouts-every", type=positive_int, default=10, help="write sampled rollouts every N steps")
p.add_argument("--resume", action="store_true", help="continue this run from its last checkpoint in --out")
p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds another run or this "
               "one already (its checkpoints, model and logs are deleted)")
p.add_argument("--cache-size", type=nonneg_int, default=2000, help="keep up to N encoded prompts (pixels and "
               "positions) in memory for later episodes; 0 = encode every time")
p.add_argument("--eval-data", default=None, help="held-out records (with answer and verifier_type): greedy "
               "accuracy per verifier type is logged to metrics.jsonl as eval/... (sharded over ranks)")
p.add_argument("--eval-every", type=nonneg_int, default=0,
               help="evaluate --eval-data every N steps and at the end (0: off)")
p.add_argument("--eval-max-new-tokens", type=positive_int, default=None, help="(default: --max-new-tokens)")
p.add_argument("--seed", type=nonneg_int, default=0, help="prompt order and sampling (rank r samples with seed + r)")
tracking.add_report_to(p)
lora.add_flags(p)


# ----------------------------------------------------------------------------------------------------
# The GRPO objective


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """(r - group mean) / (group std + eps), or just r - mean with scale="none" (Dr. GRPO).
    rewards: [N] = [prompts * G], grouped by prompt. A group whose rewards are all equal gets advantage 0,
    and so does every sample when G = 1 (TRL's convention and eps; verl uses eps 1e-6: docs/grpo.md)."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)  # [prompts, G]
    adv = r - r.mean(1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(1, keepdim=True) + eps) if group_size > 1 else adv
    elif scale != "none":
        raise ValueError(f"scale must be 'group' or 'none', not {scale!r}")
    return adv.flatten()  # [N]


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0.
    Bounded as verl and EasyR1 bound it (core_algos.py kl_penalty "low_var_kl"): the log-ratio to
    [-20, 20] so exp() cannot overflow, the value to 10, so one token far from the reference cannot swamp
    the loss (without the cap, ref - logp = 20 contributes 4.9e8)."""
    d = (ref_logp - logp).clamp(-20, 20)
    return (torch.exp(d) - d - 1).clamp(max=10)


def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_low=0.2, clip_high=0.2, kl_coef=0.0,
                loss_agg="seq", normalizer=None, importance_level="token", dual_clip=0.0, is_weights=None):
    """The clipped GRPO surrogate plus kl_coef * k3 KL. logp, old_logp, ref_logp, mask: [B, T] per token;
    advantages: [B]. Returns (loss, stats dict of floats). The paper's objective is ratio, clip, pessimistic
    min, KL, mean; off by default: importance_level="sequence" (GSPO), dual_clip=c (a negative advantage's
    loss capped at c |A|), is_weights (the rollout engine's sampling mismatch). Split over micro-batches and
    ranks, the caller passes the global count as normalizer, so the pieces add up to the whole batch's loss."""
    mask = mask.float()
    ratio = importance_ratio(logp, old_logp, mask, importance_level)  # [B, T], or [B, 1] per sequence
    adv = advantages.unsqueeze(1)  # [B, 1]: one advantage for every token of a completion
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.min(unclipped, clipped)  # [B, T] (or [B, 1])
    if dual_clip:
        per_token = torch.where(adv < 0, torch.min(per_token, -dual_clip * adv), per_token)  # verl's clip_ratio_c
    if is_weights is not None:
        per_token = per_token * is_weights  # truncated importance sampling: trainer vs rollout engine
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if kl_coef:
        per_token = per_token + kl_coef * kl  # [B, T]: KL takes the same aggregation (TRL, verl, EasyR1)
    loss = aggregate(per_token * mask, mask, loss_agg, normalizer)
    with torch.no_grad():
        is_clipped = (clipped < unclipped).float().expand_as(mask)  # the clipped term is the one min() picks
        denom = mask.sum().clamp(min=1)
        stats = {"clip_frac": float((is_clipped * mask).sum() / denom), "kl": float((kl * mask).sum() / denom),
                 "ratio": float((ratio.expand_as(mask) * mask).sum() / denom), "tokens": float(mask.sum())}
    return loss, stats


def importance_ratio(logp, old_logp, mask, level="token"):
    """pi / pi_old per token, or per sequence (GSPO; TRL importance_sampling_level="sequence"): exp of the
    mean token log-ratio of the completion, one number for all its tokens. Log-ratios are clamped to
    [-20, 20] like verl and EasyR1: exp() must not overflow."""
    log_ratio = logp - old_logp  # [B, T]
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1)).unsqueeze(1)  # [B, 1]
    elif level != "token":
        raise ValueError(f"importance_level must be 'token' or 'sequence', not {level!r}")
    return torch.exp(log_ratio.clamp(-20, 20))


def aggregate(masked_loss, mask, loss_agg, normalizer=None):
    """Per-token losses [B, T] (already masked) -> one number. The three conventions (docs/grpo.md):
    seq      each completion's token mean, then the mean over completions (the paper's OpenRLHF; TRL "grpo")
    token    sum over all completion tokens / their number (TRL "dapo", DAPO)
    dr_grpo  sum over all completion tokens / (completions x max_new_tokens) (TRL "dr_grpo", Dr. GRPO)
    normalizer: what to divide by (loss_normalizer summed over ranks); default: this batch's own."""
    if normalizer is None:
        normalizer = loss_normalizer(mask, loss_agg, mask.shape[1])
    if loss_agg == "seq":
        masked_loss = masked_loss.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
    return masked_loss.sum() / torch.as_tensor(normalizer).clamp(min=1)


def loss_normalizer(mask, loss_agg, max_new_tokens):
    """What `aggregate` divides by, for the rows of one optimizer update on this rank ([rows, T] mask):
    completions with any token left (seq; empty rows are out, as in verl), tokens (token), all completions x
    max_new_tokens (dr_grpo: a constant, so long and short answers weigh the same per token)."""
    if loss_agg == "seq":
        return (mask.sum(1) > 0).float().sum()
    if loss_agg == "token":
        return mask.sum()
    if loss_agg == "dr_grpo":
        return torch.tensor(float(mask.shape[0] * max_new_tokens))
    raise ValueError(f"loss_agg must be 'seq', 'token' or 'dr_grpo', not {loss_agg!r}")


def truncated_is_weights(old_logp, sampler_logp, mask, cap=2.0, level="token"):
    """Truncated importance sampling for a rollout engine whose sampling distribution differs from the
    trainer's (vLLM: other kernels, precision, batching): weight = pi_trainer / pi_engine, capped at `cap`,
    per token, or per completion as the product of its token ratios (TRL vllm_importance_sampling_mode
    "token_truncate" / "sequence_truncate"). No gradient flows through it. -> [B, T] or [B, 1]"""
    diff = (old_logp - sampler_logp) * mask  # [B, T]
    if level == "sequence":
        diff = diff.sum(1, keepdim=True)  # [B, 1]
    return torch.exp(diff.clamp(max=20)).clamp(max=cap).detach()


def adaptive_kl_coef(coef, kl, target, n_samples, horizon):
    """OpenRLHF's AdaptiveKLController (the paper's KL1/KL2 settings): nudge the coefficient so the
    observed KL drifts toward the target, by at most 20% per horizon of samples."""
    error = max(-0.2, min(0.2, kl / target - 1))
    return coef * (1 + error * n_samples / horizon)


# ----------------------------------------------------------------------------------------------------
# Log-probs for a vision-language model


def sequence_batch(prompts, rows, group_size, comp, comp_mask, pad_id, features=None):
    """Model inputs for completion rows: [left pad | prompt | completion | right pad], with the images
    as pixels or as precomputed vision features (vlaa/vision.py) -> (batch, prompt width W).

    Positions: Qwen-VL's M-RoPE numbers image tokens on three axes (time, height, width) and text tokens on
    all three alike. A completion's tokens continue from its prompt's largest position, as generate()
    numbers them; the prompt's own come from its cached encoding. Padding gets position 0."""
    examples = [prompts[r // group_size] for r in rows]
    batch = qwen.collate(examples, pad_id)
    W = batch["input_ids"].shape[1]
    c, m = comp[rows], comp_mask[rows]  # [b, T]
    batch["input_ids"] = torch.cat([batch["input_ids"], c], 1)  # [b, W+T]
    batch["attention_mask"] = torch.cat([batch["attention_mask"], m], 1)
    batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(c, dtype=torch.int)], 1)
    pos = torch.zeros(3, len(rows), W + c.shape[1], dtype=torch.long)  # [3, b, W+T]
    steps = torch.arange(1, c.shape[1] + 1)  # [T]
    for i, e in enumerate(examples):
        n = e["positions"].shape[1]
        pos[:, i, W - n:W] = e["positions"]
        pos[:, i, W:] = (e["positions"].max() + steps) * m[i]
    batch["position_ids"] = pos
    if features is not None:
        batch = vision.with_features(batch, [features[r // group_size] for r in rows])
    return batch, W


def token_logprobs(model, batch, width, comp, temperature, vision_ids, device, with_entropy=False):
    """log pi(token) for every completion token, under the distribution we sample from: logits / T,
    with the suppressed vision tokens at -inf. `width` is the prompt width W of sequence_batch.
    Returns ([b, T], entropy [b, T] or None), on the device the model computed on.

    The head runs only at the T positions that predict a completion token (position t predicts t+1), 128
    positions at a time, and backward recomputes one chunk's logits at a time (vlaa/logprobs.py): at
    Qwen2.5-VL's vocabulary, [b, W+T, V] logits and their copies cost ~3 MB per completion token."""
    inputs = qwen.to_device(batch, device, model.dtype)
    keep = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)  # [b, W+T]
    keep[:, width - 1:-1] = True  # row-major, the order of comp's tokens
    logp, ent = logprobs.chosen_logprobs(model, inputs, keep, comp.flatten(), temperature, vision_ids, with_entropy)
    return logp.view(comp.shape), ent.view(comp.shape) if with_entropy else None


def frozen_logprobs(model, batches, comp, temperature, vision_ids, device):
    """No-grad log-probs of every row, micro-batch by micro-batch {rows: (batch, W)} (the reference, or the
    policy before its first update) -> [N, T] on the CPU."""
    out = torch.zeros(comp.shape)
    with torch.no_grad():
        for rows, (b, width) in batches.items():
            with training.autocast(device):
                lp, _ = token_logprobs(model, b, width, comp[list(rows)], temperature, vision_ids, device)
            out[list(rows)] = lp.float().cpu()
    return out


# ----------------------------------------------------------------------------------------------------
# Rollouts (the colocated vLLM engine is in vlaa/colocate.py)


def rollout_hf(model, prompts, group_size, args, pad_id, features=None):
    """G completions per prompt -> (ids [N, T], mask [N, T], None: it samples what the loss scores), N = prompts
    * G. With precomputed vision features, the vision tower does not run again on G copies of each image."""
    batch = qwen.repeat_batch(qwen.collate(prompts, pad_id), group_size)  # rows p*G .. p*G+G-1: prompt p
    if features is not None:
        batch = vision.with_features(batch, [f for f in features for _ in range(group_size)])
    model.eval()
    comp, mask = qwen.sample_completions(model, qwen.to_device(batch, model.device), args.max_new_tokens,
                                    args.temperature, args.top_p, pad_id=pad_id)
    model.train()
    return comp, mask, None


# ----------------------------------------------------------------------------------------------------
# The loop


def load_rl_records(path, args, types, has_rm, tokenizer, image_processor, system, master):
    """The prompts 05 trains on: of the chosen verifier types, `open` ones only with a reward model (dropped
    with a count, never scored 0), and short enough for --max-prompt-length (never cut)."""
    records = load_records(path, args.fmt, args.image_root, ("question", "answer", "verifier_type"), args.skip_bad,
                           os.path.join(args.out, "skipped.jsonl" if path == args.data else "skipped-eval.jsonl"))
    records = [r for r in records if r["verifier_type"] in types]
    kept = [r for r in records if r["verifier_type"] != "open" or has_rm]
    fit, too_long = qwen.fitting(kept, tokenizer, image_processor, args.max_prompt_length, system)
    if master and len(fit) < len(records):
        print(f"{path}: dropped {len(records) - len(kept)} `open` prompts (they need --reward-model) and {too_long} "
              f"longer than --max-prompt-length {args.max_prompt_length}")
    return fit


def group_stats(rewards_t, texts, group_size):
    g = rewards_t.view(-1, group_size)
    distinct = [len(set(texts[i:i + group_size])) for i in range(0, len(texts), group_size)]
    return {"uniform_groups": float((g.std(1) == 0).float().mean()) if group_size > 1 else 1.0,
            "distinct_per_group": sum(distinct) / len(distinct)}


def update_policy(model, optimizer, params, micro_batches, batches, comp, loss_mask, adv, old_logp, ref_logp,
                  is_weights, kl_coef, args, vision_ids, world, device):
    """One optimizer update on a mini-batch of completion rows (its micro-batches). Each micro-batch's loss is
    divided by the mini-batch's GLOBAL count (loss_normalizer summed over ranks), so the gradient is that of
    the whole mini-batch on all ranks. Returns (per-micro-batch stats, entropy sum over its tokens, grad norm)."""
    rows_all = [r for key in micro_batches for r in key]
    count = loss_normalizer(loss_mask[rows_all], args.loss_agg, args.max_new_tokens)
    normalizer = training.global_sum(count.to(device), world, device).clamp(min=1)
    stats, ent_sum = [], 0.0
    for i, key in enumerate(micro_batches):
        training.gradient_sync(model, i == len(micro_batches) - 1)  # FSDP2: reduce on the last one only
        b, width = batches[key]
        rows = list(key)
        with training.autocast(device):
            logp, ent = token_logprobs(model, b, width, comp[rows], args.temperature, vision_ids, device, True)
        m = loss_mask[rows].to(device)  # [b, T]
        loss, st = policy_loss(
            logp.float(), old_logp=old_logp[rows].to(device) if old_logp is not None else logp.detach(),
            ref_logp=ref_logp[rows].to(device) if ref_logp is not None else None, advantages=adv[rows].to(device),
            mask=m, clip_low=args.clip_low, clip_high=args.clip_high, kl_coef=kl_coef, loss_agg=args.loss_agg,
            normalizer=normalizer, importance_level=args.importance_level, dual_clip=args.dual_clip,
            is_weights=is_weights[rows].to(device) if is_weights is not None else None)
        (loss * world).backward()  # FSDP2 averages gradients over ranks; the normaliser is already global
        stats.append(st)
        ent_sum += float((ent * m).sum())
    grad_norm = training.clip_grad_norm(params, args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats, ent_sum, grad_norm


def main(argv=None):
    args = flags.parse(p, argv, flags.check_grpo)  # a bad flag or combination stops here, naming it
    runs.check_inputs(args, files=("data", "eval_data"), folders=("image_root",), models=("model", "reward_model"))
    env = training.init_distributed()
    rank, world, device, master = env["rank"], env["world"], env["device"], env["master"]
    rows_per_rank = args.rollout_batch // world * args.group_size
    train_rows = args.train_batch // world  # completions per optimizer update on this rank (divides rows_per_rank)
    torch.manual_seed(args.seed + rank)  # each rank samples its own completions
    runs.hold_run_folder(args.out, env)  # one writer per run folder: a second start stops here, naming the first
    args.max_pixels = qwen.training_max_pixels(args.model, args.max_pixels)  # the trainer's (and engine's)

    # models: the policy (sharded under torchrun), a frozen reference, the reward model, the vLLM engine
    llm = colocate.make_vllm_engine(args, rank) if args.rollout == "vllm" else None  # before the policy lands
    model, tokenizer, image_processor, params, optimizer = training.load_trainable(
        args.model, device, world, args.lr, args.weight_decay, args.train_vision, args.activation_checkpointing,
        args.min_pixels, args.max_pixels, tuple(args.adam_betas), lora.settings(args))
    use_ref = args.kl_coef > 0  # the reference: a frozen copy of the start model (in CPU memory with --ref-offload)
    ref = (model if args.lora_rank else training.load_frozen(args.model, device, world, args.ref_offload)) \
        if use_ref else None  # --lora-rank: the policy with its adapters off (TRL's disable_adapter), no copy
    pad_id, vision_ids = tokenizer.pad_token_id, qwen.vision_token_ids(model.config)
    eos_ids = torch.tensor(model.generation_config.eos_token_id).flatten()  # one id or several
    rm = rewards.RewardModel.from_pretrained(args.reward_model, device=str(device), offload=True,
                                             trust_remote_code=args.trust_remote_code) if args.reward_model else None

    # data
    system = None if args.no_system_prompt else qwen.SYSTEM_PROMPT
    types = [normalize_verifier(t, "--verifier-types") for t in args.verifier_types.split(",")]
    records = load_rl_records(args.data, args, types, rm is not None, tokenizer, image_processor, system, master)
    if len(records) < args.rollout_batch:
        raise SystemExit(f"{args.data}: {len(records)} usable prompts, fewer than --rollout-batch {args.rollout_batch}")
    held_out = load_rl_records(args.eval_data, args, types, rm is not None, tokenizer, image_processor, system,
                               master) if args.eval_data else []
    encode = qwen.prompt_encoder(tokenizer, image_processor, system, args.cache_size, model=model)
    total_steps = args.max_steps or max(1, int(args.episodes * (len(records) // args.rollout_batch)))
    updates_per_step = rows_per_rank // train_rows * args.ppo_epochs
    total_updates = total_steps * updates_per_step  # the LR schedule's length: one point per optimizer update
    warmup = training.warmup_updates(total_updates, args.warmup_ratio)

    state, run_id = runs.start_or_resume(args.out, runs.training_identity("05_grpo", args), args.resume, args.overwrite,
                                         total_steps, env, model, optimizer, logs=("metrics.jsonl", "rollouts.jsonl"))
    start, kl_coef, warmup = state.get("step", 0), state.get("kl_coef", args.kl_coef), state.get("warmup", warmup)
    tracker = tracking.start(args, "05_grpo", run_id, master)
    stop_requested = training.install_sigterm_handler()  # a preempted job saves before it stops
    if master:
        print(f"{len(records)} prompts; {total_steps} steps of {args.rollout_batch} prompts x {args.group_size} "
              f"on {world} rank(s); {updates_per_step} update(s) per step, {total_updates} in all")

    for step in tqdm(range(start, total_steps), disable=not master, desc="grpo", initial=start, total=total_steps):
        chosen = training.step_indices(step, len(records), args.rollout_batch, args.seed)[rank::world]
        step_records = [records[i] for i in chosen]
        samples = [r for r in step_records for _ in range(args.group_size)]  # one per completion row
        prompts = [encode(r) for r in step_records]

        # 1. rollouts; while the vision tower is frozen, its features are computed once per prompt here and
        # reused by generate and by the reference, old and policy forwards of all G completions
        t0 = time.perf_counter()
        features = None if args.train_vision else vision.image_features(model, prompts)
        if llm is not None:
            colocate.push_weights_to_vllm(llm, model, skip_vision=not args.train_vision)
            comp, comp_mask, sampler_logp = colocate.rollout_vllm(llm, step_records, args.group_size, args,
                                                                  tokenizer, system, vision_ids)
        else:
            comp, comp_mask, sampler_logp = rollout_hf(model, prompts, args.group_size, args, pad_id, features)
        comp, comp_mask = comp.cpu(), comp_mask.cpu()  # [N, T], N = this rank's prompts * G
        texts = tokenizer.batch_decode(comp, skip_special_tokens=True)
        truncated = ~torch.isin(comp, eos_ids).any(1)  # [N]: cut off by --max-new-tokens, no EOS
        t1 = time.perf_counter()

        # 2. rewards -> group-normalised advantages; the loss mask (what takes part in the loss)
        rw, rstats = rewards.score_batch(texts, samples, rm=rm, format_weight=args.format_weight, beta=args.open_beta)
        rw = torch.tensor(rw, dtype=torch.float32)  # [N]
        adv = group_advantages(rw, args.group_size, args.scale_rewards)  # [N]
        loss_mask = comp_mask.float()  # [N, T]
        if args.drop_uniform_groups:  # uniform groups carry no signal: out of the loss and its normaliser
            loss_mask *= (rw.view(-1, args.group_size).std(1) > 0).float().repeat_interleave(args.group_size)[:, None]
        if args.mask_truncated:
            loss_mask *= (~truncated).float()[:, None]
        t2 = time.perf_counter()

        # 3. per update, its micro-batches' row tuples (`updates`) and their model inputs (`inputs`); ref, old logp
        order = torch.randperm(len(rw)).tolist()  # mini-batches mix prompts
        minibatches = [order[i:i + train_rows] for i in range(0, len(order), train_rows)]
        updates = [[tuple(m[i:i + args.micro_batch]) for i in range(0, len(m), args.micro_batch)] for m in minibatches]
        inputs = {rows: sequence_batch(prompts, list(rows), args.group_size, comp, comp_mask, pad_id, features)
                  for micro_rows in updates for rows in micro_rows}
        ref_logp = None
        if use_ref:  # with --ref-offload the reference visits the GPU only now (sharded, FSDP2 moves its shards)
            with lora.disabled(ref) if ref is model else training.visiting(ref, device, args.ref_offload and world < 2):
                ref_logp = frozen_logprobs(ref, inputs, comp, args.temperature, vision_ids, device)
        # the trainer's own log-probs before any update: needed when later updates see an older policy, and
        # to weigh the vLLM engine's samples by how far its sampling is from ours
        is_weights = None
        off_policy = args.ppo_epochs > 1 or len(minibatches) > 1
        old_logp = frozen_logprobs(model, inputs, comp, args.temperature, vision_ids, device) \
            if off_policy or sampler_logp is not None else None
        if sampler_logp is not None and args.vllm_is_cap > 0:
            is_weights = truncated_is_weights(old_logp, sampler_logp, comp_mask.float(), args.vllm_is_cap,
                                              args.vllm_is_level)

        # 4. policy updates, each at its own point of the LR schedule
        step_stats, ent_sum, lrs = [], 0.0, []
        for epoch in range(args.ppo_epochs):
            for k, micro_rows in enumerate(updates):
                update = step * updates_per_step + epoch * len(updates) + k
                lrs.append(training.cosine_lr(update, total_updates, args.lr, warmup, args.min_lr))
                training.set_lr(optimizer, lrs[-1])
                st, es, grad_norm = update_policy(
                    model, optimizer, params, micro_batches=micro_rows, batches=inputs, comp=comp, loss_mask=loss_mask,
                    adv=adv, old_logp=old_logp, ref_logp=ref_logp, is_weights=is_weights, kl_coef=kl_coef,
                    args=args, vision_ids=vision_ids, world=world, device=device)
                step_stats += st
                ent_sum += es
        t3 = time.perf_counter()

        # 5. bookkeeping: adaptive KL, metrics, sampled rollouts, held-out accuracy, checkpoints
        tok = sum(s["tokens"] for s in step_stats)  # (token mean, tokens): ranks are weighed by their tokens
        mean_of = lambda k: (sum(s[k] * s["tokens"] for s in step_stats) / max(tok, 1.0), tok)  # noqa: E731
        means = {"reward": float(rw.mean()), "accuracy": float(rewards.is_correct(rw).float().mean()),
                 "adv_abs": float(adv.abs().mean()), "adv_std": float(adv.std()) if len(adv) > 1 else 0.0,
                 "kl": mean_of("kl"), "clip_frac": mean_of("clip_frac"), "ratio": mean_of("ratio"),
                 "entropy": (ent_sum / max(tok, 1.0), tok), "truncated_share": float(truncated.float().mean()),
                 "completion_len": float(comp_mask.sum(1).float().mean()),
                 "aha_share": sum(has_aha(t) for t in texts) / len(texts),
                 "no_answer_share": rstats.pop("no_answer") / len(texts), "grad_norm": grad_norm,
                 "time_generate": t1 - t0, "time_score": t2 - t1, "time_train": t3 - t2,
                 **group_stats(rw, texts, args.group_size), **training.peak_memory(device)}
        maxes = {}
        if sampler_logp is not None:  # how far vLLM's log-probs are from the trainer's, on the sampled tokens
            gap = (old_logp - sampler_logp).abs()[comp_mask > 0]
            weights = is_weights.expand_as(comp_mask)[comp_mask > 0] if is_weights is not None else torch.ones(1)
            means |= {"vllm/logp_diff_mean": float(gap.mean()), "vllm/is_weight_mean": float(weights.mean())}
            maxes = {"vllm/logp_diff_max": float(gap.max())}
        metrics = training.reduce_metrics(means, rstats, world, device, maxes)
        metrics |= rewards.per_type_rewards(metrics)
        if use_ref and args.kl_target > 0:
            kl_coef = adaptive_kl_coef(kl_coef, metrics["kl"], args.kl_target, args.rollout_batch * args.group_size,
                                       args.kl_horizon)
        if held_out and args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == total_steps):
            score = lambda t, r: rewards.is_correct(rewards.mixed_reward(t, r, rm=rm))  # noqa: E731  (03, 06's rule)
            metrics |= heldout.held_out_accuracy(model, tokenizer, encode, held_out, score, world, rank, device,
                                                 args.eval_max_new_tokens or args.max_new_tokens)
        metrics = {"step": step + 1, "lr": lrs[0], "lr_last": lrs[-1], "kl_coef": kl_coef, **metrics}
        tracking.log(tracker, metrics)
        if master:
            tqdm.write(f"step {step + 1:4d} | reward {metrics['reward']:.3f} | acc {metrics['accuracy']:.2f} | "
                       f"kl {metrics['kl']:.4f} | len {metrics['completion_len']:.1f} | distinct/G "
                       f"{metrics['distinct_per_group']:.2f} | gen {t1 - t0:.2f}s score {t2 - t1:.2f}s "
                       f"train {t3 - t2:.2f}s")
            if (step + 1) % args.log_rollouts_every == 0 or step == 0:
                tracking.log_rollouts(tracker, step + 1, samples[:2 * args.group_size], texts, rw.tolist())
        training.checkpoint_if_due(args.out, step + 1, total_steps, args.save_every, stop_requested, model, optimizer,
                                   {"kl_coef": kl_coef, "warmup": warmup}, env, run_id)

    training.finish_training(args.out, total_steps, model, optimizer, {"kl_coef": kl_coef, "warmup": warmup}, tokenizer,
                             image_processor, env, run_id, close_group=llm is None, save_adapter=args.save_adapter)
    tracking.finish(tracker)
    if llm is not None:
        colocate.close_vllm_engine(llm)  # vLLM's teardown closes the process group too


if __name__ == "__main__":
    flags.cli(main)
