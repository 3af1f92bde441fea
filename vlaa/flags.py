"""The command line of every stage: each numeric flag's valid range, the combinations a stage refuses, and how
an error about the user's input reaches the console.

    p.add_argument("--max-steps", type=flags.positive_int)   the range is checked where the flag is defined,
                                                              and `--help` shows it: "[an integer > 0]"
    args = flags.parse(p, argv, flags.check_sft)             parse, then refuse bad combinations (--eval-every
                                                              without --eval-data, batches that do not divide)
    if __name__ == "__main__": flags.cli(main)               an InputError (or a file the system cannot open)
                                                              is printed as its one message, exit status 1

A bad value or combination is argparse's usage error (exit status 2, naming the flag), before any model loads:
a negative --max-steps once exported the untrained model, a negative --grad-clip did gradient ascent, and
--temperature 0 in GRPO's sampler wrote NaN weights, all with exit status 0. Used by 01-06, toy.py and demo.py.
"""

import argparse
import math
import os

from vlaa.jsonl import InputError

# ----------------------------------------------------------------------------------------------------
# Ranges: argparse types that refuse what is out of range (nan and inf included) with a usage error


def _ranged(kind, shown, ok):
    """An argparse type: text -> kind, refused unless ok(value); `shown` ("an integer > 0") is what --help and
    the error say."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {shown}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):  # nan compares False, inf is never a setting
            raise argparse.ArgumentTypeError(f"must be {shown}, got {text!r}")
        return value
    parse.range = shown  # what show_ranges appends to the flag's help
    return parse


def at_least(low):
    """An integer >= low (--group-size: GRPO's advantage needs two completions of a prompt)."""
    return _ranged(int, f"an integer >= {low}", lambda v: v >= low)


positive_int = _ranged(int, "an integer > 0", lambda v: v > 0)
nonneg_int = at_least(0)
positive_float = _ranged(float, "a number > 0", lambda v: v > 0)
nonneg_float = _ranged(float, "a number >= 0", lambda v: v >= 0)
probability = _ranged(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
adam_beta = _ranged(float, "a number in [0, 1)", lambda v: 0 <= v < 1)
fraction = _ranged(float, "a number in (0, 1]", lambda v: 0 < v <= 1)  # top-p, a share of GPU memory


def show_ranges(parser):
    """Append each ranged flag's range to its help text, in this parser and its sub-commands' (toy.py)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_ranges(sub)
        shown = getattr(action.type, "range", None)
        if shown and shown not in (action.help or ""):
            action.help = f"{action.help} [{shown}]" if action.help else f"[{shown}]"


def parse(parser, argv=None, check=None):
    """parser.parse_args(argv) with the ranges in --help, then check(args) -> the first bad combination's
    message or None; a message is a usage error (exit status 2) before anything else runs."""
    show_ranges(parser)
    args = parser.parse_args(argv)
    why = check(args) if check else None
    if why:
        parser.error(why)
    return args


# ----------------------------------------------------------------------------------------------------
# Combinations: each check returns the first problem, or None


def _first(*whys):
    return next((w for w in whys if w), None)


def _world():
    """The number of ranks torchrun starts (training.init_distributed reads the same variable)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def check_pixels(args):
    if args.min_pixels and args.max_pixels and args.min_pixels > args.max_pixels:
        return f"--min-pixels {args.min_pixels} is above --max-pixels {args.max_pixels}"


def check_generation(args):
    """01-03: an engine setting given to a backend that does not read it would be silently ignored."""
    for flag, value, readers in (("--max-model-len", args.max_model_len, ("vllm",)),
                                 ("--gpu-memory-utilization", args.gpu_memory_utilization, ("vllm",)),
                                 ("--max-pixels", args.max_pixels, ("hf", "vllm"))):
        if value is not None and args.backend not in readers:
            return f"{flag} is read by --backend {' or '.join(readers)} only, not {args.backend}"


def check_training(args):
    """What 04 and 05 share: the LR floor is below the peak, held-out evaluation has both its flags (either alone
    would silently do nothing), the LoRA flags go together (vlaa/lora.py). Paths are checked next, by
    runs.check_inputs."""
    from vlaa import lora

    return _first(
        check_pixels(args), lora.check(args),
        args.min_lr > args.lr and f"--min-lr {args.min_lr} is above --lr {args.lr}",
        args.eval_every and not args.eval_data and "--eval-every needs --eval-data (the held-out records)",
        args.eval_data and not args.eval_every and "--eval-data needs --eval-every N (how often to evaluate)")


def check_sft(args):
    """04: every rank takes the same share of a global batch (an uneven share would hang FSDP2's collectives)."""
    return _first(check_training(args), args.global_batch % _world() and
                  f"--global-batch {args.global_batch} is not divisible by the number of ranks ({_world()})")


def check_grpo(args):
    """05: a rollout splits into whole optimizer updates on every rank; --dual-clip is off (0) or above 1
    (dual-clip PPO's c > 1); every --verifier-types name is known."""
    from vlaa.records import normalize_verifier

    world = _world()
    if args.rollout_batch % world or args.train_batch % world:
        return f"--rollout-batch and --train-batch must be divisible by the number of ranks ({world})"
    if (args.rollout_batch * args.group_size) % args.train_batch:
        return (f"--rollout-batch x --group-size ({args.rollout_batch} x {args.group_size}) must be a multiple of "
                f"--train-batch ({args.train_batch})")
    try:
        [normalize_verifier(t, "--verifier-types") for t in args.verifier_types.split(",")]
    except InputError as e:
        return str(e)
    return _first(args.top_p != 1 and f"--top-p {args.top_p}: only 1 trains correctly (the loss scores the "
                  "untruncated softmax, not the truncated distribution top-p samples from)",
                  check_training(args),
                  0 < args.dual_clip <= 1 and f"--dual-clip must be 0 (off) or above 1, got {args.dual_clip}",
                  args.vllm_gpu_memory is not None and args.rollout != "vllm"
                  and "--vllm-gpu-memory needs --rollout vllm")


# ----------------------------------------------------------------------------------------------------
# The console


def cli(main):
    """Run a stage's main from the command line. An error about what the user gave (an InputError: a record, a
    data file, a damaged run folder; or an OSError: a path that cannot be opened) is printed as its one message
    with exit status 1; anything else is a bug and keeps its traceback."""
    try:
        main()
    except (InputError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
