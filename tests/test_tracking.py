"""--report-to (vlaa/tracking.py): every metric a run logs reaches TensorBoard or W&B with the run's arguments as
config, read back offline: TensorBoard's event files with its own EventAccumulator, a W&B offline run from its
.wandb file (records of wandb's protobuf, framed as in LevelDB's log format)."""

import glob
import importlib
import json
import os
import struct
from types import SimpleNamespace

import pytest

import toy
from vlaa import tracking

sft = importlib.import_module("04_sft")
grpo = importlib.import_module("05_grpo")


def tensorboard_scalars(folder):
    """{tag: [(step, value)]} and the config text of the event files in folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = [e.tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"] for e in acc.Tensors(t)]
    return scalars, texts


def wandb_records(out):
    """The history rows {"step", metric: value} and the config {key: value} of the offline W&B run in OUT."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    data, pos, part, history, config = open(path, "rb").read(), 7, b"", [], {}  # 7: ':W&B', magic, version
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])  # crc32, length, FULL 1 / FIRST 2 / MIDDLE 3 / LAST 4
        part, pos = part + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(part)
            part = b""
            if rec.WhichOneof("record_type") == "history":
                history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item})
            elif rec.WhichOneof("record_type") == "run":
                config = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
    return [dict(h, step=h["_step"]) for h in history], config


def test_tensorboard_gets_every_metric_and_the_config(tmp_path):
    pytest.importorskip("tensorboard")
    t = tracking.start(SimpleNamespace(out=str(tmp_path), report_to="tensorboard", lr=0.5), "04_sft", "id", True)
    tracking.log(t, {"step": 1, "loss": 2.0, "eval/accuracy": 0.25, "note": "text is not a scalar"})
    tracking.log(t, {"step": 2, "loss": 1.5})
    tracking.finish(t)
    scalars, texts = tensorboard_scalars(str(tmp_path / "tensorboard"))
    assert scalars == {"loss": [(1, 2.0), (2, 1.5)], "eval/accuracy": [(1, 0.25)]}
    assert '"lr": 0.5' in texts[0] and '"stage": "04_sft"' in texts[0]
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]  # the JSONL as before


def test_wandb_offline_gets_every_metric_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = tracking.start(SimpleNamespace(out=str(tmp_path), report_to="wandb", lr=0.5), "05_grpo", "0123abcd", True)
    tracking.log(t, {"step": 1, "reward": 0.25, "reward/mcq": 1.0})
    tracking.log(t, {"step": 2, "reward": 0.5})
    tracking.finish(t)
    history, config = wandb_records(str(tmp_path))
    assert [(h["step"], h["reward"]) for h in history] == [(1, 0.25), (2, 0.5)] and history[0]["reward/mcq"] == 1.0
    assert config["lr"] == 0.5 and config["stage"] == "05_grpo"


def test_other_ranks_and_none_write_no_tracker(tmp_path):
    t = tracking.start(SimpleNamespace(out=str(tmp_path), report_to="tensorboard"), "04_sft", "id", master=False)
    tracking.log(t, {"step": 1, "loss": 1.0})
    assert os.listdir(tmp_path) == []
    t = tracking.start(SimpleNamespace(out=str(tmp_path), report_to="none"), "04_sft", "id", True)
    tracking.log(t, {"step": 1, "loss": 1.0})
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("track-data")
    toy.make_data(str(root), n=32, test_n=0, seed=0, kinds="colour", responses=True)
    return str(root / "train.jsonl")


def test_05_reports_to_tensorboard_every_metric_of_metrics_jsonl(tmp_path, tiny_model_dir, toy_data):
    pytest.importorskip("tensorboard")
    out = tmp_path / "grpo"
    argv = ["--model", tiny_model_dir, "--data", toy_data, "--out", str(out), "--rollout-batch", "2",
            "--group-size", "2", "--train-batch", "4", "--max-new-tokens", "4", "--max-steps", "2", "--kl-coef", "0"]
    grpo.main(argv + ["--report-to", "tensorboard"])
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    scalars, texts = tensorboard_scalars(str(out / "tensorboard"))
    assert set(scalars) == {k for m in logged for k in m if k != "step"}
    assert scalars["reward"] == [(m["step"], m["reward"]) for m in logged]
    assert '"report_to": "tensorboard"' in texts[0] and '"group_size": 2' in texts[0]
    grpo.main(argv + ["--overwrite", "--max-steps", "1"])  # a fresh run: the old events go with the old logs
    assert not (out / "tensorboard").exists()


def test_04_reports_to_wandb_offline(tmp_path, tiny_model_dir, toy_data, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "sft"
    sft.main(["--model", tiny_model_dir, "--data", toy_data, "--out", str(out), "--global-batch", "4",
              "--micro-batch", "4", "--max-steps", "2", "--report-to", "wandb"])
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    history, config = wandb_records(str(out))
    assert [(h["step"], h["loss"]) for h in history] == [(m["step"], pytest.approx(m["loss"])) for m in logged]
    assert config["global_batch"] == 4 and config["stage"] == "04_sft"


def test_a_missing_tracker_package_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(
        ImportError(name=name)) if name == "wandb" else real_import(name, *a, **k))
    with pytest.raises(SystemExit, match=r"--report-to wandb: wandb is not installed \(pip install -e '.\[track\]'\)"):
        tracking.start(SimpleNamespace(out=str(tmp_path), report_to="wandb"), "05_grpo", "id", True)
