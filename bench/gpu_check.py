"""The prepared GPU check: 04_sft.py and 05_grpo.py on a random Qwen2.5-VL of the real 3B shapes, under
torchrun with an NCCL process group and FSDP2 even on one GPU, timed per step; then TRL's GRPOTrainer on the
identical GRPO workload, as a ratio; and one 05 step at the paper's lengths as the README's 1-GPU command runs
it, with and without --ref-offload, its peak next to bench/plan.py's. One call of a lent H100/H200, under 8 minutes.

    # on a lent H200, as ONE call of the device tool (what to do before it: docs/gpu_check.md)
    run(command="PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --size 3b --wheels .whl --out $OUT",
        carry=[".whl"], timeout_s=480)
    # on a CPU: the same path at the toy size (gloo, fp32), under a minute; tests/test_gpu_check.py runs it
    python bench/gpu_check.py --size toy --out runs/gpu_check

What happens, in order:
  1. --wheels DIR: `pip install --no-index --no-deps --target SITE DIR/*.whl`, then this script starts again
     with SITE first on PYTHONPATH (the lent machine has torch but an older transformers and no math-verify,
     and reaches no package index; bench/gpu_wheels.sh downloads the wheels here).
  2. The model: toy.py's tokenizer, image processor and chat template (special token ids 0..6); at --size 3b
     its weights are replaced by a random Qwen2.5-VL-3B (text: hidden 2048, 36 layers, 16 heads, 2 KV heads,
     vocab 151,936; the real 32-layer vision tower), made on the GPU in bf16 and saved as safetensors, and
     images are 448 px (256 image tokens) instead of the toy's 112 px (16).
  3. 04 under `torchrun --nproc_per_node 1` with VLAA_FORCE_FSDP=1 (a process group, NCCL on GPU, and FSDP2
     with its bf16 mixed precision even on one rank): 3 steps of 16 samples in micro-batches of 2, each
     sample about 1,024 tokens (a response of filler text cut to length).
  4. 05 the same way: `--rollout hf`, 4 prompts x G 4, 128 new tokens (a random model rarely stops early),
     KL on (--kl-coef 0.001: a reference model is loaded too), all 16 completions in one forward.
  5. 05 once more, as plain python (the README's 1-GPU command: no torchrun, no FSDP): one step of 2 prompts x
     G 4 at 1,024 new tokens, micro-batch 2, --activation-checkpointing, two updates (the second meets AdamW's
     state; old log-probs are computed); then the same with --ref-offload. Each prints its measured peak
     (torch.cuda.max_memory_allocated) next to bench/plan.py's prediction for those lengths (without vLLM).
  6. TRL's GRPOTrainer on the identical 05 workload (the same folder, images, prompts, reward function, G,
     lengths, KL coefficient, fp32 weights with bf16 autocast), as a plain single-GPU process (no FSDP), when
     `import trl` works and 1.5x the time 05 took still fits in --budget-s.
Neither 04 nor 05 writes its final checkpoint and export here (finish_training is replaced by closing the
process group): a 3B checkpoint with AdamW state is about 40 GB per run.

Printed per step: the time split, tokens/s, peak GPU memory, and the train phase's achieved TFLOP/s and MFU
against --peak-tflops (the card's dense bf16 peak; H200: 989). Language-model FLOPs are counted per row as
k * (N * n + L * d * n^2): n the row's tokens (padding not counted), N the language model's parameters (the
tied embedding once, as the output layer), L layers, d the hidden size, k = 6 for forward + backward and 2
for a forward without gradient (05's reference model); L * d * n^2 is causal self-attention's two matrix
products (half the full square). 04's forward through the frozen vision tower adds 2 FLOPs per parameter per
image patch (about 6% of the total at 448 px); in 05 the tower runs once per prompt in the generate phase,
outside the train phase. Summaries are medians over steps 2..N (step 1 warms up). All numbers also go to
OUT/gpu_check.json, rewritten after each part so that a run cut short still brings back what it measured;
each run's own output is in OUT/*.log.
"""

import argparse
import collections
import glob
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import plan  # noqa: E402  (the memory plan whose prediction is printed next to the measured peak)

# the real workload (GPU) and the same path at toy size (the CPU test)
WORKLOADS = {
    "3b": dict(seq=1024, micro=2, global_batch=16, prompts=4, G=4, new_tokens=128, image_px=448,
               # one 05 step at the paper's lengths as the README's 1-GPU command runs it (plain python)
               paper=dict(prompts=2, G=4, new_tokens=1024, train=4, micro=2)),
    "toy": dict(seq=160, micro=2, global_batch=4, prompts=2, G=2, new_tokens=16, image_px=112,
                paper=dict(prompts=2, G=2, new_tokens=24, train=2, micro=1)),
}
KL_COEF, LR, TEMPERATURE = 1e-3, 1e-6, 1.0
NEVER = str(10 ** 9)  # --save-every / --log-rollouts-every that never come
TRL_VS_OURS = 1.5  # TRL starts only if this many times 05's whole run (loading included) still fits the budget


def qwen25_vl_config(ids, size="3b"):
    """Qwen2.5-VL-3B- or -7B-Instruct's shapes (their config.json; bench/plan.py holds them), with the toy
    tokenizer's special token ids."""
    from transformers import Qwen2_5_VLConfig

    m = plan.QWEN25_VL[size]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["intermediate"],
            num_hidden_layers=m["layers"], num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"],
            hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=128000, use_sliding_window=False,
            sliding_window=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=m["tied"]),
        vision_config=dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu", patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=m["hidden"], window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=m["tied"])


def model_shape(model_dir):
    """The shapes bench/plan.py needs, from a model folder's config.json (the toy's, or the 3B made here)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    t, v = c.get("text_config", c), c["vision_config"]
    return dict(vocab=t["vocab_size"], hidden=t["hidden_size"], layers=t["num_hidden_layers"],
                heads=t["num_attention_heads"], kv_heads=t["num_key_value_heads"],
                intermediate=t["intermediate_size"], tied=c.get("tie_word_embeddings", t.get("tie_word_embeddings")),
                vision=dict(depth=v["depth"], hidden=v["hidden_size"], intermediate=v["intermediate_size"],
                            heads=v["num_heads"], patch=v["patch_size"], temporal=v["temporal_patch_size"],
                            merge=v["spatial_merge_size"]))


# ----------------------------------------------------------------------------------------------------
# Setup, in the driver process: wheels, the model, the data


def install_wheels(wheels, site):
    """Install the carried wheels into `site`, then run this script again with `site` first on PYTHONPATH."""
    found = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if not found:
        raise SystemExit(f"--wheels {wheels}: no .whl files there (bench/gpu_wheels.sh downloads them)")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", site, *found], check=True)
    print(f"installed {len(found)} wheels into {site}", flush=True)
    path = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
              dict(os.environ, PYTHONPATH=path, GPU_CHECK_SITE=site))


def build_model(folder, size, device, image_px):
    """toy.py's tokenizer, image processor and chat template; at 3b, random 3B weights made on `device` in
    bf16 (seconds on a GPU) replace its tiny model. Returns the parameter counts."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    import toy

    toy.build_model(folder, "tiny")
    save_s = 0.0
    if size == "3b":
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in toy.SPECIAL_TOKENS}
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(qwen25_vl_config(ids), dtype=torch.bfloat16)
        model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
        for f in glob.glob(os.path.join(folder, "model*.safetensors*")):
            os.remove(f)
        t0 = time.perf_counter()
        model.save_pretrained(folder)
        save_s = time.perf_counter() - t0
        # larger images than the toy's, so that the 32-block vision tower has real work: 448 px, 256 tokens
        Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=image_px * image_px, patch_size=14,
                                 merge_size=2, temporal_patch_size=2).save_pretrained(folder)
    else:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"params": total, "text_params": total - vision, "vision_params": vision, "save_s": save_s}


def sft_response(tokenizer, image_processor, record, image, seq, filler_ids):
    """A response (think + answer) of filler text, cut so that the whole sample is `seq` tokens or a few
    fewer -> (response, sample tokens)."""
    from vlaa.qwen import prompt_length

    def sample(k):
        text = f"<think> {tokenizer.decode(filler_ids[:k])} </think> <answer>{record['answer']}</answer>"
        return text, prompt_length(tokenizer, image_processor, record["question"], image, text)

    k = seq - sample(0)[1]
    if k < 0:
        raise SystemExit(f"the prompt of {record['id']} alone is longer than {seq} tokens")
    text, n = sample(k)
    while n > seq and k > 0:  # decoding a cut and encoding it again can merge differently: step back
        k = max(0, k - (n - seq))
        text, n = sample(k)
    return text, n


def make_data(folder, model_dir, w, steps):
    """folder/train.jsonl: toy questions of every verifier type (05's prompts); folder/sft.jsonl: the same
    records with a response that makes each sample about w["seq"] tokens (04's data). -> (min, max) length."""
    from transformers import AutoImageProcessor, AutoTokenizer

    import toy

    n = max(w["global_batch"], w["prompts"]) * steps
    toy.make_data(folder, n, test_n=0, world=toy.World(size=w["image_px"]))
    tokenizer, image_processor = AutoTokenizer.from_pretrained(model_dir), AutoImageProcessor.from_pretrained(model_dir)
    filler = " ".join(toy.world_corpus(n=20))
    while len(filler_ids := tokenizer(filler)["input_ids"]) < w["seq"]:
        filler += " " + filler
    with open(os.path.join(folder, "train.jsonl")) as f:
        records = [json.loads(line) for line in f]
    lengths = []
    with open(os.path.join(folder, "sft.jsonl"), "w") as f:
        for r in records:
            r["response"], k = sft_response(tokenizer, image_processor, r, os.path.join(folder, r["image"]), w["seq"],
                                            filler_ids)
            lengths.append(k)
            f.write(json.dumps(r) + "\n")
    return min(lengths), max(lengths)


# ----------------------------------------------------------------------------------------------------
# Inside torchrun: 04 or 05 in this process, each step's model work timed and counted


def flop_shape(model):
    """What the FLOP count needs: (N, L, d) of the language model (parameters, a tied weight once; layers;
    hidden size) and the vision tower's parameters (blocks, merger). Under FSDP2 the parameters are
    DTensors, whose numel() is the full tensor's."""
    visual = model.model.visual
    n_text = sum(p.numel() for name, p in model.named_parameters() if "visual." not in name)
    n_merger = sum(p.numel() for p in visual.merger.parameters())
    cfg = model.config.text_config
    return n_text, cfg.num_hidden_layers, cfg.hidden_size, sum(p.numel() for p in visual.parameters()) - n_merger, \
        n_merger


def row_flops(lengths, k, shape):
    """Language-model FLOPs: k * (N * n + L * d * n^2) summed over rows of n tokens (lengths: [rows])."""
    N, L, d = shape[:3]
    n = lengths.double()
    return float(k * (N * n.sum() + L * d * (n * n).sum()))


def vision_flops(patches, shape):
    """The frozen vision tower's forward: 2 FLOPs per parameter per patch; the merger's per merged token
    (4 patches). Its attention is left out (about 1% of it at 448 px)."""
    n_blocks, n_merger = shape[3:]
    return 2.0 * (n_blocks * patches + n_merger * patches / 4)


def run_stage(stage, argv, result):
    """Run 04 (stage "sft") or 05 ("grpo") in this process with hooks on its functions; rank 0 writes one
    dict per step to `result`. The stages call these functions by module attribute, so replacing the
    attributes is enough: 04 and 05 themselves are unchanged."""
    import torch

    from vlaa import training

    mod = importlib.import_module("04_sft" if stage == "sft" else "05_grpo")
    steps, cur, shape = [], {}, []
    original = {"step_indices": training.step_indices, "log_metrics": training.log_metrics}

    def step_indices(*a, **kw):  # the first thing each step of both loops does: the step starts here
        cur.clear()
        cur.update(t0=time.perf_counter(), flops=0.0, tokens=0, parts=collections.Counter())
        return original["step_indices"](*a, **kw)

    def timed(fn, part):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:  # each wrapped function ends on a host copy (float(), .cpu()): the GPU work is done
                cur["parts"][part] += time.perf_counter() - t
        return wrapper

    def count(model, lengths, k, patches=0):
        shape[:] = shape or flop_shape(model)
        cur["flops"] += row_flops(lengths, k, shape) + vision_flops(patches, shape)
        if k == 6:
            cur["tokens"] += int(lengths.sum())

    def log_metrics(path, rec):  # once per step, after its optimizer step: the step ends here
        if path.endswith("metrics.jsonl"):
            steps.append({"step": rec["step"], "wall": time.perf_counter() - cur["t0"], "flops": cur["flops"],
                          "train_tokens": cur["tokens"], "seq": cur.get("seq"), **cur["parts"],
                          **{k: rec[k] for k in ("loss", "completion_len", "time_generate", "time_score",
                                                 "time_train", "peak_memory_gb") if k in rec}})
            if "peak_memory_gb" not in rec:  # CPU: this process's largest resident size so far
                steps[-1]["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        original["log_metrics"](path, rec)

    def close(*a, **kw):  # instead of finish_training: no 40 GB checkpoint, no export
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    if stage == "sft":
        train_step = timed(mod.train_step, "train")

        def counted_train_step(model, optimizer, params, batches, *a, **kw):
            patches = sum(int(b["image_grid_thw"].prod(-1).sum()) for b in batches if "image_grid_thw" in b)
            count(model, torch.cat([b["attention_mask"].sum(1) for b in batches]), 6, patches)
            return train_step(model, optimizer, params, batches, *a, **kw)

        mod.train_step = counted_train_step
    else:
        token_logprobs = mod.token_logprobs

        def counted_token_logprobs(model, batch, *a, **kw):
            count(model, batch["attention_mask"].sum(1), 6 if torch.is_grad_enabled() else 2)
            cur["seq"] = max(cur.get("seq", 0), batch["input_ids"].shape[1])  # the longest row: the plan's length
            return token_logprobs(model, batch, *a, **kw)

        mod.token_logprobs = counted_token_logprobs
        mod.frozen_logprobs = timed(mod.frozen_logprobs, "ref")  # the reference (and old log-probs, if any)
        mod.update_policy = timed(mod.update_policy, "update")
    training.step_indices, training.log_metrics, training.finish_training = step_indices, log_metrics, close
    mod.main(argv)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(result, "w") as f:
            json.dump(steps, f)


def run_trl(model_dir, data, w, steps, work, result):
    """TRL's GRPOTrainer on 05's workload (bench/grpo_step.py's setup at this size): one dict per step."""
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bench.grpo_step import trl_processor, trl_workload

    rows = w["prompts"] * w["G"]
    ds, reward = trl_workload(data)
    processor = trl_processor(model_dir)
    cuda, out, cur = torch.cuda.is_available(), [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            cur.update(t0=time.perf_counter(), generate=0.0)

        def on_step_end(self, *a, **kw):
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
            out.append({"step": len(out) + 1, "wall": time.perf_counter() - cur["t0"], "generate": cur["generate"],
                        "peak_memory_gb": peak})
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_log(self, _args, _state, _control, logs=None, **kw):  # after on_step_end
            if logs and "completions/mean_length" in logs and out:
                out[-1]["completion_len"] = logs["completions/mean_length"]

    cfg = GRPOConfig(output_dir=os.path.join(work, "trl"), use_cpu=not cuda, bf16=cuda, max_steps=steps,
                     per_device_train_batch_size=rows, gradient_accumulation_steps=1, num_generations=w["G"],
                     max_completion_length=w["new_tokens"], beta=KL_COEF, learning_rate=LR, temperature=TEMPERATURE,
                     loss_type="grpo", logging_steps=1, save_strategy="no", report_to="none", seed=0,
                     dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=cfg, train_dataset=ds,
                          processing_class=processor, callbacks=[Clock()])
    if hasattr(trainer, "_generate_single_turn"):  # TRL's generation, to split its step like ours
        generate = trainer._generate_single_turn

        def timed_generate(*a, **kw):
            t = time.perf_counter()
            try:
                return generate(*a, **kw)
            finally:
                cur["generate"] += time.perf_counter() - t

        trainer._generate_single_turn = timed_generate
    trainer.train()
    with open(result, "w") as f:
        json.dump(out, f)


# ----------------------------------------------------------------------------------------------------
# The driver: set up, run each part in its own process, print the tables


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def later(steps):
    """Steps 2..N (step 1 warms up); all of them when there is only one."""
    return steps[1:] or steps


def launch(worker, worker_args, args, env, torchrun=True):
    """One part in a fresh process (04 and 05 under torchrun) -> (its steps, or None if it failed; seconds)."""
    result, log = os.path.join(args.work, f"{worker}.json"), os.path.join(args.out, f"{worker}.log")
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] \
        if torchrun else [sys.executable]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(head + [os.path.abspath(__file__), "--worker", worker, result, *worker_args], cwd=ROOT,
                           env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if p.returncode or not os.path.exists(result):
        with open(log) as f:
            tail = f.read()[-3000:]
        print(f"\n{worker} FAILED (exit {p.returncode}) after {seconds:.0f} s; the end of {log}:\n{tail}", flush=True)
        return None, seconds
    with open(result) as f:
        return json.load(f), seconds


def add_rates(steps, peak_tflops):
    """Achieved TFLOP/s and MFU of each step's train phase (04: train_step; 05: time_train)."""
    for s in steps:
        train = s.get("time_train", s.get("train"))
        s["train_s"] = train
        s["tflops"] = s["flops"] / train / 1e12 if train else float("nan")
        s["mfu"] = s["tflops"] / peak_tflops
        s["train_tok_s"] = s["train_tokens"] / train if train else float("nan")
    return steps


def print_table(title, steps, cols):
    """cols: (header, key or function of a step, format); a missing value prints as '-'."""
    widths = [max(len(h), len(format(0.0, f)) if f else 4) for h, _, f in cols]
    print(f"\n{title}")
    print("  " + " ".join(f"{h:>{n}s}" for (h, _, _), n in zip(cols, widths)))
    for s in steps:
        cells = [key(s) if callable(key) else s.get(key) for _, key, _ in cols]
        print("  " + " ".join(f"{format(v, f) if v is not None else '-':>{n}s}"
                              for v, (_, _, f), n in zip(cells, cols, widths)))


def show(title, steps, cols):
    """A per-step table, with the median of steps 2..N as its last row."""
    summary = {k: med([s.get(k) for s in later(steps)]) for k in {k for s in steps for k in s}
               if all(isinstance(s.get(k, 0), (int, float)) for s in steps)}
    print_table(title, steps + [dict(summary, step="med")], cols)
    sys.stdout.flush()
    return summary


def report(args, data):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(data, f, indent=1, default=float)


def sft_columns():
    return [("step", "step", ""), ("step_s", "wall", "8.3f"), ("train_s", "train_s", "8.3f"),
            ("tok/s", lambda s: s["train_tokens"] / s["wall"], "8.0f"), ("TFLOP/s", "tflops", "8.3g"),
            ("MFU", "mfu", "7.1%"), ("peak_GB", "peak_memory_gb", "7.1f"), ("loss", "loss", "8.3f")]


def grpo_columns():
    return [("step", "step", ""), ("step_s", "wall", "7.2f"), ("gen_s", "time_generate", "6.2f"),
            ("score_s", "time_score", "7.2f"), ("train_s", "train_s", "7.2f"), ("ref_s", "ref", "6.2f"),
            ("update_s", "update", "8.2f"), ("len", "completion_len", "6.1f"),
            ("gen_tok/s", "gen_tok_s", "9.0f"), ("train_tok/s", "train_tok_s", "11.0f"),
            ("TFLOP/s", "tflops", "7.3g"), ("MFU", "mfu", "6.1%"), ("peak_GB", "peak_memory_gb", "7.1f")]


def trl_columns():
    return [("step", "step", ""), ("step_s", "wall", "7.2f"), ("gen_s", "generate", "6.2f"),
            ("len", "completion_len", "6.1f"), ("peak_GB", "peak_memory_gb", "7.1f")]


def paper_step(name, extra, model_dir, data, p, args, device, gpu):
    """One 05 step at the paper's completion length with the README's 1-GPU micro-batch and activation
    checkpointing (`--rollout hf`: no vLLM here), as plain python like the README's command; two updates, so
    that the second meets AdamW's state and the old log-probs' pass -> its numbers and the plan's peak."""
    rows = p["prompts"] * p["G"]
    env = {k: v for k, v in os.environ.items() if k != "VLAA_FORCE_FSDP"}
    steps, seconds = launch(name, [
        "--model", model_dir, "--data", data, "--out", os.path.join(args.work, f"out-{name}"), "--rollout", "hf",
        "--rollout-batch", str(p["prompts"]), "--group-size", str(p["G"]), "--train-batch", str(p["train"]),
        "--micro-batch", str(p["micro"]), "--max-new-tokens", str(p["new_tokens"]), "--activation-checkpointing",
        "--temperature", str(TEMPERATURE), "--kl-coef", str(KL_COEF), "--lr", str(LR), "--min-lr", str(LR),
        "--warmup-ratio", "0", "--max-steps", "1", "--save-every", NEVER, "--log-rollouts-every", NEVER, *extra],
        args, env, torchrun=False)
    out = {"seconds": seconds, "workload": p, "flags": extra}
    if not steps:
        return out
    s = steps[-1]
    predicted = plan.plan("grpo", model_shape(model_dir), 1, p["micro"], True, "--ref-offload" in extra,
                          card="H200" if "H200" in gpu else "H100", seq=s["seq"], new_tokens=p["new_tokens"],
                          vllm=False)
    out |= {"steps": steps, "plan_peak_gb": predicted["peak"], "plan": {k: v for k, v in predicted.items()
                                                                         if isinstance(v, float)}}
    measured = s["peak_memory_gb"]
    kind = "GiB, torch.cuda.max_memory_allocated" if device.type == "cuda" else "GiB of resident memory (CPU: " \
        "not comparable)"
    print(f"\n05 at the paper's lengths, {' '.join(extra) or 'reference on the GPU'}: {rows} completions of "
          f"{s['completion_len']:.0f} tokens (rows of {s['seq']}), micro-batch {p['micro']}, activation "
          f"checkpointing, 2 updates: step {s['wall']:.1f} s ({seconds:.0f} s with loading); peak {measured:.1f} "
          f"{kind}; plan {predicted['peak']:.1f} GiB (estimated; ratio {measured / predicted['peak']:.2f})",
          flush=True)
    return out


def trl_available(args):
    if args.no_trl:
        return False, "--no-trl"
    try:
        import trl  # noqa: F401
    except Exception as e:  # ImportError, or a dependency that is there but too old
        return False, f"`import trl` failed: {type(e).__name__}: {e}"
    return True, f"trl {trl.__version__}"


def worker(name, result, *rest):
    """A part in a child process: `--worker sft|grpo RESULT STAGE-ARGS...` or `--worker trl RESULT SPEC-JSON`."""
    if name == "sft" or name.startswith("grpo"):  # grpo, grpo-paper, grpo-offload
        return run_stage("sft" if name == "sft" else "grpo", list(rest), result)
    spec = json.loads(rest[0])
    return run_trl(spec["model"], spec["data"], spec["workload"], spec["steps"], spec["work"], result)


def main():
    if sys.argv[1:2] == ["--worker"]:
        return worker(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--size", choices=sorted(WORKLOADS), default="3b", help="3b on a GPU; toy for a CPU test")
    ap.add_argument("--wheels", default=None, help="install these .whl files first (the lent machine; see above)")
    ap.add_argument("--site", default=os.path.join(tempfile.gettempdir(), "vlaa-gpu-site"),
                    help="where --wheels go (default: %(default)s)")
    ap.add_argument("--out", default="runs/gpu_check", help="gpu_check.json and the logs (default: %(default)s)")
    ap.add_argument("--work", default=None, help="model and data folder (default: a temporary one, deleted)")
    ap.add_argument("--steps", type=int, default=3, help="steps of 04 and of 05 (default: %(default)s)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the card's dense bf16 peak, the MFU's denominator (H200: %(default)s)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="TRL runs only if it would end (at 1.5x the "
                    "time 05 took) within this many seconds of the start (default: %(default)s; the call's "
                    "timeout is 480)")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL even when it is installed")
    args = ap.parse_args()
    w = WORKLOADS[args.size]
    t_start = float(os.environ.setdefault("GPU_CHECK_T0", str(time.time())))
    if args.wheels and not os.environ.get("GPU_CHECK_SITE"):
        install_wheels(args.wheels, args.site)  # does not return: the script starts again

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # this output is read in a short tail: tables only

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none (CPU: gloo, fp32)"
    has_trl, why = trl_available(args)
    print(f"GPU check, size {args.size}: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"GPU {gpu}, {why}", flush=True)
    if not transformers.__version__.startswith("5.20."):
        print(f"warning: 05 needs transformers 5.20.x (mm_encoder_outputs); this is {transformers.__version__}")
    own_work = args.work is None
    args.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    data = {"size": args.size, "workload": w, "device": gpu, "torch": torch.__version__,
            "transformers": transformers.__version__, "peak_tflops": args.peak_tflops}
    failed = []
    try:
        t0 = time.perf_counter()
        model_dir = os.path.join(args.work, "model")
        data["model"] = build_model(model_dir, args.size, device, w["image_px"])
        data["build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lo, hi = make_data(os.path.join(args.work, "data"), model_dir, w, args.steps)
        data["data_s"], data["sft_tokens_per_sample"] = time.perf_counter() - t0, [lo, hi]
        m = data["model"]
        print(f"model: {m['params'] / 1e6:,.1f} M parameters ({m['text_params'] / 1e6:,.1f} M language model, "
              f"{m['vision_params'] / 1e6:,.1f} M vision, frozen); built in {data['build_s']:.0f} s (saving "
              f"{m['save_s']:.0f} s); data in "
              f"{data['data_s']:.0f} s, SFT samples {lo}-{hi} tokens", flush=True)
        report(args, data)

        # 04 and 05, each under torchrun with a process group and FSDP2 on its one rank
        env = dict(os.environ, VLAA_FORCE_FSDP="1")
        rl, sft = os.path.join(args.work, "data", "train.jsonl"), os.path.join(args.work, "data", "sft.jsonl")
        rows = w["prompts"] * w["G"]
        steps, data["sft_s"] = launch("sft", [
            "--model", model_dir, "--data", sft, "--out", os.path.join(args.work, "out-sft"),
            "--global-batch", str(w["global_batch"]), "--micro-batch", str(w["micro"]), "--max-steps", str(args.steps),
            "--max-length", str(w["seq"]), "--lr", str(LR), "--warmup-ratio", "0", "--save-every", NEVER], args, env)
        if steps:
            data["sft"] = add_rates(steps, args.peak_tflops)
            data["sft_summary"] = show(
                f"04 SFT: {args.steps} steps of {w['global_batch']} samples of {lo}-{hi} tokens in micro-batches of "
                f"{w['micro']} ({data['sft_s']:.0f} s with start-up and loading)", steps, sft_columns())
        else:
            failed.append("sft")
        report(args, data)

        steps, data["grpo_s"] = launch("grpo", [
            "--model", model_dir, "--data", rl, "--out", os.path.join(args.work, "out-grpo"), "--rollout", "hf",
            "--rollout-batch", str(w["prompts"]), "--group-size", str(w["G"]), "--train-batch", str(rows),
            "--micro-batch", str(rows), "--max-new-tokens", str(w["new_tokens"]), "--temperature", str(TEMPERATURE),
            "--kl-coef", str(KL_COEF), "--lr", str(LR), "--min-lr", str(LR), "--warmup-ratio", "0",
            "--max-steps", str(args.steps), "--save-every", NEVER, "--log-rollouts-every", NEVER], args, env)
        if steps:
            for s in steps:
                s["gen_tok_s"] = rows * s["completion_len"] / s["time_generate"]
            data["grpo"] = add_rates(steps, args.peak_tflops)
            data["grpo_summary"] = show(
                f"05 GRPO (--rollout hf): {args.steps} steps of {w['prompts']} prompts x G {w['G']}, "
                f"{w['new_tokens']} new tokens, KL {KL_COEF} ({data['grpo_s']:.0f} s with start-up and loading; "
                "ref_s and update_s are inside train_s)", steps, grpo_columns())
        else:
            failed.append("grpo")
        report(args, data)

        # one 05 step at the paper's lengths as the README's 1-GPU command runs it (plain python, no FSDP),
        # then with --ref-offload: the out-of-memory check, measured peak next to bench/plan.py's prediction
        for name, extra in (("grpo-paper", []), ("grpo-offload", ["--ref-offload"])):
            data[name] = paper_step(name, extra, model_dir, rl, w["paper"], args, device, gpu)
            failed += [] if data[name].get("steps") else [name]
            report(args, data)

        # TRL on the same GRPO workload, when installed and there is time for it
        elapsed = time.time() - t_start
        if has_trl and elapsed + TRL_VS_OURS * data["grpo_s"] > args.budget_s:
            has_trl, why = False, (f"skipped: {elapsed:.0f} s gone and 05 took {data['grpo_s']:.0f} s; TRL, allowed "
                                   f"{TRL_VS_OURS}x that, would end past --budget-s {args.budget_s:.0f}")
        if has_trl:
            trl_env = {k: v for k, v in os.environ.items() if k != "VLAA_FORCE_FSDP"}
            spec = {"model": model_dir, "data": rl, "workload": w, "steps": args.steps, "work": args.work}
            steps, data["trl_s"] = launch("trl", [json.dumps(spec)], args, trl_env, torchrun=False)
            if steps:
                data["trl"] = steps
                data["trl_summary"] = show(f"TRL GRPOTrainer, the same workload, one process without FSDP "
                                           f"({data['trl_s']:.0f} s with start-up and loading)", steps, trl_columns())
                if data.get("grpo"):
                    data["ours_over_trl"] = data["grpo_summary"]["wall"] / data["trl_summary"]["wall"]
            else:
                failed.append("trl")
        else:
            data["trl_skipped"] = why
        report(args, data)
    finally:
        data["total_s"] = time.time() - t_start
        report(args, data)
        if own_work:
            shutil.rmtree(args.work, ignore_errors=True)

    print("\nsummary (medians of steps 2..N)")
    if data.get("sft_summary"):
        s = data["sft_summary"]
        print(f"  04 SFT   step {s['wall']:.3f} s, {s['train_tokens'] / s['wall']:,.0f} tokens/s, train phase "
              f"{s['tflops']:.3g} TFLOP/s = MFU {s['mfu']:.1%} of {args.peak_tflops:.0f}, peak "
              f"{s['peak_memory_gb']:.1f} GB")
    if data.get("grpo_summary"):
        s = data["grpo_summary"]
        print(f"  05 GRPO  step {s['wall']:.2f} s (generate {s['time_generate']:.2f}, score {s['time_score']:.2f}, "
              f"train {s['train_s']:.2f}), generation {s['gen_tok_s']:,.0f} tokens/s, train phase {s['tflops']:.3g} "
              f"TFLOP/s = MFU {s['mfu']:.1%}, peak {s['peak_memory_gb']:.1f} GB")
    if "ours_over_trl" in data:
        print(f"  ours / TRL GRPO step time: {data['ours_over_trl']:.2f} (ours {data['grpo_summary']['wall']:.2f} s, "
              f"TRL {data['trl_summary']['wall']:.2f} s)")
    else:
        print(f"  TRL: {data.get('trl_skipped', 'failed')}")
    print(f"  total {data['total_s']:.0f} s; numbers in {os.path.join(args.out, 'gpu_check.json')}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
