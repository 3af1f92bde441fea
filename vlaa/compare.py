"""Compare training runs: curves of any metrics.jsonl metric, seeds drawn as mean and spread, a table.

04_sft.py and 05_grpo.py write OUT/run.json (what made the run: the stage, the starting model, the data and
every flag that changes results; vlaa/runs.py) and OUT/metrics.jsonl (one line per step). Runs whose run.json
differ only in --seed are one configuration: its curve is the mean over seeds with a band of ± one sample
standard deviation, and the table gives each configuration's mean of the last --window logged values, its
spread, its number of seeds, and its difference from the first configuration. A difference "exceeds the
spread" when the two ranges mean ± sd do not overlap (demo.py judges its arms by the same rule).

    python -m vlaa.compare runs/seq-s0 runs/seq-s1 runs/tok-s0 runs/tok-s1 --metric reward,eval/accuracy \
        --out compare.png [--window 20] [--smooth 10] [--relative]

--relative plots and tabulates each run's change from its own start (the mean of its first --window values):
runs that start from different policies are compared by what they gained, not where they began. A
configuration is named by the flags that differ between configurations ("loss_agg=token"); runs that differ
in more than flags (another starting model or data file) are named by their folders. No torch: it reads JSON.
"""

import argparse
import json
import os
import statistics

from vlaa.jsonl import read_jsonl
from vlaa.runs import RUN_FILE


def read_run(folder):
    """A run folder -> {"folder", "seed", "config": run.json without the seed, "metrics": [one dict per step]}.
    A folder without run.json or metrics.jsonl is an error naming the file."""
    for name in (RUN_FILE, "metrics.jsonl"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise SystemExit(f"{folder}: no {name}; pass run folders written by 04_sft.py or 05_grpo.py")
    with open(os.path.join(folder, RUN_FILE), encoding="utf-8") as f:
        config = json.load(f)
    flags = dict(config.get("flags", {}))
    seed = flags.pop("seed", None)
    metrics = [r for _, r in read_jsonl(os.path.join(folder, "metrics.jsonl"), bad=[])]
    return {"folder": folder, "seed": seed, "config": dict(config, flags=flags), "metrics": metrics}


def group_by_config(runs):
    """Runs -> {label: [runs of one configuration]}, in the order first met. Two runs of one configuration
    with the same seed are an error: one of them would count twice in the spread."""
    groups = {}
    for run in runs:
        key = json.dumps(run["config"], sort_keys=True)
        groups.setdefault(key, []).append(run)
    for members in groups.values():
        seeds = [r["seed"] for r in members]
        if len(set(map(str, seeds))) < len(seeds):
            raise SystemExit("runs of one configuration share a seed: " + ", ".join(r["folder"] for r in members))
    return dict(zip(_labels([m[0]["config"] for m in groups.values()], list(groups.values())), groups.values()))


def _labels(configs, groups):
    """A name per configuration: the flags whose values differ between them, else the first folder's name."""
    flags = [c.get("flags", {}) for c in configs]
    differ = sorted(k for k in set().union(*flags) if len({json.dumps(f.get(k)) for f in flags}) > 1)
    rest_same = len({json.dumps({**c, "flags": None}, sort_keys=True) for c in configs}) == 1
    if differ and rest_same:
        return [", ".join(f"{k}={f.get(k)}" for k in differ) for f in flags]
    return [os.path.basename(os.path.normpath(g[0]["folder"])) for g in groups]


def values(run, metric):
    """(steps, values) of one metric in one run, the steps where it was logged (eval/... only every N)."""
    rows = [r for r in run["metrics"] if isinstance(r.get(metric), (int, float))]
    return [r["step"] for r in rows], [float(r[metric]) for r in rows]


def mean_sd(xs):
    """(mean, sample standard deviation); one value has no spread (0)."""
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def exceeds_spread(a, b):
    """Two (mean, sd) pairs: True when the ranges mean ± sd do not overlap."""
    return abs(a[0] - b[0]) > a[1] + b[1]


def last_window(run, metric, window, relative=False):
    """Mean of the metric's last `window` logged values; with relative, minus the mean of its first `window`."""
    v = values(run, metric)[1]
    if not v:
        raise SystemExit(f"{run['folder']}: metrics.jsonl has no metric {metric!r}")
    return statistics.mean(v[-window:]) - (statistics.mean(v[:window]) if relative else 0.0)


def summary(groups, metric, window, relative=False):
    """{label: (mean, sd, seeds)} of the last-window mean over each configuration's seeds."""
    return {label: (*mean_sd([last_window(r, metric, window, relative) for r in runs]), len(runs))
            for label, runs in groups.items()}


def table(groups, metrics, window, relative=False):
    """A Markdown table of the last-window means ± sd per configuration and metric, then each configuration's
    difference from the first one, with the verdict of exceeds_spread."""
    what = "change from the first" if relative else "mean of the last"
    head = ["configuration", "seeds", *(f"{m} ({what} {window} logged)" for m in metrics)]
    stats = {m: summary(groups, m, window, relative) for m in metrics}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, runs in groups.items():
        cells = [f"{stats[m][label][0]:.4f} ± {stats[m][label][1]:.4f}" for m in metrics]
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    first, *others = groups
    for label in others:
        for m in metrics:
            a, b = stats[m][label], stats[m][first]
            verdict = "exceeds the spread" if exceeds_spread(a[:2], b[:2]) else "within the spread"
            lines.append(f"\n{label} minus {first}, {m}: {a[0] - b[0]:+.4f} ({verdict}: sd {a[1]:.4f} over "
                         f"{a[2]} seed(s), {b[1]:.4f} over {b[2]})")
    return "\n".join(lines)


def curve(run, metric, smooth=1, relative=False, window=1):
    """(steps, values) of one run, each value the mean of those logged in the last `smooth` steps (a metric
    logged every N steps, such as eval/..., is not averaged across evaluations), minus the mean of its first
    `window` values with relative."""
    steps, v = values(run, metric)
    start = statistics.mean(v[:window]) if relative and v else 0.0
    out, first = [], 0
    for j, s in enumerate(steps):
        while steps[first] <= s - smooth:
            first += 1
        out.append(statistics.mean(v[first:j + 1]) - start)
    return steps, out


def plot(groups, metrics, path, smooth=1, relative=False, window=1, title=None):
    """One panel per metric, one line per configuration: the mean over its seeds at the steps all of them
    logged, and a band of ± one sample sd. Returns the path, or None without matplotlib (the plot extra)."""
    try:
        import matplotlib
    except ImportError:
        print("no figure: matplotlib is not installed (pip install -e '.[plot]')")
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(metrics), figsize=(max(8.0, 6.5 * len(metrics)), 4.5), dpi=100, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, runs in groups.items():
            per_run = [dict(zip(*curve(r, metric, smooth, relative, window))) for r in runs]
            steps = sorted(set.intersection(*(set(c) for c in per_run)))
            if not steps:
                continue
            y = np.array([[c[s] for s in steps] for c in per_run])  # [seeds, steps]
            name = f"{label} ({len(runs)} seed{'s' * (len(runs) > 1)})"
            ax.plot(steps, y.mean(0), linewidth=2, marker="o" if len(steps) < 30 else None, label=name)
            if len(runs) > 1:
                sd = y.std(0, ddof=1)
                ax.fill_between(steps, y.mean(0) - sd, y.mean(0) + sd, alpha=0.2)
        ylabel = f"{metric}, change from its first {window}" if relative else metric
        ax.set(xlabel="step", ylabel=ylabel + (f"\n({smooth}-step moving average)" if smooth > 1 else ""))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title or "mean ± sample sd over seeds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders of 04 or 05 (each with run.json, metrics.jsonl)")
    ap.add_argument("--metric", default="reward", help="comma-separated metrics.jsonl keys (default: %(default)s; "
                    "04 logs loss, both log eval/accuracy with --eval-data)")
    ap.add_argument("--window", type=int, default=20, help="logged values averaged at the end (and start, with "
                    "--relative) for the table (default: %(default)s)")
    ap.add_argument("--smooth", type=int, default=1, help="moving average over N steps in the figure (default: 1)")
    ap.add_argument("--relative", action="store_true", help="each run's change from its own start")
    ap.add_argument("--out", default=None, help="write the figure here (PNG); without it only the table is printed")
    args = ap.parse_args(argv)
    if args.window < 1 or args.smooth < 1:
        raise SystemExit("--window and --smooth must be at least 1")
    metrics = [m for m in args.metric.split(",") if m]
    groups = group_by_config([read_run(f) for f in args.runs])
    print(table(groups, metrics, args.window, args.relative))
    if args.out and plot(groups, metrics, args.out, args.smooth, args.relative, args.window):
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
