"""One writer per output (vlaa/locks.py), with real concurrent processes: while one process writes an output, a
second start of any stage on it stops at once, naming the first; when the first ends (even by SIGKILL) the
output is free again."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, rows
from test_sft import colour_sft_data

import toy
from vlaa import locks

caption = importlib.import_module("01_caption")

HOLD = f"""
import sys
sys.path.insert(0, {ROOT!r})
from vlaa import locks
locks.hold(sys.argv[1])
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("locks")
    toy.make_data(str(root), n=16, test_n=4, seed=0, kinds="colour")
    caption.main(["--in", str(root / "train.jsonl"), "--out", str(root / "captioned.jsonl")])
    return {"train": str(root / "train.jsonl"), "test": str(root / "test.jsonl"),
            "captioned": str(root / "captioned.jsonl"), "sft": colour_sft_data(str(root / "sft"))}


def holder(lock_path):
    """A process that holds lock_path the way every stage does, until its stdin closes."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "held\n"
    return child


def second_start(argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


def wait_for_lock(lock_path, pid, timeout=120):
    """Until the process `pid` has written its name into the lock file (it holds the lock from then on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(open(lock_path).read() or "{}").get("pid") == pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{lock_path} was not taken by {pid}")


def stage_argv(stage, data, out, model):
    return {
        "01": ["01_caption.py", "--in", data["train"], "--out", out],
        "02": ["02_distill.py", "--in", data["captioned"], "--out", out, "--model", "reasoner:error_rate=0"],
        "03": ["03_rewrite_verify.py", "--in", data["train"], "--out", out, "--judge-model", "judge"],
        "04": ["04_sft.py", "--model", model, "--data", data["sft"], "--out", out, "--global-batch", "8",
               "--micro-batch", "8", "--max-steps", "2"],
        "05": ["05_grpo.py", "--model", model, "--data", data["train"], "--out", out, "--rollout-batch", "4",
               "--group-size", "2", "--train-batch", "8", "--max-new-tokens", "8", "--max-steps", "2"],
        "06": ["06_eval.py", "--model", model, "--bench", "toy", "--data-dir", data["test"], "--out", out,
               "--backend", "hf", "--limit", "2"],
    }[stage]


@pytest.mark.parametrize("stage", ["01", "02", "03", "04", "05", "06"])
def test_a_second_writer_of_any_stage_is_refused_at_once_naming_the_first(tmp_path, data, tiny_model_dir, stage):
    to_file = stage in ("01", "02")  # their --out is a file, locked beside it; the others' a folder, inside
    out = tmp_path / ("out.jsonl" if to_file else "out")
    lock = tmp_path / "out.jsonl.lock" if to_file else out / ".lock"
    first = holder(lock)
    try:
        r = second_start(stage_argv(stage, data, str(out), tiny_model_dir))
        assert r.returncode == 1, r.stderr[-3000:]
        assert f"{out} is being written by pid {first.pid} on " in r.stderr, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        assert os.listdir(tmp_path) == [lock.name if to_file else out.name]  # nothing written
        assert to_file or os.listdir(out) == [".lock"]
    finally:
        first.stdin.close()
        first.wait(timeout=30)


def test_two_02s_on_one_output_write_each_record_once(tmp_path, data):
    out = tmp_path / "distilled.jsonl"
    first = subprocess.Popen([sys.executable, *stage_argv("02", data, str(out), None)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lock(str(out) + ".lock", first.pid)
        first.send_signal(signal.SIGSTOP)  # holds the lock, mid-run or not: deterministic
        r = second_start(stage_argv("02", data, str(out), None))
        assert r.returncode == 1 and f"being written by pid {first.pid}" in r.stderr, r.stderr[-3000:]
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    ids = [r["id"] for r in rows(str(out))]
    assert len(ids) == len(set(ids)) == 16


def test_two_resumes_of_one_training_run_log_each_step_once(tmp_path, data, tiny_model_dir):
    out = tmp_path / "sft"
    argv = stage_argv("04", data, str(out), tiny_model_dir)
    assert second_start(argv).returncode == 0  # a finished 2-step run, extended below by two --resume at once
    argv[argv.index("--max-steps") + 1] = "12"
    first = subprocess.Popen([sys.executable, *argv, "--resume"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lock(str(out / ".lock"), first.pid)
        first.send_signal(signal.SIGSTOP)
        r = second_start(argv + ["--resume"])
        assert r.returncode == 1 and f"being written by pid {first.pid}" in r.stderr, r.stderr[-3000:]
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == list(range(1, 13))


def test_a_lock_of_a_killed_process_is_free_and_a_process_may_take_its_own_again(tmp_path):
    lock = tmp_path / "o" / ".lock"
    first = holder(lock)
    first.kill()  # SIGKILL: no cleanup ran, the lock file stays
    first.wait()
    assert lock.exists()
    locks.hold(str(lock))  # the kernel dropped the dead holder's lock
    locks.hold(str(lock))  # this process again (a stage called twice in one process): fine
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    other = subprocess.run([sys.executable, "-c", HOLD, str(lock)], capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and f"being written by pid {os.getpid()}" in other.stderr
    locks.release(str(lock))
    again = holder(lock)  # released: another process takes it
    again.kill()
    again.wait()


def test_under_torchrun_rank_0_holds_the_lock_and_every_rank_stops(tmp_path, data, tiny_model_dir):
    out = tmp_path / "sft"
    first = holder(out / ".lock")
    try:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            *stage_argv("04", data, str(out), tiny_model_dir)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    finally:
        first.stdin.close()
        first.wait(timeout=30)
    assert r.returncode != 0 and r.stderr.count(f"being written by pid {first.pid}") == 1, r.stderr[-3000:]
    assert os.listdir(out) == [".lock"]
