"""vlaa/checkpoints.py by example: resume equals a straight run (1 and 2 ranks), a crafted checkpoint runs
nothing, half-written checkpoints are never picked, other runs' checkpoints are kept, SIGTERM saves."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file

from vlaa import checkpoints, qwen, training

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_trainer(model_dir, world=1, device="cpu"):
    """The tiny model (vision frozen, sharded under torchrun) and its AdamW, as 04_sft.py builds them."""
    model, _, _ = qwen.load_model(model_dir, "float32", device)
    training.freeze_vision_tower(model)
    model = training.shard_model(model.train(), torch.device(device), world)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def train(model, optimizer, steps):
    """Optimizer steps on random token ids: the draws come from the torch RNG, so a resume must restore it."""
    for _ in range(steps):
        ids = torch.randint(3, 60, (2, 10))  # [B, L]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def saved_model(folder):
    return {k: v for k, v in load_file(os.path.join(folder, "rank-0.safetensors")).items() if k.startswith("model/")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_dir):
    """A one-process checkpoint after 2 steps: (OUT, its folder, the weights 2 steps later)."""
    out = str(tmp_path_factory.mktemp("saved"))
    torch.manual_seed(0)
    model, opt = tiny_trainer(tiny_model_dir)
    train(model, opt, 2)
    folder = checkpoints.save_checkpoint(out, 2, model, opt, {"samples_seen": 16}, run_id="run-a")
    train(model, opt, 2)
    return out, folder, weights(model)


def test_resume_continues_exactly_like_the_straight_run(saved, tiny_model_dir):
    out, folder, straight = saved
    assert sorted(os.listdir(folder)) == ["DONE", "rank-0.json", "rank-0.safetensors", "trainer.json"]
    torch.manual_seed(123)  # another seed: the checkpoint's RNG must win
    model, opt = tiny_trainer(tiny_model_dir)
    state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(out), model, opt)
    assert state == {"samples_seen": 16, "step": 2, "world": 1, "run_id": "run-a"}
    train(model, opt, 2)
    resumed = weights(model)
    assert max(float((straight[n] - resumed[n]).abs().max()) for n in straight) < 1e-6


def test_a_crafted_checkpoint_runs_no_code(tmp_path, saved, tiny_model_dir):
    marker = tmp_path / "pwned"

    class Bomb:  # unpickling it writes the marker file
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    bomb = pickle.dumps(Bomb())
    pickle.loads(bomb)  # the bomb is live: a plain pickle load runs it
    assert marker.exists()
    marker.unlink()
    model, opt = tiny_trainer(tiny_model_dir)
    _, good, _ = saved

    def crafted(name, files, copy_good=True):
        """A complete-looking ckpt-2 in its own OUT: the good checkpoint's files, then `files` written over."""
        folder = tmp_path / name / "checkpoints" / "ckpt-2"
        folder.mkdir(parents=True)
        for f in os.listdir(good) if copy_good else ["DONE"]:
            (folder / f).write_bytes(open(os.path.join(good, f), "rb").read())
        for f, data in files.items():
            (folder / f).write_bytes(data)
        return str(folder)

    def refused(folder, why):
        with pytest.raises(ValueError, match=why):
            checkpoints.load_checkpoint(folder, model, opt)

    # a torch.distributed.checkpoint folder: .metadata, shards and RNG files that are pickles
    old = crafted("old", {".metadata": bomb, "__0_0.distcp": bomb, "rng-0.pt": bomb,
                          "trainer.json": b'{"step": 1}'}, copy_good=False)
    assert checkpoints.latest_checkpoint(str(tmp_path / "old")) == old
    refused(old, "not a checkpoint of this format")
    # the rank's tensor file is a pickle, has an oversized header, or points outside itself
    refused(crafted("pickled", {"rank-0.safetensors": bomb}), "not a valid safetensors file")
    huge = (2**62).to_bytes(8, "little") + b"{}"
    refused(crafted("huge", {"rank-0.safetensors": huge}), "not a valid safetensors file")
    header = json.dumps({"model/x": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}}).encode()
    lying = len(header).to_bytes(8, "little") + header + b"\0" * 8
    refused(crafted("lying", {"rank-0.safetensors": lying}), "not a valid safetensors file")
    # JSON of the wrong shape
    refused(crafted("json", {"rank-0.json": b'{"param_groups": "all"}'}), "rank-0.json")
    # foreign pickles next to a good checkpoint are never opened
    checkpoints.load_checkpoint(crafted("extra", {"optim.pt": bomb, ".metadata": bomb}), model, opt)
    assert not marker.exists()


def test_a_checkpoint_of_another_shape_is_refused_by_tensor_name(tmp_path, saved, tiny_model_dir):
    _, good, _ = saved
    folder = tmp_path / "ckpt-2"
    shutil.copytree(good, folder)
    tensors = load_file(os.path.join(good, "rank-0.safetensors"))
    key = "model/model.language_model.embed_tokens.weight"
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(folder / "rank-0.safetensors"))
    model, opt = tiny_trainer(tiny_model_dir)
    with pytest.raises(ValueError, match="embed_tokens.weight' is torch.float32"):
        checkpoints.load_checkpoint(str(folder), model, opt)


def test_a_half_written_checkpoint_is_never_picked(tmp_path, saved, tiny_model_dir):
    out, good, _ = saved
    root = tmp_path / "checkpoints"
    for name in ("ckpt-2", "ckpt-9"):  # ckpt-9: every file but DONE (the writer was killed)
        shutil.copytree(good, root / name, ignore=None if name == "ckpt-2" else shutil.ignore_patterns("DONE"))
    (root / "ckpt-11.tmp").mkdir()  # not a checkpoint name
    assert checkpoints.latest_checkpoint(str(tmp_path)) == str(root / "ckpt-2")
    model, opt = tiny_trainer(tiny_model_dir)
    with pytest.raises(ValueError, match="no DONE file"):
        checkpoints.load_checkpoint(str(root / "ckpt-9"), model, opt)


def test_another_world_size_is_a_clear_error(tmp_path, saved, tiny_model_dir):
    _, good, _ = saved
    folder = tmp_path / "ckpt-2"
    shutil.copytree(good, folder)
    (folder / "trainer.json").write_text(json.dumps({"step": 2, "world": 2}))
    model, opt = tiny_trainer(tiny_model_dir)
    with pytest.raises(ValueError, match=r"written by 2 rank\(s\); this run has 1.*resharding"):
        checkpoints.load_checkpoint(str(folder), model, opt)


def test_pruning_keeps_other_runs_checkpoints(tmp_path, tiny_model_dir):
    model, opt = tiny_trainer(tiny_model_dir)
    out = str(tmp_path)

    def save(step, run):
        checkpoints.save_checkpoint(out, step, model, opt, {}, run_id=run)

    save(1, "a"), save(2, "a"), save(3, "b")
    os.remove(os.path.join(out, "checkpoints", "ckpt-3", "DONE"))  # b was killed mid-save: stays b's business
    save(4, "a")
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["ckpt-2", "ckpt-3", "ckpt-4"]
    save(5, "b")
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["ckpt-2", "ckpt-4", "ckpt-5"]
    assert checkpoints.latest_checkpoint(out, run_id="a").endswith("ckpt-4")
    assert checkpoints.latest_checkpoint(out, run_id="b").endswith("ckpt-5")
    assert checkpoints.latest_checkpoint(out, run_id="c") is None


@pytest.mark.parametrize("total,every", [(1, 1), (9, 1), (10, 1), (49, 5), (190, 19), (1000, 100)])
def test_default_cadence_is_a_tenth_of_the_run(total, every):
    assert checkpoints.default_save_every(total) == every


# ----------------------------------------------------------------------------------------------------
# Two ranks under torchrun (FSDP2, gloo): the same round trip, each rank with its own shards and RNG

TWO_RANKS = """
import json, sys
sys.path[:0] = [{here!r}, {root!r}]
import torch
from test_checkpoints import tiny_trainer, train
from vlaa import checkpoints, training

out, model_dir = sys.argv[1:]
env = training.init_distributed()
torch.manual_seed(env["rank"])
model, opt = tiny_trainer(model_dir, env["world"])
train(model, opt, 2)
checkpoints.save_checkpoint(out, 2, model, opt, {{"samples_seen": 16}}, env["rank"])
train(model, opt, 2)
straight = {{n: p.full_tensor() for n, p in model.named_parameters()}}
torch.manual_seed(99)
model, opt = tiny_trainer(model_dir, env["world"])
state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(out), model, opt, env["rank"])
train(model, opt, 2)
diff = max(float((p.full_tensor() - straight[n]).abs().max()) for n, p in model.named_parameters())
flags = [training.any_rank(env["rank"] == 1, env["world"]), training.any_rank(False, env["world"])]
if env["master"]:
    json.dump({{"diff": diff, "state": state, "flags": flags}}, open(out + "/result.json", "w"))
"""


def test_two_ranks_resume_from_their_own_shards(tmp_path, tiny_model_dir):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(here=HERE, root=ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                        str(tmp_path), tiny_model_dir], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["diff"] < 1e-6 and result["flags"] == [True, False]
    assert result["state"] == {"samples_seen": 16, "step": 2, "world": 2, "run_id": None}
    folder = checkpoints.latest_checkpoint(str(tmp_path))
    shards = [load_file(os.path.join(folder, f"rank-{r}.safetensors")) for r in (0, 1)]
    key = "model/model.language_model.embed_tokens.weight"
    model, opt = tiny_trainer(tiny_model_dir)
    full = dict(model.named_parameters())[key[len("model/"):]]
    assert shards[0][key].shape[0] + shards[1][key].shape[0] == full.shape[0]  # dim 0 split, nothing gathered
    with pytest.raises(ValueError, match=r"written by 2 rank\(s\); this run has 1"):
        checkpoints.load_checkpoint(folder, model, opt)


# ----------------------------------------------------------------------------------------------------
# SIGTERM: the loop finishes its step, saves, exits with 143; --resume then ends where a straight run ends


ONE_PROCESS = {"rank": 0, "world": 1, "device": torch.device("cpu")}


def toy_loop(out, model_dir, total, resume=False, delay=0.0):
    """A training loop wired like 04_sft.py: save every 100 steps, on SIGTERM, and at the end."""
    stop = training.install_sigterm_handler()
    torch.manual_seed(0)
    model, opt = tiny_trainer(model_dir)
    ckpt = checkpoints.latest_checkpoint(out, run_id="r") if resume else None
    start = checkpoints.load_checkpoint(ckpt, model, opt)["step"] if ckpt else 0
    for step in range(start, total):
        train(model, opt, 1)
        print(f"step {step + 1}", flush=True)
        time.sleep(delay)
        training.checkpoint_if_due(out, step + 1, total, 100, stop, model, opt, {}, ONE_PROCESS, "r")
    checkpoints.save_checkpoint(out, total, model, opt, {}, run_id="r")
    training.restore_sigterm_handler()  # as finish_training does: this loop also runs inside pytest


def set_and_sleep(event, seconds):
    event.set()
    time.sleep(seconds)


def test_a_forked_child_of_a_trainer_still_dies_of_sigterm():
    """The flag is the trainer's alone: a forked worker (multiprocessing, a DataLoader) inherits the handler but
    must still end on SIGTERM, or Pool.terminate waits for it forever."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    running = fork.Event()
    training.install_sigterm_handler()
    child = fork.Process(target=set_and_sleep, args=(running, 60))
    try:
        child.start()
        # wait until it runs: CPython drops signals that reach a child before its fork bookkeeping is done
        assert running.wait(timeout=30)
        child.terminate()  # SIGTERM
        child.join(timeout=10)
        assert child.exitcode == -signal.SIGTERM
    finally:
        training.restore_sigterm_handler()
        if child.is_alive():
            child.kill()


def test_sigterm_saves_and_resume_continues(tmp_path, tiny_model_dir):
    toy_loop(str(tmp_path / "straight"), tiny_model_dir, total=8)
    code = (f"import sys; sys.path[:0] = [{HERE!r}, {ROOT!r}]; from test_checkpoints import toy_loop; "
            f"toy_loop({str(tmp_path / 'halves')!r}, {tiny_model_dir!r}, 8, resume='--resume' in sys.argv, "
            f"delay=0 if '--resume' in sys.argv else 0.3)")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline() == "step 1\n"
    child.send_signal(signal.SIGTERM)  # mid-run: the step in flight finishes, then the save
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143, err[-3000:]
    assert "SIGTERM: stopped after step" in err and "continue with --resume" in err
    last = checkpoints.latest_checkpoint(str(tmp_path / "halves"), run_id="r")
    saved_at = json.load(open(os.path.join(last, "trainer.json")))["step"]
    assert 1 <= saved_at < 8
    r = subprocess.run([sys.executable, "-c", code, "--resume"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [w for s in range(saved_at + 1, 9) for w in ("step", str(s))]
    a = saved_model(checkpoints.latest_checkpoint(str(tmp_path / "straight")))
    b = saved_model(checkpoints.latest_checkpoint(str(tmp_path / "halves")))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
