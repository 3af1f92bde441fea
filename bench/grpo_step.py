"""How long does one GRPO step of 05_grpo.py take on the tiny model, where does the time go, and how
does it compare with TRL's GRPOTrainer doing the identical work?

    python bench/grpo_step.py [--quick]          # the project venv (torch 2.13.0+cpu): no TRL column
    .venv-bench/bin/python bench/grpo_step.py [--quick]          # with the TRL column (venv below)
    python bench/grpo_step.py --real-vocab       # the real vocabulary: step time and peak memory (~5 min)

--real-vocab: at vocabulary 951 the step mostly measures Python overhead; Qwen2.5-VL's is 151,936, and there
the log-prob path dominates memory. This workload replaces the tiny model by a random Qwen2.5-VL with
the real vocabulary and toy.py's "small" body (hidden 128, 4 layers), 4 prompts x G 4 in micro-batches of 4,
at 64 / 256 / 512 new tokens (--lengths), 2 threads; one fresh process per length (and per side), its
numbers the median of steps 3..N, and its peak memory the process's largest resident size (ru_maxrss:
torch itself is ~0.4 GB of it). Sampled ids beyond the toy tokenizer's 951 decode to nothing; a random
model rarely stops, so completions run to the cap. With TRL installed, its side runs the same shapes.

Workload: the tiny random Qwen2.5-VL (toy.py), toy colour questions
on 56 px images with 05's prompt (VLAA system prompt, image, question), 1 prompt x G=8 completions per step,
16 new tokens, temperature 1.0, a reference model (KL coefficient 0.04, fixed), lr 1e-5, fp32, 1 torch
thread (--threads: on a shared 2-core machine a second thread made steps slower and erratic). Each run
is a fresh process (this script with --side) doing N steps; its number is the median of steps 3..N.
It prints:
  1. our step split into generate / score / train / other (other = prompt encoding and bookkeeping
     outside 05's three timers), from 05's metrics.jsonl and the wall time between its log lines;
  2. the share of the step spent outside model calls (generate, forwards, vision tower, backward,
     clip + optimizer step; timed by wrapping them), against the goal of under 10%;
  3. step time for G = 4, 8, 16 (16 tokens) and completion length 16, 64, 256 (G = 8), with the mean
     completion length actually sampled (a random model rarely stops early);
  4. when `import trl` works: TRL's GRPOTrainer on the same model, images, prompts, reward and shapes
     (beta=0.04, bf16=False, gradient_checkpointing=False, use_cpu=True), runs interleaved with ours,
     as the ratio ours / TRL (median of run medians) with its spread over runs (goal: under 0.8).
     Neither side skips forward + backward when every advantage is 0 (the random model's reward is
     always 0): 05 only drops uniform groups with --drop-uniform-groups, which is off here.

TRL needs torchvision, which the project's torch 2.13.0+cpu has no build for. The TRL column's
environment (bash, outside the repo; ~6 GB, ~2 min):

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -q --upgrade pip
    .venv-bench/bin/pip install -q torch==2.14.1 torchvision==0.29.1
    .venv-bench/bin/pip install -q trl accelerate datasets pillow math-verify tqdm pytest \\
        "transformers>=5.20,<5.21" -c <(printf 'torch==2.14.1\\ntorchvision==0.29.1\\n')

(or any venv with that torch + torchvision and `pip install '.[bench]'`). Both sides then run in that
venv, so the ratio compares code, not torch builds; the project venv prints the rest without TRL.
"""

import argparse
import collections
import functools
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
GOAL_OUTSIDE, GOAL_RATIO = 0.10, 0.8
KL_COEF, LR = 0.04, 1e-5


# ----------------------------------------------------------------------------------------------------
# One side, in its own process: --side ours|trl writes per-step numbers to --result


class ModelClock:
    """Seconds spent inside model calls, by kind. A call made inside another (the forwards inside
    generate) counts once, for the outer call; its time is also kept as "in <outer>: <kind>"."""

    def __init__(self):
        self.t, self.stack, self.shape = collections.Counter(), [], {}

    def wrap(self, fn, kind):
        @functools.wraps(fn)  # generate() checks its kwargs against forward's signature
        def timed(*a, **kw):
            self.stack.append(kind)
            if hasattr(kw.get("input_ids"), "shape"):  # to check both sides see the same sequence lengths
                self.shape[kind] = list(kw["input_ids"].shape)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                self.stack.pop()
                self.t[kind if not self.stack else f"in {self.stack[0]}: {kind}"] += dt
        return timed


def run_ours(args):
    import torch

    from vlaa import qwen, training

    grpo = importlib.import_module("05_grpo")
    clock, steps, roles = ModelClock(), [], ["ref", "policy"]
    load_model, log_metrics = qwen.load_model, training.log_metrics

    def timed_load(*a, **kw):  # 05 loads the policy first, then the reference
        model, tokenizer, image_processor = load_model(*a, **kw)
        role = roles.pop()
        model.generate = clock.wrap(model.generate, "generate")
        model.forward = clock.wrap(model.forward, f"{role} forward")
        model.model.visual.forward = clock.wrap(model.model.visual.forward, "vision")
        return model, tokenizer, image_processor

    def timed_log(path, rec):  # called once per step, after the optimizer step: the step boundary
        if path.endswith("metrics.jsonl"):
            steps.append({"t": time.perf_counter(), "generate": rec["time_generate"], "score": rec["time_score"],
                          "train": rec["time_train"], "len": rec["completion_len"], "model": dict(clock.t),
                          "shape": clock.shape.get("policy forward"), "peak": peak_rss_gb()})
            clock.t.clear()
        log_metrics(path, rec)

    qwen.load_model, training.log_metrics = timed_load, timed_log  # 05 loads through vlaa.training
    torch.Tensor.backward = clock.wrap(torch.Tensor.backward, "backward")
    torch.nn.utils.clip_grad_norm_ = clock.wrap(torch.nn.utils.clip_grad_norm_, "optimizer")
    torch.optim.AdamW.step = clock.wrap(torch.optim.AdamW.step, "optimizer")
    rows = args.prompts * args.G
    grpo.main(["--model", args.model, "--data", args.data, "--out", os.path.join(args.work, "out-ours"),
               "--rollout-batch", str(args.prompts), "--group-size", str(args.G), "--train-batch", str(rows),
               "--micro-batch", str(args.micro or rows), "--max-new-tokens", str(args.T), "--temperature", "1.0",
               "--kl-coef", str(KL_COEF), "--kl-target", "0", "--lr", str(LR), "--min-lr", str(LR),
               "--warmup-ratio", "0", "--max-steps", str(args.steps), "--save-every", str(10 ** 9), "--overwrite"])
    for prev, s in zip(steps, steps[1:]):
        s["wall"] = s["t"] - prev["t"]
    return steps[1:]  # step 1 has no start mark; it is warm-up anyway


def trl_workload(path):
    """05's workload for TRL's GRPOTrainer -> (dataset, reward function). The records with the messages 05
    builds (system prompt, then image + question; TRL puts the image in itself), less `open` ones (05 drops them
    too: they need a reward model), and 05's scorer as the reward: both sides do the same score work.
    Shared with bench/gpu_check.py."""
    from datasets import Dataset

    import rewards
    from vlaa import images, qwen, records

    recs = [r for r in records.load_records(path, need=("question", "answer", "verifier_type"))
            if r["verifier_type"] != "open"]
    ds = Dataset.from_list([{"prompt": [{"role": "system", "content": qwen.SYSTEM_PROMPT},
                                        {"role": "user", "content": r["question"]}],
                             "image": images.load_image(r["image"]), "sample": json.dumps(r)} for r in recs])

    def reward(completions, sample, **_):
        return rewards.score_batch([c[0]["content"] for c in completions], [json.loads(s) for s in sample])[0]

    return ds, reward


def trl_processor(model_dir):
    """The Qwen2_5_VLProcessor TRL loads for a model folder (its video processor needs torchvision)."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok, ip = AutoTokenizer.from_pretrained(model_dir), AutoImageProcessor.from_pretrained(model_dir)
    vp = Qwen2VLVideoProcessor(size=dict(ip.size), patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template)


def run_trl(args):
    from transformers import AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ds, reward = trl_workload(args.data)
    clock, marks, gen, lens, tokens, peaks = ModelClock(), [], [], [], [], []
    rows = args.prompts * args.G

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **kw):
            marks.append(time.perf_counter())
            gen.append(clock.t.pop("generate", 0.0))
            peaks.append(peak_rss_gb())

        def on_log(self, _args, _state, _control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lens.append(logs["completions/mean_length"])
                tokens.append(logs["num_tokens"])  # cumulative prompt + completion tokens

    cfg = GRPOConfig(output_dir=os.path.join(args.work, "out-trl"), use_cpu=True, max_steps=args.steps,
                     per_device_train_batch_size=rows, gradient_accumulation_steps=1, num_generations=args.G,
                     max_completion_length=args.T, beta=KL_COEF, learning_rate=LR, logging_steps=1,
                     save_strategy="no", report_to="none", seed=0, temperature=1.0, dataloader_num_workers=0,
                     disable_tqdm=True, bf16=False, gradient_checkpointing=False)
    trainer = GRPOTrainer(model=args.model, reward_funcs=reward, args=cfg, train_dataset=ds,
                          processing_class=AutoProcessor.from_pretrained(args.model), callbacks=[Clock()])
    trainer._generate_single_turn = clock.wrap(trainer._generate_single_turn, "generate")
    trainer.train()
    return [{"wall": t - prev, "generate": g, "len": n, "row": (k - k0) / rows, "peak": p}  # row: tokens per sequence
            for prev, t, g, n, k0, k, p in zip(marks, marks[1:], gen[1:], lens[1:], tokens, tokens[1:], peaks[1:])]


# ----------------------------------------------------------------------------------------------------
# The driver: build the workload once, run the sides as subprocesses, print the tables


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def peak_rss_gb():
    """This process's largest resident size so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def run_side(side, work, model, data, G, T, steps, threads, prompts=1, micro=0):
    """One run in a fresh process of this same python; its steps 3..N."""
    res = os.path.join(work, f"{side}-G{G}-T{T}-{time.monotonic_ns()}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--model", model, "--data", data,
           "--work", work, "--G", str(G), "--T", str(T), "--steps", str(steps), "--result", res,
           "--prompts", str(prompts), "--micro", str(micro)]
    cmd += ["--threads", str(threads)] if threads else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=os.path.join(work, "hf-datasets"))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{side} run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    with open(res) as f:
        return json.load(f)[1:]  # we have steps 2..N: drop step 2 too


def summary(steps):
    """One run: medians over its steps, and each part's median share of its own step (shares, unlike
    medians of seconds, stay consistent with each other when a busy machine slows some steps down)."""
    out = {k: med([s[k] for s in steps]) for k in ("wall", "generate", "score", "train", "len", "row") if k in steps[0]}
    out["peak"] = max(s.get("peak", float("nan")) for s in steps)
    out["fast"] = sorted(s["wall"] for s in steps)[len(steps) // 10]  # 10th percentile: least disturbed
    out["shape"] = steps[-1].get("shape")  # ours: [rows, prompt + completion tokens] of the policy forward
    if "model" in steps[0]:
        for s in steps:
            s["parts"] = {k: s[k] for k in ("generate", "score", "train")} | s["model"]
            s["parts"]["other"] = s["wall"] - s["generate"] - s["score"] - s["train"]
            s["parts"]["model calls"] = sum(v for k, v in s["model"].items() if not k.startswith("in "))
        kinds = sorted({k for s in steps for k in s["parts"]})
        out["share"] = {k: med([s["parts"].get(k, 0.0) / s["wall"] for s in steps]) for k in kinds}
    return out


def real_vocab_model(folder, vocab=151936):
    """toy.py's "small" model with Qwen2.5-VL's vocabulary: the toy tokenizer and image processor, a random
    model whose embedding and lm_head have `vocab` rows."""
    import glob

    from transformers import AutoConfig, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    import toy

    toy.build_model(folder, "small")
    config = AutoConfig.from_pretrained(folder)
    config.text_config.vocab_size = vocab
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_pretrained(folder)
    for f in glob.glob(os.path.join(folder, "model*.safetensors*")):
        os.remove(f)
    model.save_pretrained(folder)
    return folder


def real_vocab(args, prompts=4, G=4, micro=4, threads=2):
    """Step time and peak memory at the real vocabulary, ours (and TRL's, when installed) per length."""
    import importlib.util

    import torch

    import toy

    has_trl = not args.no_trl and importlib.util.find_spec("trl") is not None
    work = tempfile.mkdtemp(prefix="grpo-step-vocab-")
    steps = 4 if args.quick else 5
    try:
        model = real_vocab_model(os.path.join(work, "model"))
        toy.make_data(os.path.join(work, "data"), 16, test_n=0, kinds="colour", world=toy.World(size=56))
        data = os.path.join(work, "data", "train.jsonl")
        if has_trl:
            model = make_trl_model_dir(model, os.path.join(work, "model-processor"))
        print(f"GRPO step at the real vocabulary (151,936), toy.py's small body: {prompts} prompts x G {G}, "
              f"micro-batch {micro}, {threads} threads, torch {torch.__version__}; {steps} steps per run, "
              "numbers over steps 3..N; peak = the process's largest resident size")
        print(f"  {'side':5s} {'new':>5s} {'mean len':>8s} {'step s':>8s} {'generate':>8s} {'train':>8s} "
              f"{'peak GB':>8s}")
        for T in [int(x) for x in args.lengths.split(",")]:
            for side in ["ours"] + (["trl"] if has_trl else []):
                s = summary(run_side(side, work, model, data, G, T, steps, threads, prompts, micro))
                print(f"  {side:5s} {T:5d} {s['len']:8.1f} {s['wall']:8.2f} {s['generate']:8.2f} "
                      f"{s.get('train', float('nan')):8.2f} {s['peak']:8.2f}", flush=True)
        if not has_trl:
            print("  TRL: not installed here (run this script in the bench venv for its side)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def make_trl_model_dir(model, out):
    """A copy of the tiny model with a saved Qwen2_5_VLProcessor, which TRL loads (needs torchvision)."""
    shutil.copytree(model, out)
    trl_processor(out).save_pretrained(out)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: one run of each, 6 steps (4 per scaling run)")
    ap.add_argument("--steps", type=int, default=60, help="steps per run (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=5, help="interleaved runs per side (default: %(default)s)")
    ap.add_argument("--scaling-steps", type=int, default=40, help="steps per G / length run (default: %(default)s)")
    ap.add_argument("--records", type=int, default=64, help="colour questions in the data (TRL bench: 64)")
    # a second OpenMP thread buys little on ops this small, and on a shared 2-core machine it made steps
    # 5x slower and erratic (median 0.47 s vs 0.089 s with 1 thread while another job ran)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each side; 0: torch's default "
                    "(default: %(default)s)")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL even when it is installed")
    ap.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # one run, in a child process
    ap.add_argument("--real-vocab", action="store_true", help="the real vocabulary's workload (see above)")
    ap.add_argument("--lengths", default="64,256,512", help="--real-vocab: new tokens per run (default: %(default)s)")
    for a, t in (("--model", str), ("--data", str), ("--work", str), ("--result", str), ("--G", int), ("--T", int),
                 ("--prompts", int), ("--micro", int)):
        ap.add_argument(a, type=t, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        steps = (run_ours if args.side == "ours" else run_trl)(args)
        with open(args.result, "w") as f:
            json.dump(steps, f)
        return
    if args.quick:
        args.steps, args.runs, args.scaling_steps = 6, 1, 4
    if args.real_vocab:
        return real_vocab(args)

    import torch
    from safetensors.torch import load_file

    import toy

    try:
        import trl
        has_trl = not args.no_trl
        why = f"trl {trl.__version__}" if has_trl else "--no-trl"
    except ImportError as e:
        has_trl, why = False, f"not installed ({e})"
    work = tempfile.mkdtemp(prefix="grpo-step-")
    t_start = time.perf_counter()
    try:
        model = toy.build_model(os.path.join(work, "model"))
        toy.make_data(os.path.join(work, "data"), args.records, test_n=0, kinds="colour", world=toy.World(size=56))
        data = os.path.join(work, "data", "train.jsonl")
        if has_trl:  # both sides load this folder: the same weights, tokenizer and image processor
            model = make_trl_model_dir(model, os.path.join(work, "model-processor"))
        n_params = sum(v.numel() for v in load_file(os.path.join(model, "model.safetensors")).values())
        print(f"GRPO step bench: tiny Qwen2.5-VL ({n_params:,} params), {args.records} colour questions, 56 px "
              f"images, 1 prompt x G completions, temperature 1, KL {KL_COEF} (reference model on), fp32")
        print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} thread(s), {sys.executable}; "
              f"TRL: {why}; each number: median of a run's steps 3..N, then median over runs\n")

        # 1+2 and 4: ours and TRL interleaved at G=8, T=16
        base, trl_runs = [], []
        for r in range(args.runs):
            base.append(summary(run_side("ours", work, model, data, 8, 16, args.steps, args.threads)))
            if has_trl:
                trl_runs.append(summary(run_side("trl", work, model, data, 8, 16, args.steps, args.threads)))
        m = lambda key, runs=base: med([s[key] for s in runs])  # noqa: E731
        step = m("wall")
        share = lambda k: med([r["share"].get(k, 0.0) for r in base])  # noqa: E731
        print(f"1. our step, G=8, 16 new tokens ({args.runs} run(s) x {args.steps} steps; completions "
              f"{m('len'):.1f} tokens on average; policy forward on {base[-1]['shape']} tokens)")
        print(f"   step      {step:7.4f} s   (seconds below: share of the step x this median)")
        for k, note in (("generate", "rollouts + decode"), ("score", "rewards + advantages"),
                        ("train", "vision features, ref forward, policy forward + backward, optimizer"),
                        ("other", "prompt encoding, metrics and logging between steps")):
            print(f"   {k:9s} {share(k) * step:7.4f} s  {share(k):5.1%}   {note}")
        print("\n2. inside model calls (each timed once, at its outermost call; outside them: prompts, batching, "
              "log-softmax and loss arithmetic, rewards, logging)")
        for k in ("generate", "vision", "ref forward", "policy forward", "backward", "optimizer", "model calls"):
            print(f"   {k:15s} {share(k) * step:7.4f} s  {share(k):5.1%}")
        inner = share("in generate: policy forward") + share("in generate: vision")
        loop = share("generate") - inner  # generate's own Python: sampling, logits processors, cache, stop checks
        print(f"   (of generate: forwards {share('in generate: policy forward'):.1%} of the step, vision tower on "
              f"the G copies of the image {share('in generate: vision'):.1%}, transformers' sampling loop {loop:.1%})")
        outside = 1 - share("model calls")
        print(f"   outside model calls: {outside:.1%} of the step (goal < {GOAL_OUTSIDE:.0%}: "
              f"{'met' if outside < GOAL_OUTSIDE else 'NOT met'}); counting generate's sampling loop as "
              f"outside too: {outside + loop:.1%}")

        # 3: scaling with G and completion length (ours only, one run each; G=8, T=16 from above)
        print(f"\n3. step time vs G and completion length ({args.scaling_steps} steps each)")
        print(f"   {'G':>3s} {'tokens':>6s} {'mean len':>8s} {'step s':>8s} {'generate':>8s} {'train':>8s}"
              f" {'vs G=8,16':>10s}")
        for G, T in ((4, 16), (8, 16), (16, 16), (8, 64), (8, 256)):
            s = {k: m(k) for k in ("wall", "len", "generate", "train")} if (G, T) == (8, 16) else \
                summary(run_side("ours", work, model, data, G, T, args.scaling_steps, args.threads))
            print(f"   {G:3d} {T:6d} {s['len']:8.1f} {s['wall']:8.4f} {s['generate']:8.4f} {s['train']:8.4f}"
                  f" {s['wall'] / step:10.2f}")

        # 4: TRL
        print("\n4. ours vs TRL GRPOTrainer, identical workload, interleaved runs (G=8, 16 new tokens)")
        if not has_trl:
            print(f"   skipped: TRL {why}. Run this script in the bench venv (see its docstring).")
            return
        ratios = [o["wall"] / t["wall"] for o, t in zip(base, trl_runs)]
        print(f"   TRL: {m('row', trl_runs):.0f} tokens per sequence (prompt + completion), completions "
              f"{m('len', trl_runs):.1f} tokens on average; ours: {base[-1]['shape'][1]} and {m('len'):.1f}")
        print(f"   {'run':>3s} {'ours s':>8s} {'TRL s':>8s} {'ours/TRL':>8s} {'ours gen':>8s} {'TRL gen':>8s}")
        for i, (o, t) in enumerate(zip(base, trl_runs), 1):
            print(f"   {i:3d} {o['wall']:8.4f} {t['wall']:8.4f} {o['wall'] / t['wall']:8.2f} {o['generate']:8.4f}"
                  f" {t['generate']:8.4f}")
        ours, theirs = step, m("wall", trl_runs)
        ratio = ours / theirs
        print(f"   median of run medians: ours {ours:.4f} s, TRL {theirs:.4f} s; ours/TRL {ratio:.2f} "
              f"(per-run ratios {min(ratios):.2f}-{max(ratios):.2f}); goal < {GOAL_RATIO}: "
              f"{'met' if ratio < GOAL_RATIO else 'NOT met'}")
        fast = [o["fast"] / t["fast"] for o, t in zip(base, trl_runs)]
        print(f"   (the same on each run's fastest 10% of steps, which other jobs on the machine disturb least: "
              f"{m('fast') / m('fast', trl_runs):.2f}, per run {min(fast):.2f}-{max(fast):.2f})")
    finally:
        print(f"\n(total {time.perf_counter() - t_start:.0f} s)")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
