"""vlaa/runs.py by example: a run folder is claimed once, resumed by the same run, refused to any other."""

import json
import os

import pytest

from vlaa import runs


def fake_model(folder, config='{"hidden_size": 8}', weights=(("model.safetensors", 100),)):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(config)
    for name, size in weights:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"\0" * size)
    return str(folder)


def test_fingerprint_reads_config_and_weight_names_and_sizes_not_bytes(tmp_path):
    a = runs.fingerprint_model(fake_model(tmp_path / "a"))
    assert set(a) == {"path", "config", "weights"} and a["path"] == os.path.realpath(tmp_path / "a")
    same_sizes = runs.fingerprint_model(fake_model(tmp_path / "b"))
    assert (same_sizes["config"], same_sizes["weights"]) == (a["config"], a["weights"])  # bytes are not read
    resized = runs.fingerprint_model(fake_model(tmp_path / "c", weights=(("model.safetensors", 101),)))
    other_config = runs.fingerprint_model(fake_model(tmp_path / "d", config='{"hidden_size": 16}'))
    assert resized["weights"] != a["weights"] and other_config["config"] != a["config"]
    assert runs.fingerprint_model("Qwen/Qwen2.5-VL-3B-Instruct") == {"path": "Qwen/Qwen2.5-VL-3B-Instruct"}


def test_claim_writes_run_json_then_resumes_quietly(tmp_path):
    out = str(tmp_path / "run")
    identity = runs.run_identity(model={"path": "/m"}, rules="vlmevalkit", max_new_tokens=800, pixels=(1, 2))
    runs.claim_run(out, identity)
    with open(os.path.join(out, "run.json")) as f:
        assert json.load(f) == {"max_new_tokens": 800, "model": {"path": "/m"}, "pixels": [1, 2],
                                "rules": "vlmevalkit"}
    runs.claim_run(out, runs.run_identity(rules="vlmevalkit", pixels=[1, 2], max_new_tokens=800, model={"path": "/m"}))
    with pytest.raises(SystemExit, match="already holds this run"):
        runs.claim_run(out, identity, resume=False)


def test_a_different_run_is_refused_naming_each_field_that_differs(tmp_path):
    out = str(tmp_path / "run")
    runs.claim_run(out, runs.run_identity(model={"path": "/a", "weights": "1"}, rules="vlmevalkit", limit=None))
    with pytest.raises(SystemExit) as e:
        runs.claim_run(out, runs.run_identity(model={"path": "/b", "weights": "1"}, rules="official", limit=None))
    message = str(e.value)
    assert '  model.path: "/a" there, "/b" now' in message
    assert '  rules: "vlmevalkit" there, "official" now' in message
    assert "limit" not in message and "nothing there is reused" in message


def test_overwrite_deletes_the_named_outputs_and_claims_afresh(tmp_path):
    out = tmp_path / "run"
    runs.claim_run(str(out), runs.run_identity(model="a"))
    (out / "predictions.jsonl").write_text("{}\n")
    (out / "checkpoints").mkdir()
    (out / "notes.txt").write_text("mine")
    runs.claim_run(str(out), runs.run_identity(model="b"), overwrite=True, outputs=("predictions.jsonl", "checkpoints"))
    assert sorted(os.listdir(out)) == ["notes.txt", "run.json"]
    assert json.loads((out / "run.json").read_text()) == {"model": "b"}


def test_outputs_without_a_run_json_are_not_adopted(tmp_path):
    (tmp_path / "predictions.jsonl").write_text("{}\n")  # made before run.json existed: by whom?
    with pytest.raises(SystemExit, match=r"has outputs \(predictions.jsonl\) but no run.json"):
        runs.claim_run(str(tmp_path), runs.run_identity(model="a"), outputs=("predictions.jsonl",))
    runs.claim_run(str(tmp_path / "fresh"), runs.run_identity(model="a"), outputs=("predictions.jsonl",))
    assert os.path.exists(tmp_path / "fresh" / "run.json")
