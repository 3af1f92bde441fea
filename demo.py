"""`make demo`: the whole recipe on a CPU in minutes, and the paper's SFT-vs-RL question in miniature.

Every stage does its real work on the toy world (toy.py) with a tiny random Qwen2.5-VL:

    build the tiny model and toy data -> 01 caption -> 02 distill (toy R1: some wrong, some hesitant
    traces) -> 03 rewrite, verify, split into sft.jsonl (no aha) and rl.jsonl (aha)
    -> a short warm-up -> five arms, each scored on the toy test set by 06_eval.py:
       warm-up only | SFT | GRPO | SFT then GRPO | SFT on hesitant traces then GRPO

The warm-up exists because a random model never writes an <answer> block, so every reward is 0 and
GRPO has nothing to learn from: it is SFT on the right *format* with a random answer of the right kind
(the "format-only start" of docs/toy.md), so it teaches nothing about the images.
Settings are fixed in the constants below, chosen from the CPU studies in docs/toy.md, never
tuned toward the paper's conclusion: whatever the table says is the result.

    python demo.py [--out runs/demo] [--quick]      # --quick: a reduced size, for the test suite

Writes OUT/results.md (the table), OUT/results.json and OUT/reward_curves.png.
"""

import argparse
import importlib
import json
import os
import random
import time

import toy
from vlaa import jsonl

caption, distill, verify, sft, grpo, evaluate = (importlib.import_module(m) for m in (
    "01_caption", "02_distill", "03_rewrite_verify", "04_sft", "05_grpo", "06_eval"))

FULL = dict(n=2000, test_n=200, warmup_steps=100, sft_steps=300, grpo_steps=150, prompts=8, new_tokens=64)
QUICK = dict(n=200, test_n=16, warmup_steps=4, sft_steps=4, grpo_steps=2, prompts=2, new_tokens=8)
TEACHER = "reasoner:error_rate=0.1,hesitation_rate=0.3"  # some wrong, some hesitant traces
SFT_ARGS = ["--global-batch", "32", "--micro-batch", "32", "--lr", "2e-3", "--min-lr", "2e-3", "--warmup-ratio", "0",
            "--save-every", "100000"]  # the toy-learnability SFT recipe: batch 32, constant lr 2e-3
# docs/toy.md: B 8 prompts x G 8, T 1.0, lr 3e-4 (stable in 3 of 3 seeds; 1e-3 learned faster but
# crashed one seed of three), 150 steps; no KL, which cost 33-40% more time per step and changed nothing there.
GRPO_ARGS = ["--group-size", "8", "--micro-batch", "64", "--temperature", "1.0", "--lr", "3e-4", "--min-lr", "3e-4",
             "--warmup-ratio", "0", "--kl-coef", "0", "--save-every", "100000"]


def stage(title):
    print(f"\n=== {title} ===", flush=True)


def warmup_data(train_path, out_path, seed=0):
    """Each training question with `<think> </think> <answer>X</answer>`, X a random answer of the
    same task: the format, and nothing about the image."""
    records = [r for _, r in jsonl.read_jsonl(train_path)]
    pool = {}
    for r in records:
        pool.setdefault(r.get("task", r["verifier_type"]), []).append(r["answer"])
    rng = random.Random(seed)
    with open(out_path, "w") as f:
        for r in records:
            r["image"] = os.path.join(os.path.dirname(os.path.abspath(train_path)), r["image"])
            r["response"] = f"<think> </think> <answer>{rng.choice(pool[r.get('task', r['verifier_type'])])}</answer>"
            f.write(json.dumps(r) + "\n")
    return out_path


def run_sft(start, data, out, steps):
    sft.main(["--model", start, "--data", data, "--out", out, "--max-steps", str(steps), *SFT_ARGS])
    return os.path.join(out, "model")


def run_grpo(start, data, out, cfg):
    grpo.main(["--model", start, "--data", data, "--out", out, "--max-steps", str(cfg["grpo_steps"]), *GRPO_ARGS,
               "--rollout-batch", str(cfg["prompts"]), "--train-batch", str(8 * cfg["prompts"]),
               "--max-new-tokens", str(cfg["new_tokens"])])
    return os.path.join(out, "model")


def run_eval(model, data_dir, out, new_tokens):
    evaluate.main(["--model", model, "--bench", "toy", "--data-dir", data_dir, "--out", out, "--backend", "hf",
                   "--max-new-tokens", str(new_tokens), "--device", "cpu"])
    with open(os.path.join(out, "scores.json")) as f:
        return json.load(f)["benchmarks"]["toy"]


def grpo_summary(out):
    """First and last reward windows, and distinct completions per group at the end (collapse shows as 1)."""
    m = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    w = max(1, len(m) // 5)
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {"reward_first": mean(m[:w], "reward"), "reward_last": mean(m[-w:], "reward"),
            "distinct_last": mean(m[-w:], "distinct_per_group"), "rewards": [r["reward"] for r in m]}


def table(results):
    types = ("digit", "mcq", "math", "iou")
    head = ["arm", "accuracy", *types, "mean words", "aha %", "no answer %", "GRPO reward first -> last",
            "distinct/G at end"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, r in results.items():
        s, g = r["scores"], r.get("grpo")
        m = s["metrics"]
        lines.append("| " + " | ".join([
            arm, f"{m['accuracy']:.2f}", *(f"{m.get('verifier_type/' + t, float('nan')):.2f}" for t in types),
            f"{s['trace']['mean_words']:.1f}", f"{100 * s['trace']['aha']:.0f}", f"{100 * s['trace']['no_answer']:.0f}",
            f"{g['reward_first']:.2f} -> {g['reward_last']:.2f}" if g else "-",
            f"{g['distinct_last']:.2f}" if g else "-"]) + " |")
    return "\n".join(lines)


def plot_rewards(curves, path, size=(640, 360)):
    """Reward curves (10-step moving average) as a PNG, drawn with PIL: no plotting dependency."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, top, right, bottom = 50, 20, size[0] - 150, size[1] - 40
    d.rectangle([left, top, right, bottom], outline="black")
    for y in (0.0, 0.5, 1.0):
        py = bottom - y * (bottom - top)
        d.text((left - 30, py - 6), f"{y:.1f}", fill="black")
    n = max(len(c) for c in curves.values())
    d.text(((left + right) // 2 - 40, bottom + 12), f"GRPO step (1..{n})", fill="black")
    d.text((left, 4), "mean training reward (10-step moving average)", fill="black")
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    for i, (name, c) in enumerate(curves.items()):
        smooth = [sum(c[max(0, j - 9):j + 1]) / len(c[max(0, j - 9):j + 1]) for j in range(len(c))]
        pts = [(left + j * (right - left) / max(1, n - 1), bottom - v * (bottom - top)) for j, v in enumerate(smooth)]
        if len(pts) > 1:
            d.line(pts, fill=colours[i % 4], width=2)
        d.text((right + 10, top + 20 * i), name, fill=colours[i % 4])
    img.save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    ap.add_argument("--quick", action="store_true", help="a reduced size (seconds, not minutes): for tests")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    out = args.out
    t0 = time.time()
    os.makedirs(out, exist_ok=True)

    stage("1. a tiny random Qwen2.5-VL and the toy world")
    model = toy.build_model(os.path.join(out, "tiny"), "tiny")
    data = os.path.join(out, "data")
    toy.make_data(data, n=cfg["n"], test_n=cfg["test_n"], seed=0)

    stage("2. the data recipe: 01 caption -> 02 distill -> 03 rewrite, verify, split")
    caption.main(["--in", f"{data}/train.jsonl", "--out", f"{data}/captioned.jsonl", "--backend", "toy",
                  "--model", "captioner"])
    distill.main(["--in", f"{data}/captioned.jsonl", "--out", f"{data}/distilled.jsonl", "--backend", "toy",
                  "--model", TEACHER])
    verify.main(["--in", f"{data}/distilled.jsonl", "--out", f"{data}/final", "--backend", "toy",
                 "--rewriter-model", "rewriter", "--judge-model", "judge"])
    sft_set, rl_set = f"{data}/final/sft.jsonl", f"{data}/final/rl.jsonl"

    stage("3. warm-up: the output format only (a random model never answers, so RL could not start)")
    warm = run_sft(model, warmup_data(f"{data}/train.jsonl", f"{data}/warmup.jsonl"), f"{out}/warmup",
                   cfg["warmup_steps"])

    stage("4. the arms")
    arms = {}
    arms["warm-up only"] = {"model": warm}
    arms["SFT"] = {"model": run_sft(warm, sft_set, f"{out}/sft", cfg["sft_steps"])}
    arms["GRPO"] = {"model": run_grpo(warm, rl_set, f"{out}/grpo", cfg), "grpo": f"{out}/grpo"}
    arms["SFT -> GRPO"] = {"model": run_grpo(arms["SFT"]["model"], rl_set, f"{out}/sft_grpo", cfg),
                           "grpo": f"{out}/sft_grpo"}
    hesitant = run_sft(warm, rl_set, f"{out}/sft_hesitant", cfg["sft_steps"])  # the aha traces as SFT data
    arms["SFT on hesitant -> GRPO"] = {"model": run_grpo(hesitant, rl_set, f"{out}/hesitant_grpo", cfg),
                                       "grpo": f"{out}/hesitant_grpo"}

    stage("5. evaluation on the toy test set (06_eval.py)")
    results = {}
    for name, arm in arms.items():
        slug = name.lower().replace(" ", "_").replace("->", "then").replace("-", "_")
        results[name] = {"scores": run_eval(arm["model"], data, f"{out}/eval/{slug}", cfg["new_tokens"])}
        if "grpo" in arm:
            results[name]["grpo"] = grpo_summary(arm["grpo"])

    md = table(results)
    minutes = (time.time() - t0) / 60
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md + f"\n\nToy test set, {cfg['test_n']} questions (open ones dropped: no reward model). "
                     f"Wall time {minutes:.1f} min.\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot_rewards({n: r["grpo"]["rewards"] for n, r in results.items() if "grpo" in r},
                 os.path.join(out, "reward_curves.png"))
    stage(f"results ({minutes:.1f} min): accuracy on the toy test set; iou counts as right at IoU >= 0.5")
    print(md)
    print(f"\nwrote {out}/results.md, {out}/results.json, {out}/reward_curves.png")


if __name__ == "__main__":
    main()
