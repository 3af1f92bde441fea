"""How fast is the mixed reward? Throughput per verifier type, and one paper-sized GRPO step.

    python bench/rewards.py [--n 10000] [--prompts 512] [--workers N]

The completions are synthetic but shaped like real rollouts: `<think> ~1 KB </think> <answer> .. </answer>`,
per prompt 4 samples (paper: G = 4) that are right (in several spellings), wrong, or malformed
(no tags, unclosed tag, empty answer). Types are drawn in the RL split's mix (the paper's Table 1):
digit 2,000, mcq 7,499, math 6,696 (about a quarter), iou 4,000, open 5,000 of 25,195.
Open answers are scored by an instant stub reward model: this measures our code, not an RM.
Target: rule-based scoring of one step (512 prompts x 4 = 2,048 completions) in under 5 s on 2 CPU cores.
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import rewards
from vlaa import mathverify

MIX = {"digit": 2000, "mcq": 7499, "math": 6696, "iou": 4000, "open": 5000}
TARGET_S = 5.0
FILLER = ("I look at the image carefully. The objects are arranged on a table and I count them one by one. "
          "Hmm, let me double-check the numbers before I answer. ")


def math_gold(rng):
    """(gold, equivalent spellings, a wrong answer) in Math PUMA's styles: functions, pi, roots, fractions."""
    a, b, c = rng.choice([-3, -2, 2, 3, 4, 5]), rng.randint(2, 9), rng.randint(-9, 9)
    kind = rng.randrange(6)
    if kind == 0:
        return f"y = {a}x + {c}", [f"y = {c} + {a}x", f"y={a}x+{c}"], f"y = {a + 1}x + {c}"
    if kind == 1:
        return (f"y = \\frac{{1}}{{{b}}}x^2 + {c}", [f"y = {c} + \\frac{{x^2}}{{{b}}}"],
                f"y = \\frac{{1}}{{{b + 1}}}x^2 + {c}")
    if kind == 2:
        return f"{b * 4}\\pi", [f"{b * 4} \\pi", f"\\pi \\cdot {b * 4}"], f"{b * 2}\\pi"
    if kind == 3:
        return f"2\\sqrt{{{b}}}", [f"\\sqrt{{{4 * b}}}"], f"\\sqrt{{{2 * b}}}"
    if kind == 4:
        return f"\\frac{{{b}}}{{4}}", [f"{b / 4}"], f"\\frac{{{b}}}{{5}}"
    return str(a * b), [f"{a * b}.", f"${a * b}$"], str(a * b + 1)


def make_prompt(vtype, rng, i):
    """(sample, right answers, wrong answers) for one synthetic prompt."""
    sample = {"id": f"{vtype}-{i}", "question": f"Question {i} about the image?", "verifier_type": vtype}
    if vtype == "digit":
        n = rng.randint(0, 10)
        sample["answer"], right, wrong = str(n), [str(n), f"{n}.", f"{n} objects", f" {n} "], [str(n + 1)]
    elif vtype == "mcq":
        choices = [f"{rng.randint(1, 99)} cm" for _ in range(4)]
        k = rng.randrange(4)
        letter = "ABCD"[k]
        sample.update(answer=rng.choice([letter, f"({letter.lower()})", f"{letter})"]), choices=choices)
        right = [letter, f"({letter.lower()})", f"{letter}. {choices[k]}", choices[k]]
        wrong = ["ABCD"[(k + 1) % 4], f"{'ABCD'[(k + 2) % 4]})"]
    elif vtype == "math":
        sample["answer"], right, wrong = math_gold(rng)
        right = [sample["answer"]] + right
        wrong = [wrong]
    elif vtype == "iou":
        x, y = rng.randint(0, 50) / 100, rng.randint(0, 50) / 100
        box = [x, y, x + 0.4, y + 0.3]
        sample.update(answer="[" + ", ".join(f"{v:.2f}" for v in box) + "]", image_size=[640, 480])
        pixels = ", ".join(str(round(v * size)) for v, size in zip(box, [640, 480, 640, 480]))
        near = ", ".join(f"{v + d:.2f}" for v, d in zip(box, [0.03, -0.02, 0.01, 0.0]))
        right = [sample["answer"], "({:.2f}, {:.2f}), ({:.2f}, {:.2f})".format(*box),
                 f'{{"bbox_2d": [{pixels}], "label": "dog"}}', f"[{near}]"]
        wrong = ["[0.9, 0.9, 0.95, 0.99]", "[0.5, 0.5, 0.5, 0.7]"]
    else:
        sample["answer"] = "The sign says the store opens at nine."
        right = ["The sign on the door says the store opens at 9 am."]
        wrong = ["I cannot tell."]
    return sample, right, wrong


def make_completion(answer, rng):
    think = FILLER * rng.randint(4, 8)
    kind = rng.random()
    if kind < 0.05:
        return f"<think>{think}</think> The answer is {answer}."  # no tags
    if kind < 0.10:
        return f"<think>{think}</think> <answer> {answer}"  # cut off by max_new_tokens
    if kind < 0.12:
        return f"<think>{think}</think> <answer> </answer>"
    return f"<think>{think}</think> <answer> {answer} </answer>"


def make_batch(n_prompts, seed, types=None, group=4):
    rng = random.Random(seed)
    names = list(types or MIX)
    weights = [MIX[t] for t in names]
    completions, samples = [], []
    for i in range(n_prompts):
        vtype = rng.choices(names, weights)[0]
        sample, right, wrong = make_prompt(vtype, rng, f"{seed}-{i}")
        for _ in range(group):
            answer = rng.choice(right) if rng.random() < 0.5 else rng.choice(wrong)
            completions.append(make_completion(answer, rng))
            samples.append(sample)
    return completions, samples


def stub_rm():
    """An instant reward model: longer answers score higher. Only the plumbing is timed."""
    return rewards.RewardModel(lambda qs, answers, images: [len(a) / 10 for a in answers])


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000, help="completions for the per-type throughput table")
    ap.add_argument("--prompts", type=int, default=512, help="prompts in the GRPO step (x4 completions)")
    ap.add_argument("--workers", type=int, default=None, help="math helper processes (default: one per CPU)")
    args = ap.parse_args()
    rm = stub_rm()
    print(f"CPUs: {os.cpu_count()}, workers: {args.workers or os.cpu_count()}")

    # warm up: start the helper processes (about 1 s each, once per training run)
    (_, _), t = timed(lambda: rewards.score_batch(*make_batch(8, 0, ["math"]), rm=rm, workers=args.workers))
    print(f"helper start-up (first call): {t:.2f} s")

    # cost of one item sent to a helper vs scored inline: why digit/mcq/iou stay in-process
    # (distinct items: verdicts are cached by (gold, prediction))
    _, t = timed(lambda: [mathverify.ask_math("1", str(i + 2), 5) for i in range(200)])
    print(f"round trip to a helper process: {t / 200 * 1e6:.0f} us per item")

    completions, samples = make_batch(args.n // 4, 1)
    print(f"\nthroughput on {len(completions)} synthetic completions")
    print(f"{'type':6} {'n':>6} {'seconds':>8} {'items/s':>9} {'us/item':>8} {'mean reward':>12}")
    for vtype in rewards.VERIFIERS:
        mathverify._CACHE.clear()  # every item checked for real (the synthetic answers repeat)
        idx = [i for i, s in enumerate(samples) if s["verifier_type"] == vtype]
        batch = [completions[i] for i in idx], [samples[i] for i in idx]
        (r, _), t = timed(lambda batch=batch: rewards.score_batch(*batch, rm=rm, workers=args.workers))
        print(f"{vtype:6} {len(idx):6d} {t:8.3f} {len(idx) / t:9.0f} {t / len(idx) * 1e6:8.0f} {sum(r) / len(r):12.3f}")

    print(f"\none GRPO step: {args.prompts} prompts x 4 = {args.prompts * 4} completions, RL-split mix, fresh answers")
    for workers in ([args.workers] if args.workers else [1, os.cpu_count()]):
        completions, samples = make_batch(args.prompts, 100 + (workers or 0))
        mathverify._CACHE.clear()  # fresh answers: no verdict cached by an earlier call
        (r, stats), t = timed(lambda c=completions, s=samples, w=workers: rewards.score_batch(c, s, rm=rm, workers=w))
        counts = ", ".join(f"{k[6:]} {v}" for k, v in stats.items() if k.startswith("count/"))
        print(f"workers={workers}: {t:.2f} s  ({counts}; no answer {stats['no_answer'] / len(completions):.0%})"
              f"  -> {t / TARGET_S:.2f}x the {TARGET_S:.0f} s target ({'OK' if t < TARGET_S else 'SLOW'})")


if __name__ == "__main__":
    main()
