"""Where a training run's logs go: OUT/metrics.jsonl always, and TensorBoard or Weights & Biases on request.

04_sft.py and 05_grpo.py log through these functions, so both report the same way (TRL's `report_to`
convention: "none", "tensorboard", "wandb"):

    tracking.add_report_to(parser)                           --report-to none|tensorboard|wandb
    tracker = tracking.start(args, "05_grpo", run_id, master)  after the run folder is claimed
    tracking.log(tracker, metrics)                           every step: metrics.jsonl, and the tracker
    tracking.finish(tracker)                                 at the end of the run

Every numeric metric of a step goes to the tracker at that step, and the run's arguments are its config (W&B:
`config`; TensorBoard: a text summary "config", as TRL's TensorBoardCallback writes its args). TensorBoard
event files go to OUT/tensorboard; a W&B run lives in OUT/wandb, is named after OUT, takes its project from
$WANDB_PROJECT (default vlaa-thinking-mini) and its id from the run id, so --resume continues the same W&B
run; WANDB_MODE=offline keeps it on disk (`wandb sync` uploads it later). Neither package is in the base
install: `pip install -e '.[track]'`. Only rank 0 logs.
"""

import json
import os

REPORT_TO = ("none", "tensorboard", "wandb")


def add_report_to(parser):
    parser.add_argument("--report-to", default="none", choices=REPORT_TO, help="also send every metric, with the "
                        "run's arguments as config, to TensorBoard (OUT/tensorboard) or W&B (OUT/wandb; "
                        "WANDB_MODE=offline for no upload); needs pip install -e '.[track]' (default: %(default)s)")


def start(args, stage, run_id, master=True):
    """The run's tracker: {"out", "tb": a SummaryWriter or None, "wandb": a wandb run or None, "master"}.
    A missing package is a message naming the extra to install, before the first step."""
    tracker = {"out": args.out, "tb": None, "wandb": None, "master": master}
    report_to = getattr(args, "report_to", "none")
    if not master or report_to == "none":
        return tracker
    config = json.loads(json.dumps({"stage": stage, **vars(args)}, default=str))
    try:
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            tracker["tb"] = SummaryWriter(log_dir=os.path.join(args.out, "tensorboard"))
            tracker["tb"].add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```")
        elif report_to == "wandb":
            import wandb

            tracker["wandb"] = wandb.init(project=os.environ.get("WANDB_PROJECT", "vlaa-thinking-mini"),
                                          name=os.path.basename(os.path.abspath(args.out)), id=run_id,
                                          resume="allow", dir=args.out, config=config)
    except ImportError as e:
        raise SystemExit(f"--report-to {report_to}: {e.name} is not installed (pip install -e '.[track]')") from None
    return tracker


def log(tracker, rec):
    """One step's metrics (with "step") -> OUT/metrics.jsonl and the tracker. Rank 0 only; others return."""
    from vlaa import training  # its log_metrics appends the line (bench/ hooks it to time each step)

    if not tracker["master"]:
        return
    training.log_metrics(os.path.join(tracker["out"], "metrics.jsonl"), rec)
    scalars = {k: float(v) for k, v in rec.items() if k != "step" and isinstance(v, (int, float))}
    if tracker["tb"] is not None:
        for k, v in scalars.items():
            tracker["tb"].add_scalar(k, v, rec["step"])
        tracker["tb"].flush()  # a run stopped by SIGTERM still leaves every step it logged
    if tracker["wandb"] is not None:
        tracker["wandb"].log(scalars, step=rec["step"])


def log_rollouts(tracker, step, samples, texts, rewards):
    """Sampled completions with their rewards -> OUT/rollouts.jsonl, one line each."""
    from vlaa import training

    if tracker["master"]:
        for s, t, r in zip(samples, texts, rewards):
            training.log_metrics(os.path.join(tracker["out"], "rollouts.jsonl"),
                      {"step": step, "id": s["id"], "completion": t, "reward": r})


def finish(tracker):
    """Close the tracker (the W&B run is marked finished; TensorBoard's file is closed)."""
    if tracker["tb"] is not None:
        tracker["tb"].close()
    if tracker["wandb"] is not None:
        tracker["wandb"].finish()
