"""Training run folders know what made them: nothing is reused from another run, nothing is logged twice,
and a preempted run (SIGTERM) saves and resumes. 04 in-process, on the tiny model; 05 shares the code."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from test_sft import colour_sft_data

import toy

sft = importlib.import_module("04_sft")
grpo = importlib.import_module("05_grpo")


@pytest.fixture
def sft_args(tmp_path, tiny_model_dir):
    data = colour_sft_data(str(tmp_path / "d"))
    return ["--model", tiny_model_dir, "--data", data, "--global-batch", "8", "--micro-batch", "8", "--lr", "1e-3",
            "--min-lr", "1e-3", "--warmup-ratio", "0", "--save-every", "2"]


def steps_logged(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]


def test_a_fresh_run_refuses_a_folder_holding_another_run_unless_overwrite(tmp_path, sft_args):
    out = str(tmp_path / "o")
    sft.main(sft_args + ["--out", out, "--max-steps", "4"])
    with pytest.raises(SystemExit, match=r"holds a different run.*\n  flags.lr: 0.001 there, 0.002 now"):
        sft.main(sft_args + ["--out", out, "--max-steps", "4", "--lr", "2e-3"])
    with pytest.raises(SystemExit, match="already holds this run; resume it, or pass --overwrite"):
        sft.main(sft_args + ["--out", out, "--max-steps", "4"])  # the same run again: not silently redone
    sft.main(sft_args + ["--out", out, "--max-steps", "2", "--lr", "2e-3", "--overwrite"])
    assert steps_logged(out) == [1, 2]  # the old run's log went with its checkpoints
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ckpts == ["ckpt-2"]  # only this run's (the old run's ckpt-2 and ckpt-4 were deleted, not kept as "latest")


def test_resume_refuses_another_run_nothing_to_resume_and_a_finished_run(tmp_path, sft_args):
    out = str(tmp_path / "o")
    with pytest.raises(SystemExit, match="holds no run to resume"):
        sft.main(sft_args + ["--out", out, "--max-steps", "4", "--resume"])  # never silently starts fresh
    sft.main(sft_args + ["--out", out, "--max-steps", "4"])
    with pytest.raises(SystemExit, match=r"flags.global_batch: 8 there, 16 now"):
        sft.main(sft_args + ["--out", out, "--max-steps", "6", "--resume", "--global-batch", "16"])
    with pytest.raises(SystemExit, match="already at step 4 of 3"):
        sft.main(sft_args + ["--out", out, "--max-steps", "3", "--resume"])  # would overwrite the checkpoint
    toy.make_data(str(tmp_path / "rl"), n=8, test_n=0, seed=0, kinds="colour")
    with pytest.raises(SystemExit, match="holds a 04_sft run, not a 05_grpo one"):
        grpo.main(["--model", sft_args[1], "--data", str(tmp_path / "rl" / "train.jsonl"), "--out", out, "--resume",
                   "--rollout-batch", "4", "--train-batch", "16"])  # 05 pointed at 04's folder: no KeyError
    sft.main(sft_args + ["--out", out, "--max-steps", "6", "--resume"])  # extending a finished run is fine
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]


def test_a_run_called_in_process_leaves_sigterm_as_it_found_it(tmp_path, sft_args):
    before = signal.getsignal(signal.SIGTERM)
    sft.main(sft_args + ["--out", str(tmp_path / "o"), "--max-steps", "1"])
    assert signal.getsignal(signal.SIGTERM) is before  # a later SIGTERM (a CI timeout) still stops the caller


def test_a_resumed_run_logs_no_step_twice(tmp_path, sft_args):
    out = str(tmp_path / "o")
    sft.main(sft_args + ["--out", out, "--max-steps", "3"])  # checkpoints at 2 (save-every) and 3 (the end)
    # a run killed after step 5, its last checkpoint at step 4: steps 5 is logged but not saved
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 4}) + "\n" + json.dumps({"step": 5}) + "\n" + '{"step": 6, "lo')
    sft.main(sft_args + ["--out", out, "--max-steps", "5", "--resume"])
    assert steps_logged(out) == [1, 2, 3, 4, 5]  # cut back to the checkpoint's step 3, then 4 and 5 again


def test_sigterm_saves_and_resume_finishes_the_run(tmp_path, sft_args):
    from vlaa import checkpoints

    out = tmp_path / "o"
    args = sft_args + ["--save-every", "1000", "--out", str(out), "--max-steps", "40"]  # the last --save-every wins
    child = subprocess.Popen([sys.executable, "04_sft.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    while not (out / "metrics.jsonl").exists() and child.poll() is None:
        time.sleep(0.1)
    child.send_signal(signal.SIGTERM)  # a preempted job: the step in flight finishes, a checkpoint is written
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143 and "continue with --resume" in err, err[-3000:]
    saved = json.load(open(os.path.join(checkpoints.latest_checkpoint(str(out)), "trainer.json")))["step"]
    assert 1 <= saved < 40
    sft.main(args + ["--resume"])
    assert steps_logged(out) == list(range(1, 41))
