"""What 04 and 05 leave in their run folder, by example (issue 25): no NaN or Inf is ever written (a non-finite
loss or gradient norm stops the run naming the step and the last good checkpoint), a finished run whose export
is missing, torn or killed mid-write is exported again by --resume, a data file's content is part of the run's
identity, and an extended run's LR schedule is the documented one."""

import importlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from test_sft import colour_sft_data

import toy
from vlaa import checkpoints, export, training

sft = importlib.import_module("04_sft")
grpo = importlib.import_module("05_grpo")


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return colour_sft_data(str(tmp_path_factory.mktemp("sft")))


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rl"))
    toy.make_data(out, n=16, test_n=0, seed=0, kinds="colour")
    return os.path.join(out, "train.jsonl")


def sft_args(model, data, out, *extra):
    return ["--model", model, "--data", data, "--out", str(out), "--global-batch", "8", "--micro-batch", "8",
            "--lr", "1e-3", "--min-lr", "1e-3", "--warmup-ratio", "0", "--save-every", "2", *map(str, extra)]


def grpo_args(model, data, out, *extra):
    return ["--model", model, "--data", data, "--out", str(out), "--rollout-batch", "4", "--group-size", "2",
            "--train-batch", "8", "--micro-batch", "8", "--max-new-tokens", "8", "--temperature", "1.0",
            "--lr", "1e-3", "--min-lr", "1e-3", "--warmup-ratio", "0", "--kl-coef", "0", "--save-every", "2",
            *map(str, extra)]


def run(stage, model, data, out, *extra):
    """One 04 or 05 run in this process."""
    if stage == "04":
        return sft.main(sft_args(model, data, out, *extra))
    return grpo.main(grpo_args(model, data, out, *extra))


def all_finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def checkpoint_steps(out):
    return sorted(int(d.split("-")[1]) for d in os.listdir(os.path.join(out, "checkpoints")))


def steps_logged(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]


# ----------------------------------------------------------------------------------------------------
# Class 2: a non-finite loss or gradient norm stops the run; nothing non-finite is written


def inf_loss_at_step(n):
    """04's token_loss_sum, returning +inf for the n-th micro-batch (one per step here)."""
    real, calls = sft.token_loss_sum, []

    def patched(model, batch):
        loss, count = real(model, batch)
        calls.append(1)
        return (loss * float("inf") if len(calls) == n else loss), count
    return patched


def nan_parameter_at_step(n, real):
    """The stage's update function, with a NaN written into one trained weight before the n-th call."""
    calls = []

    def patched(model, *args, **kw):
        calls.append(1)
        if len(calls) == n:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
        return real(model, *args, **kw)
    return patched


@pytest.mark.parametrize("how", ["inf loss", "NaN weight", "lr 1e10"])
def test_04_stops_at_a_nonfinite_step_naming_it_and_the_last_good_checkpoint(tmp_path, tiny_model_dir, sft_data,
                                                                             monkeypatch, how):
    out, extra = tmp_path / "o", []
    if how == "inf loss":
        monkeypatch.setattr(sft, "token_loss_sum", inf_loss_at_step(3))
    elif how == "NaN weight":
        monkeypatch.setattr(sft, "train_step", nan_parameter_at_step(3, sft.train_step))
    else:  # a flag setting that blows up on the second step
        extra = ["--lr", "1e10", "--save-every", "1"]
    with pytest.raises(SystemExit) as e:
        run("04", tiny_model_dir, sft_data, out, "--max-steps", 6, *extra)
    bad_step, last_good = (2, 1) if how == "lr 1e10" else (3, 2)
    assert f"step {bad_step}: the " in str(e.value) and "that update was not applied" in str(e.value)
    assert f"checkpoints/ckpt-{last_good}: --resume continues from it" in str(e.value)
    assert checkpoint_steps(out) == [last_good] and not os.path.exists(out / "model")
    assert all_finite(load_file(str(out / "checkpoints" / f"ckpt-{last_good}" / "rank-0.safetensors")))
    monkeypatch.undo()
    if how != "lr 1e10":  # the cause is gone: --resume finishes from the last good checkpoint
        run("04", tiny_model_dir, sft_data, out, "--max-steps", 6, "--resume")
        assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
        assert all_finite(load_file(str(out / "model" / "model.safetensors")))


def test_05_stops_at_a_nonfinite_step_naming_it_and_the_last_good_checkpoint(tmp_path, tiny_model_dir, rl_data,
                                                                             monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setattr(grpo, "update_policy", nan_parameter_at_step(3, grpo.update_policy))
    with pytest.raises(SystemExit, match=r"step 3: the gradient norm is nan.*ckpt-2: --resume continues"):
        run("05", tiny_model_dir, rl_data, out, "--max-steps", 4)
    assert checkpoint_steps(out) == [2] and not os.path.exists(out / "model")
    assert all_finite(load_file(str(out / "checkpoints" / "ckpt-2" / "rank-0.safetensors")))


def test_an_update_with_a_nonfinite_gradient_changes_nothing(tiny_model_dir):
    from test_checkpoints import tiny_trainer

    model, opt = tiny_trainer(tiny_model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(3, 60, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # one good step: AdamW has moments and weight decay would still move the weights
    before = {n: t.clone() for n, t in checkpoints.rank_state(model, opt)[0].items() if not n.startswith("rng/")}
    (model(input_ids=ids, labels=ids).loss * float("nan")).backward()
    assert math.isnan(training.clip_grad_norm(params, 1.0))  # the gradients are dropped
    assert all(p.grad is None for p in params)
    opt.step()
    after = checkpoints.rank_state(model, opt)[0]
    assert all(torch.equal(before[n], after[n]) for n in before)
    with pytest.raises(SystemExit, match="step 7: the gradient norm is nan"):
        training.checkpoint_if_due("/nonexistent", 7, 10, 5, lambda: False, model, opt, {},
                                   {"rank": 0, "world": 1, "device": torch.device("cpu"), "master": True}, "r")


@pytest.mark.parametrize("where", ["weight", "optimizer moment"])
def test_save_and_export_refuse_a_nonfinite_tensor(tmp_path, tiny_model_dir, tiny, where):
    from test_checkpoints import tiny_trainer, train

    model, opt = tiny_trainer(tiny_model_dir)
    train(model, opt, 1)
    checkpoints.save_checkpoint(str(tmp_path), 1, model, opt, {}, run_id="r")
    name, p = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        (p if where == "weight" else opt.state[p]["exp_avg_sq"]).view(-1)[0] = float("inf")
    key = f"model/{name}" if where == "weight" else f"optim/{name}/exp_avg_sq"
    with pytest.raises(ValueError, match=f"not writing .*ckpt-2: 1 tensor.* hold NaN or Inf \\({key}\\)"):
        checkpoints.save_checkpoint(str(tmp_path), 2, model, opt, {}, run_id="r")
    assert checkpoint_steps(str(tmp_path)) == [1]  # nothing of step 2, not even a folder
    if where == "weight":
        _, tok, ip = tiny
        with pytest.raises(ValueError, match=f"not writing .*model: .* hold NaN or Inf \\({name}"):
            export.export_hf(model, tok, ip, str(tmp_path / "model"))
        assert sorted(os.listdir(tmp_path)) == ["checkpoints"]


# ----------------------------------------------------------------------------------------------------
# Class 3: a finished run can always be recovered (atomic export; --resume exports again)


def finished(stage, model, data, out):
    run(stage, model, data, out, "--max-steps", 2)
    return {k: v.clone() for k, v in load_file(str(out / "model" / "model.safetensors")).items()}  # not the mmap


def tear(how, model_dir):
    if how == "missing":
        shutil.rmtree(model_dir)
    elif how == "truncated weights":
        path = model_dir / "model.safetensors"
        os.truncate(path, os.path.getsize(path) // 2)
    elif how == "no image processor":
        os.remove(model_dir / "preprocessor_config.json")


@pytest.mark.parametrize("stage", ["04", "05"])
@pytest.mark.parametrize("how", ["missing", "truncated weights", "no image processor"])
def test_resume_exports_a_finished_run_whose_export_is_missing_or_torn(tmp_path, tiny_model_dir, sft_data, rl_data,
                                                                       stage, how, capsys):
    data, out = (sft_data if stage == "04" else rl_data), tmp_path / "o"
    exported = finished(stage, tiny_model_dir, data, out)
    tear(how, out / "model")
    assert not export.export_complete(str(out / "model"))
    run(stage, tiny_model_dir, data, out, "--max-steps", 2, "--resume")
    assert "at step 2: training had ended" in capsys.readouterr().out
    assert export.export_complete(str(out / "model"))
    again = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(exported[k], again[k]) for k in exported)  # the same weights: the last checkpoint's
    assert steps_logged(out) == [1, 2]  # nothing retrained, nothing logged twice
    with pytest.raises(SystemExit, match="already at step 2 of 2; raise --max-steps"):
        run(stage, tiny_model_dir, data, out, "--max-steps", 2, "--resume")


KILL_IN_EXPORT = """
import os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
import transformers
cls = {cls}
real = cls.save_pretrained
def killed(self, *args, **kw):
    {before}
    os.kill(os.getpid(), signal.SIGKILL)
cls.save_pretrained = killed
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("stage", ["04", "05"])
@pytest.mark.parametrize("when", ["after the weights", "before the image processor"])
def test_sigkill_during_the_export_leaves_no_torn_model_and_resume_exports(tmp_path, tiny_model_dir, sft_data,
                                                                           rl_data, stage, when):
    data, out = (sft_data if stage == "04" else rl_data), tmp_path / "o"
    straight = finished(stage, tiny_model_dir, data, tmp_path / "straight")
    cls, before = ("transformers.PreTrainedModel", "real(self, *args, **kw)") if when == "after the weights" else \
        ("transformers.image_processing_utils.ImageProcessingMixin", "pass")
    script = tmp_path / "kill.py"
    script.write_text(KILL_IN_EXPORT.format(cls=cls, before=before))
    args = sft_args if stage == "04" else grpo_args
    r = subprocess.run([sys.executable, str(script), "04_sft.py" if stage == "04" else "05_grpo.py",
                        *args(tiny_model_dir, data, out, "--max-steps", 2)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert not os.path.exists(out / "model")  # complete or absent, never torn
    run(stage, tiny_model_dir, data, out, "--max-steps", 2, "--resume")
    again = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(straight[k], again[k]) for k in straight) and steps_logged(out) == [1, 2]


# ----------------------------------------------------------------------------------------------------
# Class 4: the data file's content is part of the run's identity


def same_size_edits(path):
    """Edits that keep the file's size: yield a description after each (the file restored in between)."""
    original = open(path, "rb").read()
    lines = original.splitlines(keepends=True)
    shuffled = lines[:]
    random.Random(0).shuffle(shuffled)
    i = original.index(b"red")
    for what, data in [("shuffled lines", b"".join(shuffled)), ("one byte", original[:i] + b"Red" + original[i + 3:]),
                       ("two lines swapped", b"".join([lines[1], lines[0], *lines[2:]]))]:
        assert data != original and len(data) == len(original)
        open(path, "wb").write(data)
        yield what
    open(path, "wb").write(original)


def test_resume_refuses_a_data_file_changed_in_content_but_not_size(tmp_path, tiny_model_dir):
    data, out = colour_sft_data(str(tmp_path / "d")), tmp_path / "o"
    run("04", tiny_model_dir, data, out, "--max-steps", 2)
    for what in same_size_edits(data):
        with pytest.raises(SystemExit, match=r"holds a different run.*\n  data.sha256: "):
            run("04", tiny_model_dir, data, out, "--max-steps", 3, "--resume")
    os.utime(data, (1, 1))  # the same bytes, touched: still the same run
    run("04", tiny_model_dir, data, out, "--max-steps", 3, "--resume")
    assert steps_logged(out) == [1, 2, 3]


# ----------------------------------------------------------------------------------------------------
# Class 12: extending a finished run continues the LR schedule as README says


def test_extending_a_finished_run_follows_the_schedule_of_the_new_total_without_warming_up_again(
        tmp_path, tiny_model_dir, sft_data, capsys):
    out = tmp_path / "o"
    schedule = ["--lr", "1e-3", "--min-lr", "0", "--warmup-ratio", "0.5"]
    run("04", tiny_model_dir, sft_data, out, "--max-steps", 2, *schedule)  # warmup: 1 step of 2
    run("04", tiny_model_dir, sft_data, out, "--max-steps", 8, *schedule, "--resume")
    said = capsys.readouterr().out
    assert "planned for 2 steps, now 8: from step 2 on, the LR follows the schedule of 8 steps" in said
    lrs = [json.loads(line)["lr"] for line in open(out / "metrics.jsonl")]
    assert lrs[:2] == [0.0, 1e-3]  # the first run: warmup 1, then the cosine of 2 steps
    # steps 3-8: the cosine of 8 steps at the same step, its warmup still 1 (not ceil(0.5 * 8) = 4 again)
    assert lrs[2:] == pytest.approx([training.cosine_lr(u, 8, 1e-3, warmup=1) for u in range(2, 8)])
    assert lrs[2] == pytest.approx(1e-3 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 7)).item()))
