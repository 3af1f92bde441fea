"""`make demo`: the whole recipe on a CPU in minutes, and the paper's SFT-vs-RL question in miniature.

The paper asks its question of a pretrained instruct model, one that already answers visual questions
and so has something for RL to sharpen and for SFT to damage. The demo's stand-in is the toy base
(assets/toy-base): the tiny Qwen2.5-VL of toy.py, trained by 04_sft.py on a broad mix of toy questions
answered directly (`<think>` a short rationale `</think> <answer>X</answer>`) until it has real but
partial skill (docs/demo.md has the recipe and what was measured). From that one checkpoint:

    toy data -> 01 caption -> 02 distill (toy R1: some wrong, some hesitant traces) -> 03 rewrite,
    verify, split into sft.jsonl (no aha) and rl.jsonl (aha) -> the arms, each scored by 06_eval.py:
       base | GRPO | SFT | SFT then GRPO | SFT on hesitant traces | SFT on hesitant traces then GRPO

The arms share the base, the data, the reward, the hyperparameters and the GRPO steps; a seed changes the
order of the SFT batches and the GRPO prompts and samples. Settings are fixed in the constants below; the
learning rates were set by checks on the base alone (docs/demo.md), nothing was tuned toward the paper's
conclusion: whatever the table says is the result.

    python demo.py [--out runs/demo] [--seeds N] [--quick]     # --quick: a reduced size, for the test suite
    python demo.py --build-base [--out assets/toy-base]          # rebuild the base (about 2 minutes)

Writes OUT/results.md (the table, mean and spread over seeds, the comparisons and a conclusion computed from
them), OUT/results.json, OUT/reward_curves.png (vlaa.compare's figure: each GRPO arm's reward change from its
own start, since the arms start from different policies).
"""

import argparse
import importlib
import json
import os
import shutil
import time

import toy
from vlaa import compare, flags

caption, distill, verify, sft, grpo, evaluate = (importlib.import_module(m) for m in (
    "01_caption", "02_distill", "03_rewrite_verify", "04_sft", "05_grpo", "06_eval"))

# The base: toy.py's tiny model, pretrained on direct answers (docs/demo.md: how size, mix and steps were chosen).
BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy-base")
BASE_SIZE, BASE_N, BASE_DATA_SEED = "tiny", 4000, 1  # its own images: data seed 1, the demo's is 0
# every task; the weights even out how fast each is learnt (colour and largest are learnt first, boxes last)
BASE_MIX = "colour:0.2,largest:0.2,count:0.7,remove:0.7,remove-shape:0.7,box:6,sum:3,expr,shapes,read:2"
BASE_ARGS = ["--max-steps", "800", "--global-batch", "32", "--micro-batch", "32", "--lr", "2e-3", "--min-lr", "2e-4",
             "--warmup-ratio", "0.05", "--cache-size", str(BASE_N), "--save-every", "100000", "--seed", "0"]

FULL = dict(n=2000, test_n=200, sft_steps=300, grpo_steps=200, prompts=8, new_tokens=64, window=20)
QUICK = dict(n=200, test_n=16, sft_steps=4, grpo_steps=2, prompts=2, new_tokens=8, window=1)
TEACHER = "reasoner:error_rate=0.1,hesitation_rate=0.3"  # some wrong, some hesitant traces
# fine-tuning below the base's peak lr: at 2e-3, SFT on the base's own kind of answers cost it half its box skill
SFT_ARGS = ["--global-batch", "32", "--micro-batch", "32", "--lr", "5e-4", "--min-lr", "5e-5", "--warmup-ratio", "0",
            "--save-every", "100000"]
# docs/toy.md: 8 prompts x G 8, T 1.0, no KL. lr 1e-4, cosine to a tenth: at 3e-4 the base lost nearly a third of
# its greedy accuracy in the first 25 steps, before GRPO had learnt anything (docs/demo.md)
GRPO_ARGS = ["--group-size", "8", "--micro-batch", "64", "--temperature", "1.0", "--top-p", "1.0", "--lr", "1e-4",
             "--min-lr", "1e-5", "--warmup-ratio", "0", "--kl-coef", "0", "--kl-target", "0", "--loss-agg", "seq",
             "--scale-rewards", "group", "--ppo-epochs", "1", "--clip-low", "0.2", "--clip-high", "0.2",
             "--save-every", "100000"]
ARMS = ["base", "GRPO", "SFT", "SFT -> GRPO", "SFT on hesitant", "SFT on hesitant -> GRPO"]
TYPES = ("digit", "mcq", "math", "iou")


def stage(title):
    print(f"\n=== {title} ===", flush=True)


def fresh(path):
    """A folder of this demo, emptied: every run starts afresh, never resumes another's outputs."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def check_out(out, mine):
    """Refuse an output folder holding anything the demo did not write: it empties its own subfolders."""
    others = [n for n in os.listdir(out) if not mine(n)] if os.path.isdir(out) else []
    if others:
        raise SystemExit(f"{out} holds files the demo did not write ({', '.join(sorted(others)[:3])}); "
                         "choose another --out")


# ----------------------------------------------------------------------------------------------------
# The base


def build_base(out=BASE, quick=False):
    """The toy instruct base: a random tiny model, SFT on direct answers (toy.make_data(responses=True)), then
    greedy accuracy per verifier type on 600 held-out questions of the demo's mix, written to OUT/build.json.
    Deterministic on one thread: the same torch on the same kind of CPU gives the same weights."""
    import torch

    check_out(out, lambda n: os.path.exists(os.path.join(out, "config.json")))  # a model folder is replaced
    work, threads = fresh(out.rstrip("/") + ".build"), torch.get_num_threads()
    model = toy.build_model(os.path.join(work, "random"), BASE_SIZE)
    data = toy.make_data(os.path.join(work, "data"), n=40 if quick else BASE_N, test_n=0, seed=BASE_DATA_SEED,
                         kinds=BASE_MIX, responses=True)
    held_out = toy.make_data(os.path.join(work, "held_out"), n=0, test_n=8 if quick else 600, seed=2)
    steps = ["--max-steps", "2", "--global-batch", "8", "--micro-batch", "8"] if quick else []
    torch.set_num_threads(1)  # a sum split over two threads may round differently from run to run
    try:
        sft.main(["--model", model, "--data", f"{data}/train.jsonl", "--out", f"{work}/sft", *BASE_ARGS, *steps,
                  "--eval-data", f"{held_out}/test.jsonl", "--eval-every", "100000", "--eval-max-new-tokens", "64"])
    finally:
        torch.set_num_threads(threads)
    with open(f"{work}/sft/metrics.jsonl") as f:
        last = [json.loads(line) for line in f][-1]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    shutil.move(f"{work}/sft/model", fresh(out))
    recipe = {"size": BASE_SIZE, "records": BASE_N, "data_seed": BASE_DATA_SEED, "mix": BASE_MIX, "sft": BASE_ARGS}
    with open(os.path.join(out, "build.json"), "w") as f:
        json.dump({"recipe": recipe, "held_out": {k: v for k, v in last.items() if k.startswith("eval/")}}, f, indent=1)
    shutil.rmtree(work)
    return out


# ----------------------------------------------------------------------------------------------------
# The arms


def run_sft(start, data, out, steps, seed):
    sft.main(["--model", start, "--data", data, "--out", fresh(out), "--max-steps", str(steps), "--seed", str(seed),
              *SFT_ARGS])
    return os.path.join(out, "model")


def run_grpo(start, data, out, cfg, seed):
    grpo.main(["--model", start, "--data", data, "--out", fresh(out), "--max-steps", str(cfg["grpo_steps"]),
               "--seed", str(seed), *GRPO_ARGS, "--rollout-batch", str(cfg["prompts"]),
               "--train-batch", str(8 * cfg["prompts"]), "--max-new-tokens", str(cfg["new_tokens"])])
    return os.path.join(out, "model")


def run_eval(model, data_dir, out, new_tokens):
    evaluate.main(["--model", model, "--bench", "toy", "--data-dir", data_dir, "--out", fresh(out), "--backend", "hf",
                   "--max-new-tokens", str(new_tokens), "--device", "cpu"])
    with open(os.path.join(out, "scores.json")) as f:
        return json.load(f)["benchmarks"]["toy"]


def grpo_summary(out, window):
    """Mean training reward of the first and last `window` steps, distinct completions per group at the end
    (collapse onto one answer shows as 1), and the reward of every step."""
    m = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    return {"reward_first": mean(m[:window], "reward"), "reward_last": mean(m[-window:], "reward"),
            "distinct_last": mean(m[-window:], "distinct_per_group"), "rewards": [r["reward"] for r in m],
            "dir": out}


def run_arms(base, data, sets, out, cfg, seed):
    """The trained arms of one seed -> {arm: (model folder, GRPO folder or None)}."""
    sft_set, rl_set = sets
    tuned = run_sft(base, sft_set, f"{out}/sft", cfg["sft_steps"], seed)
    hesitant = run_sft(base, rl_set, f"{out}/sft_hesitant", cfg["sft_steps"], seed)  # the aha traces as SFT data
    arms = {"GRPO": (base, "grpo"), "SFT": (tuned, None), "SFT -> GRPO": (tuned, "sft_grpo"),
            "SFT on hesitant": (hesitant, None), "SFT on hesitant -> GRPO": (hesitant, "hesitant_grpo")}
    return {arm: (run_grpo(start, rl_set, f"{out}/{g}", cfg, seed), f"{out}/{g}") if g else (start, None)
            for arm, (start, g) in arms.items()}


def slug(arm):
    return arm.lower().replace(" -> ", "_then_").replace(" ", "_")


# ----------------------------------------------------------------------------------------------------
# Results: mean and spread over seeds, the table, the figure


spread = compare.mean_sd  # (mean, sample sd): one home for the spread, the verdict and the figure


def cells(runs):
    """One arm's runs (one per seed) -> {column: [value per seed]}."""
    col = {"accuracy": [r["scores"]["metrics"]["accuracy"] for r in runs]}
    for t in TYPES:
        col[t] = [r["scores"]["metrics"].get(f"verifier_type/{t}", float("nan")) for r in runs]
    for k in ("mean_words", "aha", "no_answer"):
        col[k] = [r["scores"]["trace"][k] for r in runs]
    if "grpo" in runs[0]:
        for k in ("reward_first", "reward_last", "distinct_last"):
            col[k] = [r["grpo"][k] for r in runs]
        col["reward_gain"] = [r["grpo"]["reward_last"] - r["grpo"]["reward_first"] for r in runs]
    return col


def show(values, fmt="{:.2f}", scale=1):
    m, s = spread([scale * v for v in values])
    return fmt.format(m) + (f" ± {fmt.format(s)}" if len(values) > 1 else "")


def table(results):
    head = ["arm", "accuracy", *TYPES, "mean words", "aha %", "no answer %", "GRPO reward first -> last",
            "distinct/G at end"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, runs in results.items():
        c = cells(runs)
        g = "reward_first" in c
        lines.append("| " + " | ".join([
            arm, *(show(c[k]) for k in ("accuracy", *TYPES)), show(c["mean_words"], "{:.1f}"),
            show(c["aha"], "{:.0f}", 100), show(c["no_answer"], "{:.0f}", 100),
            f"{show(c['reward_first'])} -> {show(c['reward_last'])}" if g else "-",
            show(c["distinct_last"]) if g else "-"]) + " |")
    return "\n".join(lines)


def comparisons(results):
    """The paper's comparisons, on accuracy: a difference exceeds the spread when the two ranges
    mean ± sd do not overlap. And GRPO's own signal: the reward gain against twice its spread."""
    acc = {arm: spread(cells(runs)["accuracy"]) for arm, runs in results.items()}
    seeds = len(results["base"])
    lines = []
    for a, b in [("GRPO", "base"), ("SFT", "base"), ("SFT on hesitant", "base"), ("SFT -> GRPO", "GRPO"),
                 ("SFT on hesitant -> GRPO", "GRPO")]:
        (ma, sa), (mb, sb) = acc[a], acc[b]
        verdict = "exceeds the spread" if compare.exceeds_spread(acc[a], acc[b]) else "within the spread"
        lines.append(f"- {a} vs {b}: accuracy {ma - mb:+.3f}" +
                     (f" ({verdict}: sd {sa:.3f} and {sb:.3f})" if seeds > 1 else " (one seed: no spread)"))
    m, s = spread(cells(results["GRPO"])["reward_gain"])
    lines.append(f"- GRPO from the base: training reward, last steps minus first steps {m:+.3f}" +
                 (f" ± {s:.3f} ({'more' if m > 2 * s else 'not more'} than twice the spread)" if seeds > 1 else ""))
    return "\n".join(lines)


def conclusion(results):
    """What the table says, in words computed from its numbers: GRPO's own signal, SFT's effect, and whether the
    toy reproduces the paper's "SFT then GRPO ends below GRPO alone". With several seeds a difference counts
    when it exceeds the spread (compare.exceeds_spread); one seed has no spread, so only its direction is told."""
    acc = {arm: spread(cells(runs)["accuracy"]) for arm, runs in results.items()}
    seeds = len(results["base"])

    def diff(a, b):
        d = acc[a][0] - acc[b][0]
        if seeds < 2:
            return f"{d:+.3f} (one seed: no spread)", d
        beyond = compare.exceeds_spread(acc[a], acc[b])
        return f"{d:+.3f} ({'beyond' if beyond else 'within'} the spread, sd {acc[a][1]:.3f} and {acc[b][1]:.3f})", \
            (d if beyond else 0.0)

    gain, gain_sd = spread(cells(results["GRPO"])["reward_gain"])
    (grpo_text, _), (sft_text, _) = diff("GRPO", "base"), diff("SFT", "base")
    (order_text, order), (hes_text, _) = diff("SFT -> GRPO", "GRPO"), diff("SFT on hesitant", "base")
    where = "below" if order < 0 else "above" if order > 0 else "level with"
    claim = "\"SFT then GRPO ends below GRPO alone\""
    verdict = (f"reproduces the paper's {claim}" if order < 0 else f"does not reproduce the paper's {claim}")
    signal = (f"{gain:+.3f} ± {gain_sd:.3f} ({'more' if gain > 2 * gain_sd else 'not more'} than twice its spread)"
              if seeds > 1 else f"{gain:+.3f}")
    return (f"Conclusion ({seeds} seed{'s' * (seeds > 1)}{', mean ± sample sd' if seeds > 1 else ''}; accuracy on "
            f"the toy test set): GRPO from the base raises its training reward by {signal} and changes its accuracy "
            f"by {grpo_text}. SFT on the teacher's plain traces changes accuracy by {sft_text}; SFT on the hesitant "
            f"traces by {hes_text}. SFT then GRPO ends {where} GRPO alone: {order_text}. So this toy {verdict}"
            + (" on this seed; `python demo.py --seeds 3` tells a difference from seed noise." if seeds < 2 else "."))


def plot_rewards(results, path, window, smooth=10):
    """Each GRPO arm's training reward as its change from its own first `window` steps (the arms start from
    different policies, so their raw rewards compare starts, not learning): vlaa.compare's figure."""
    groups = {arm: [compare.read_run(r["grpo"]["dir"]) for r in runs] for arm, runs in results.items()
              if "grpo" in runs[0]}
    seeds = len(results["base"])
    title = f"GRPO training reward, change from each arm's start ({seeds} seed{'s' * (seeds > 1)}: mean ± sd)"
    return compare.plot(groups, ["reward"], path, smooth=smooth, relative=True, window=window, title=title)


# ----------------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder (default runs/demo; with --build-base the base's)")
    ap.add_argument("--seeds", type=flags.positive_int, default=1, help="run the arms with seeds 0..N-1 (default 1)")
    ap.add_argument("--base", default=BASE, help="the base checkpoint (default assets/toy-base)")
    ap.add_argument("--build-base", action="store_true", help="(re)build the base into --out and stop")
    ap.add_argument("--quick", action="store_true", help="a reduced size (seconds, not minutes): for tests")
    args = flags.parse(ap, argv)
    if args.build_base:
        print(f"built the toy base in {build_base(args.out or BASE, args.quick)}")
        return
    cfg, out = (QUICK if args.quick else FULL), args.out or "runs/demo"
    t0 = time.time()
    check_out(out, lambda n: n in ("base", "data", "eval", "results.md", "results.json", "reward_curves.png")
              or n.startswith("seed"))
    os.makedirs(out, exist_ok=True)
    base = args.base
    if not os.path.exists(os.path.join(base, "config.json")):
        base = os.path.join(out, "base") if args.quick else base  # a 2-step stand-in never replaces the real one
        stage(f"0. no base in {args.base}: building it into {base} (python demo.py --build-base)")
        build_base(base, args.quick)

    stage("1. the toy world, and the data recipe: 01 caption -> 02 distill -> 03 rewrite, verify, split")
    data = fresh(os.path.join(out, "data"))
    toy.make_data(data, n=cfg["n"], test_n=cfg["test_n"], seed=0)
    caption.main(["--in", f"{data}/train.jsonl", "--out", f"{data}/captioned.jsonl", "--backend", "toy",
                  "--model", "captioner"])
    distill.main(["--in", f"{data}/captioned.jsonl", "--out", f"{data}/distilled.jsonl", "--backend", "toy",
                  "--model", TEACHER])
    verify.main(["--in", f"{data}/distilled.jsonl", "--out", f"{data}/final", "--backend", "toy",
                 "--rewriter-model", "rewriter", "--judge-model", "judge"])
    sets = f"{data}/final/sft.jsonl", f"{data}/final/rl.jsonl"

    stage("2. the base, evaluated on the toy test set (06_eval.py)")
    results = {arm: [] for arm in ARMS}
    base_scores = run_eval(base, data, f"{out}/eval/base", cfg["new_tokens"])
    for seed in range(args.seeds):
        stage(f"3. seed {seed} ({seed + 1} of {args.seeds}): SFT, SFT on hesitant traces, three GRPO runs, all scored")
        run = fresh(os.path.join(out, f"seed{seed}"))
        results["base"].append({"scores": base_scores})  # one checkpoint, greedy decoding: the same every seed
        for arm, (model, grpo_dir) in run_arms(base, data, sets, run, cfg, seed).items():
            results[arm].append({"scores": run_eval(model, data, f"{run}/eval/{slug(arm)}", cfg["new_tokens"])})
            if grpo_dir:
                results[arm][-1]["grpo"] = grpo_summary(grpo_dir, cfg["window"])

    md, minutes = table(results), (time.time() - t0) / 60
    notes = (f"Toy test set: {base_scores['n']} questions scored of {cfg['test_n']} (`open` ones dropped: no reward "
             f"model); greedy; iou right at "
             f"IoU >= 0.5. {args.seeds} seed(s){': mean ± sample sd' if args.seeds > 1 else ''}. GRPO reward: the "
             f"mean of the first and last {cfg['window']} steps. Wall time {minutes:.1f} min.")
    report = f"{md}\n\n{notes}\n\n{comparisons(results)}\n\n{conclusion(results)}"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"seeds": args.seeds, "config": cfg, "arms": results}, f, indent=1)
    png = plot_rewards(results, os.path.join(out, "reward_curves.png"), cfg["window"])
    stage(f"results ({minutes:.1f} min): accuracy on the toy test set")
    print(report)
    print(f"\nwrote {out}/results.md, {out}/results.json" + (f", {png}" if png else ""))


if __name__ == "__main__":
    flags.cli(main)
