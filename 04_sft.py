"""Stage 4: supervised fine-tuning of Qwen2.5-VL on R1-style traces (the paper's SFT baseline, §3.1).

Reads the SFT set from 03_rewrite_verify.py (`OUT/sft.jsonl`: question, image, response) or the released
VLAA-Thinking-SFT-126K.json, and trains the model to write the `response` (`<think>...</think>
<answer>...</answer>`) after the VLAA system prompt, the image and the question. The loss is on the
assistant's tokens only. The paper's finding is that this SFT *hurts* later RL; this file exists so
that you can measure it (05_grpo.py starts from its output).

    # CPU, tiny model (a minute)
    python 04_sft.py --model runs/tiny --data runs/data/final/sft.jsonl --out runs/sft \
        --global-batch 32 --micro-batch 32 --lr 2e-3 --max-steps 300
    # one GPU, Qwen2.5-VL-3B on the released data (paper: global batch 128, vision frozen, ~1 epoch); on a
    # 24 GB GPU add --lora-rank 64 --lr 1e-4 (adapters only, vlaa/lora.py; OUT/model is merged)
    python 04_sft.py --model Qwen/Qwen2.5-VL-3B-Instruct --data VLAA-Thinking-SFT-126K.json \
        --image-root /data/vlaa/images --out runs/sft-3b --micro-batch 1 --activation-checkpointing
    # 8 GPUs (FSDP2 + NCCL); several nodes: add torchrun's --nnodes/--node-rank/--rdzv-endpoint
    torchrun --nproc_per_node 8 04_sft.py --model Qwen/Qwen2.5-VL-7B-Instruct --data ... --out runs/sft-7b \
        --micro-batch 2 --activation-checkpointing
    # what fits which GPU (H100 80 GB here), term by term: python bench/plan.py

Outputs in --out: run.json (what made the run), metrics.jsonl (one line per step), checkpoints/ckpt-STEP
(every ~10% of the run and on SIGTERM, resumable with --resume; docs/checkpoints.md),
model/ (a Hugging Face folder that from_pretrained and vLLM load like the checkpoint it started from; with
--lora-rank, the merged model).
"""

import argparse
import math
import os
import time

import torch
from tqdm import tqdm

import rewards
from vlaa import flags, heldout, logprobs, lora, qwen, runs, tracking, training
from vlaa.flags import nonneg_float, nonneg_int, positive_float, positive_int, probability
from vlaa.qwen import SYSTEM_PROMPT, collate, prompt_encoder, to_device
from vlaa.records import load_records

# ----------------------------------------------------------------------------------------------------
# Arguments

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", required=True, help="starting checkpoint: hub id or folder (e.g. from toy.py build-model)")
p.add_argument("--data", required=True, help="sft.jsonl from 03, or the released VLAA-Thinking-SFT-126K.json")
p.add_argument("--fmt", default="auto", choices=["auto", "ours", "vlaa"], help="record format of --data")
p.add_argument("--image-root", default=None, help="folder that image paths are relative to (default: the data file's)")
p.add_argument("--skip-bad", action="store_true", help="leave out and count bad records instead of stopping")
p.add_argument("--out", required=True, help="output folder")
p.add_argument("--no-system-prompt", action="store_true", help="train without the VLAA system prompt")
p.add_argument("--max-length", type=positive_int, default=4096,
               help="samples longer than this (tokens) are dropped and counted")
p.add_argument("--min-pixels", type=positive_int, default=None,
               help="image processor min_pixels (default: the checkpoint's)")
p.add_argument("--max-pixels", type=positive_int, default=None, help="image processor max_pixels (default: the "
               "checkpoint's, at most 256*32*32, the paper's evaluation budget; 05 uses the same)")
p.add_argument("--global-batch", type=positive_int, default=128,
               help="samples per optimizer step over all ranks (paper: 128)")
p.add_argument("--micro-batch", type=positive_int, default=4, help="samples per forward pass on one rank")
p.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the data (paper: about 1)")
p.add_argument("--max-steps", type=positive_int, default=None,
               help="stop after this many optimizer steps (overrides --epochs)")
p.add_argument("--lr", type=positive_float, default=1e-5, help="peak learning rate (not given by the paper)")
p.add_argument("--min-lr", type=nonneg_float, default=0.0, help="cosine schedule floor")
p.add_argument("--warmup-ratio", type=probability, default=0.03, help="share of steps with linear warmup")
p.add_argument("--weight-decay", type=nonneg_float, default=0.0)
p.add_argument("--grad-clip", type=positive_float, default=1.0)
p.add_argument("--train-vision", action="store_true", help="also train the vision tower (paper: frozen)")
p.add_argument("--activation-checkpointing", action="store_true", help="recompute activations to save memory")
p.add_argument("--save-every", type=positive_int, default=None,
               help="write a resumable checkpoint every N steps (default: every ~10%% of the run); always on SIGTERM")
p.add_argument("--resume", action="store_true", help="continue this run from its last checkpoint in --out")
p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds another run or this "
               "one already (its checkpoints, model and logs are deleted)")
p.add_argument("--cache-size", type=nonneg_int, default=2000,
               help="keep up to N encoded samples (image processed once) in memory; 0 = encode every time")
p.add_argument("--eval-data", default=None, help="held-out records (with answer and verifier_type): greedy "
               "accuracy per verifier type is logged to metrics.jsonl as eval/... (sharded over ranks)")
p.add_argument("--eval-every", type=nonneg_int, default=0,
               help="evaluate --eval-data every N steps and at the end (0: off)")
p.add_argument("--eval-max-new-tokens", type=positive_int, default=256, help="completion length for --eval-data")
p.add_argument("--seed", type=nonneg_int, default=0, help="order of the training samples")
tracking.add_report_to(p)
lora.add_flags(p)


# ----------------------------------------------------------------------------------------------------
# Data: drop what does not fit (never truncate through image tokens); encoding is vlaa.qwen.prompt_encoder


# ----------------------------------------------------------------------------------------------------
# Loss


def token_loss_sum(model, batch):
    """Summed cross-entropy over the assistant's tokens of a micro-batch, and their count. The head runs only
    at the positions that predict an assistant token, in chunks recomputed in backward (vlaa/logprobs.py):
    logits for every token would cost ~1.8 MB per sequence token at Qwen2.5-VL's vocabulary."""
    labels = batch["labels"][:, 1:]  # [B, L-1]: token t is predicted at position t-1
    keep = torch.nn.functional.pad(labels != -100, (0, 1))  # [B, L]: the positions that predict a label
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logp, _ = logprobs.chosen_logprobs(model, inputs, keep, labels[labels != -100])
    return -logp.sum(), keep.sum()


# ----------------------------------------------------------------------------------------------------
# Training


def score(text, record):
    """A held-out answer is right by the rule 03, 05 and 06 use (rewards.is_correct of the mixed reward)."""
    return rewards.is_correct(rewards.mixed_reward(text, record))


def train_step(model, optimizer, params, batches, grad_clip, world, device):
    """One optimizer step over this rank's micro-batches. The loss is normalised by the assistant tokens of
    the whole GLOBAL batch, so any number of ranks and micro-batches gives the same gradient.
    Returns (mean token loss over the global batch, gradient norm)."""
    n_tokens = training.global_sum(sum((b["labels"][:, 1:] != -100).sum() for b in batches).to(device), world, device)
    loss_sum = torch.zeros((), device=device)
    for i, b in enumerate(batches):
        training.gradient_sync(model, i == len(batches) - 1)
        with training.autocast(device):
            loss, _ = token_loss_sum(model, to_device(b, device))
        (loss * world / n_tokens).backward()  # FSDP2 averages gradients over ranks: hence the * world
        loss_sum += loss.detach()
    mean_loss = float(training.global_sum(loss_sum, world, device) / n_tokens)
    grad_norm = training.clip_grad_norm(params, grad_clip, mean_loss)  # NaN/Inf: the step below changes nothing
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm


def main(argv=None):
    args = flags.parse(p, argv, flags.check_sft)  # a bad flag or combination stops here, naming it
    runs.check_inputs(args, files=("data", "eval_data"), folders=("image_root",), models=("model",))
    env = training.init_distributed()
    rank, world, device, master = env["rank"], env["world"], env["device"], env["master"]
    torch.manual_seed(args.seed)
    runs.hold_run_folder(args.out, env)  # one writer per run folder: a second start stops here, naming the first
    args.max_pixels = qwen.training_max_pixels(args.model, args.max_pixels)  # the trainer's (and engine's)

    # model: fp32 master weights; bf16 compute on GPU (autocast, or FSDP2's policy when sharded)
    model, tokenizer, image_processor, params, optimizer = training.load_trainable(
        args.model, device, world, args.lr, args.weight_decay, args.train_vision, args.activation_checkpointing,
        args.min_pixels, args.max_pixels, lora=lora.settings(args))  # --lora-rank: only adapters train

    # data
    system = None if args.no_system_prompt else SYSTEM_PROMPT
    records = load_records(args.data, args.fmt, args.image_root, ("question", "response"), args.skip_bad,
                           os.path.join(args.out, "skipped.jsonl"))  # --skip-bad: every reason there
    records, n_dropped = qwen.fitting(records, tokenizer, image_processor, args.max_length, system, response=True)
    if len(records) < args.global_batch:
        raise SystemExit(f"{args.data}: only {len(records)} samples fit in --max-length {args.max_length}; "
                         f"need at least --global-batch {args.global_batch}")
    per_epoch = len(records) // args.global_batch
    total_steps = args.max_steps or max(1, math.floor(args.epochs * per_epoch))
    encode = prompt_encoder(tokenizer, image_processor, system, args.cache_size, response=True)
    warmup = training.warmup_updates(total_steps, args.warmup_ratio)
    held_out = load_records(args.eval_data, args.fmt, args.image_root, ("question", "answer", "verifier_type"),
                            args.skip_bad, os.path.join(args.out, "skipped-eval.jsonl")) if args.eval_data else []
    held_out = [r for r in held_out if r["verifier_type"] != "open"]  # open answers need a judge: not scored here
    encode_prompt = prompt_encoder(tokenizer, image_processor, system, args.cache_size)
    if master:
        print(f"{len(records)} samples, {n_dropped} dropped as longer than {args.max_length} tokens; "
              f"{total_steps} steps of {args.global_batch} on {world} rank(s)")

    state, run_id = runs.start_or_resume(args.out, runs.training_identity("04_sft", args), args.resume,
                                             args.overwrite, total_steps, env, model, optimizer)
    start, warmup = state.get("step", 0), state.get("warmup", warmup)  # an extended run does not warm up again
    tracker = tracking.start(args, "04_sft", run_id, master)
    stop_requested = training.install_sigterm_handler()  # a preempted job saves before it stops

    bar = tqdm(range(start, total_steps), disable=not master, desc="sft", initial=start, total=total_steps)
    for step in bar:
        t0 = time.perf_counter()
        lr = training.cosine_lr(step, total_steps, args.lr, warmup, args.min_lr)  # one optimizer update a step
        training.set_lr(optimizer, lr)
        # this rank's share of the global batch, in micro-batches
        mine = training.step_indices(step, len(records), args.global_batch, args.seed)[rank::world]
        batches = [collate([encode(records[i]) for i in mine[k:k + args.micro_batch]], tokenizer.pad_token_id,
                           label_examples=True) for k in range(0, len(mine), args.micro_batch)]
        loss, grad_norm = train_step(model, optimizer, params, batches, args.grad_clip, world, device)

        dt = time.perf_counter() - t0
        seq_tokens = training.global_sum(torch.tensor(sum(int(b["attention_mask"].sum()) for b in batches),
                                                      device=device), world, device)
        rec = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": float(seq_tokens) / dt, "samples_seen": (step + 1) * args.global_batch,
               "dropped_too_long": n_dropped, **training.peak_memory(device)}
        if held_out and args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == total_steps):
            rec |= heldout.held_out_accuracy(model, tokenizer, encode_prompt, held_out, score, world, rank, device,
                                             args.eval_max_new_tokens)
        tracking.log(tracker, rec)
        if master:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
        training.checkpoint_if_due(args.out, step + 1, total_steps, args.save_every, stop_requested, model, optimizer,
                                   {"samples_seen": rec["samples_seen"], "warmup": warmup}, env, run_id)

    training.finish_training(args.out, total_steps, model, optimizer,
                             {"samples_seen": total_steps * args.global_batch, "warmup": warmup}, tokenizer,
                             image_processor, env, run_id=run_id, save_adapter=args.save_adapter)
    tracking.finish(tracker)


if __name__ == "__main__":
    flags.cli(main)
