"""Flags are checked before any work: a value out of its range, or a combination no run can do, is argparse's usage
error (exit status 2, naming the flag) before a model loads. Every stage is called as on the command line, with a
model that does not exist: the flag must be what stops it. `--help` shows each range."""

import importlib
import re

import pytest

import toy
from vlaa import flags

caption, distill, verify = (importlib.import_module(m) for m in ("01_caption", "02_distill", "03_rewrite_verify"))
sft, grpo, evaluate, demo = (importlib.import_module(m) for m in ("04_sft", "05_grpo", "06_eval", "demo"))


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("")  # the file exists: only the flags are wrong
    return str(path)


def stage_argv(stage, data, tmp_path):
    """The argv of a stage that would run but for the flag under test; its model does not exist."""
    model = str(tmp_path / "no-such-model")
    if stage in ("01", "02", "03"):
        return ["--in", data, "--out", str(tmp_path / "out.jsonl")]
    if stage == "06":
        return ["--model", model, "--out", str(tmp_path / "eval")]
    return ["--model", model, "--data", data, "--out", str(tmp_path / "run")]


MAINS = {"01": caption.main, "02": distill.main, "03": verify.main, "04": sft.main, "05": grpo.main,
         "06": evaluate.main}


def refused(capsys, call, flag):
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag in err.splitlines()[-1], err
    return err.splitlines()[-1]


BAD_VALUES = [  # stage, flag, value: a negative count, zero where one is needed, nan, inf, a share above 1, text
    ("01", "--batch-size", "0"), ("01", "--temperature", "-0.5"), ("01", "--top-p", "1.5"),
    ("02", "--max-new-tokens", "-1"), ("02", "--top-p", "0"), ("02", "--gpu-memory-utilization", "2"),
    ("02", "--seed", "-3"), ("02", "--max-model-len", "0"), ("03", "--max-word-change", "-1"),
    ("03", "--judge-max-new-tokens", "0"), ("03", "--timeout", "nan"),
    ("04", "--max-steps", "-1"), ("04", "--grad-clip", "-1"), ("04", "--global-batch", "-8"),
    ("04", "--micro-batch", "0"), ("04", "--lr", "-0.5"), ("04", "--lr", "inf"), ("04", "--warmup-ratio", "1.5"),
    ("04", "--epochs", "0"), ("04", "--save-every", "0"), ("04", "--cache-size", "-1"), ("04", "--max-length", "x"),
    ("05", "--temperature", "0"), ("05", "--temperature", "nan"), ("05", "--group-size", "1"),
    ("05", "--rollout-batch", "0"), ("05", "--clip-low", "1.2"), ("05", "--kl-coef", "-0.001"),
    ("05", "--top-p", "0"), ("05", "--log-rollouts-every", "0"), ("05", "--ppo-epochs", "0"),
    ("05", "--vllm-gpu-memory", "1.5"), ("05", "--format-weight", "2"), ("05", "--grad-clip", "0"),
    ("06", "--limit", "0"), ("06", "--batch-size", "-4"), ("06", "--max-new-tokens", "0"),
    ("06", "--tensor-parallel-size", "0"),
]


@pytest.mark.parametrize("stage, flag, value", BAD_VALUES)
def test_a_value_out_of_range_is_a_usage_error_naming_the_flag(stage, flag, value, data, tmp_path, capsys):
    line = refused(capsys, lambda: MAINS[stage](stage_argv(stage, data, tmp_path) + [flag, value]), f"argument {flag}")
    assert line.endswith(f"got {value!r}")


BAD_COMBINATIONS = [  # stage, flags, what the error names
    ("04", ["--eval-every", "2"], "--eval-every needs --eval-data"),
    ("04", ["--eval-data", "DATA"], "--eval-data needs --eval-every"),
    ("04", ["--min-lr", "1e-3", "--lr", "1e-4"], "--min-lr 0.001 is above --lr 0.0001"),
    ("04", ["--min-pixels", "5000", "--max-pixels", "4000"], "--min-pixels 5000 is above --max-pixels 4000"),
    ("05", ["--rollout-batch", "3", "--group-size", "2", "--train-batch", "4"],
     "--rollout-batch x --group-size (3 x 2) must be a multiple of --train-batch (4)"),
    ("05", ["--dual-clip", "0.5"], "--dual-clip must be 0 (off) or above 1, got 0.5"),
    ("05", ["--verifier-types", "digit,colour"], "unknown verifier_type 'colour'"),
    ("05", ["--eval-every", "1"], "--eval-every needs --eval-data"),
    ("05", ["--min-lr", "1e-5"], "--min-lr 1e-05 is above --lr 5e-06"),
    ("06", ["--min-pixels", "9", "--max-pixels", "4"], "--min-pixels 9 is above --max-pixels 4"),
    ("05", ["--vllm-gpu-memory", "0.5"], "--vllm-gpu-memory needs --rollout vllm"),
    ("01", ["--max-pixels", "50176"], "--max-pixels is read by --backend hf or vllm only, not toy"),
    ("02", ["--backend", "openai", "--max-model-len", "4096"], "--max-model-len is read by --backend vllm only"),
    ("03", ["--gpu-memory-utilization", "0.5"], "--gpu-memory-utilization is read by --backend vllm only"),
]


@pytest.mark.parametrize("stage, extra, why", BAD_COMBINATIONS)
def test_a_combination_no_run_can_do_is_refused_before_the_model_loads(stage, extra, why, data, tmp_path, capsys):
    extra = [data if a == "DATA" else a for a in extra]
    refused(capsys, lambda: MAINS[stage](stage_argv(stage, data, tmp_path) + extra), why)


@pytest.mark.parametrize("stage, flags_, world", [
    ("04", ["--global-batch", "8"], "3"),  # 8 samples cannot be shared evenly by 3 ranks: FSDP2 would hang
    ("05", ["--rollout-batch", "4", "--train-batch", "6"], "4"),
])
def test_batches_must_divide_over_the_ranks_torchrun_starts(stage, flags_, world, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world)  # checked from torchrun's variable, before any process group
    refused(capsys, lambda: MAINS[stage](stage_argv(stage, data, tmp_path) + flags_),
            f"divisible by the number of ranks ({world})")


def test_a_missing_data_file_is_named_before_the_model_loads(tmp_path):
    """Paths are checked once, by runs.check_inputs (tests/test_input_paths.py), right after the flags."""
    argv = stage_argv("04", str(tmp_path / "nowhere.jsonl"), tmp_path)
    with pytest.raises(SystemExit, match=f"^--data {tmp_path / 'nowhere.jsonl'}: does not exist"):
        sft.main(argv)


def test_toy_and_demo_numbers_are_checked_too(tmp_path, capsys):
    refused(capsys, lambda: toy.main(["make-data", str(tmp_path / "d"), "--n", "-5"]), "argument --n")
    refused(capsys, lambda: toy.main(["make-data", str(tmp_path / "d"), "--grid", "0"]), "argument --grid")
    refused(capsys, lambda: demo.main(["--seeds", "0"]), "argument --seeds")
    assert not (tmp_path / "d").exists()


def test_good_values_pass_and_keep_their_type(data, tmp_path):
    args = flags.parse(sft.p, stage_argv("04", data, tmp_path) + [
        "--max-steps", "3", "--grad-clip", "0.5", "--warmup-ratio", "0", "--min-lr", "0", "--cache-size", "0",
        "--eval-data", data, "--eval-every", "2"], flags.check_sft)
    assert (args.max_steps, args.grad_clip, args.warmup_ratio, args.cache_size, args.eval_every) == (3, 0.5, 0.0, 0, 2)
    args = flags.parse(grpo.p, stage_argv("05", data, tmp_path) + [
        "--group-size", "2", "--temperature", "1e-3", "--top-p", "1", "--dual-clip", "3", "--rollout-batch", "6",
        "--train-batch", "4", "--verifier-types", "digit,bbox"], flags.check_grpo)
    assert (args.group_size, args.temperature, args.top_p, args.dual_clip) == (2, 1e-3, 1.0, 3.0)
    args = distill.parse_args(stage_argv("02", data, tmp_path) + ["--temperature", "0", "--limit", "0"])
    assert (args.temperature, args.limit) == (0.0, 0)  # greedy; and --limit 0 reads nothing


def test_validators_refuse_nan_inf_and_text_and_name_the_range():
    assert (flags.positive_int("7"), flags.nonneg_float("0"), flags.fraction("1")) == (7, 0.0, 1.0)
    for validator, text in [(flags.positive_int, "0"), (flags.positive_int, "1.5"), (flags.nonneg_int, "-1"),
                            (flags.positive_float, "inf"), (flags.nonneg_float, "nan"), (flags.fraction, "0"),
                            (flags.probability, "-0.1"), (flags.at_least(2), "1")]:
        with pytest.raises(Exception, match=re.escape(f"must be {validator.range}, got {text!r}")):
            validator(text)


@pytest.mark.parametrize("module, flag, shown", [
    (sft, "--max-steps", "[an integer > 0]"), (sft, "--grad-clip", "[a number > 0]"),
    (grpo, "--group-size", "[an integer >= 2]"), (grpo, "--top-p", "[a number in (0, 1]]"),
    (distill, "--temperature", "[a number >= 0]"), (evaluate, "--limit", "[an integer > 0]"),
])
def test_help_shows_each_range(module, flag, shown, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {flag} "))  # the options list, not usage
    end = next(i for i in range(start + 1, len(lines) + 1) if i == len(lines) or lines[i].startswith("  -"))
    assert e.value.code == 0 and shown in " ".join(" ".join(lines[start:end]).split())  # argparse wraps help
