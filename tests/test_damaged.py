"""Bad input and damaged state are named, never a traceback: every loader raises jsonl.InputError naming the file
(and line) and what to do, and a stage's command line prints only that message (flags.cli, exit status 1).
--skip-bad says why: every skipped record and its reason in a file beside the output, the first few on the console."""

import importlib
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from vlaa import checkpoints, jsonl, records, runs

distill = importlib.import_module("02_distill")
evaluate = importlib.import_module("06_eval")

GOOD = {"id": "a", "question": "How many?", "caption": "Three red squares."}
DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON parser recurses


def write_lines(path, *lines):
    with open(path, "wb") as f:
        f.writelines(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode() for line in lines)
    return str(path)


# ----------------------------------------------------------------------------------------------------
# The command line: one message, exit status 1


DAMAGED_INPUTS = [  # line 2 of 02's input, and what the one printed line says
    (b'{"id": "\xff\xfe"}\n', r"in\.jsonl:2: not UTF-8 \(byte 8: b'\\xff'\)"),
    (b'{"id": "b", "question": \n', r"in\.jsonl:2: bad JSON \(Expecting value at column 25\)"),
    (('{"id": "b", "x": ' + DEEP + "}\n").encode(), r"in\.jsonl:2: bad JSON \(nested too deeply\)"),
    (b'{"id": "b", "question": 7, "caption": "c"}\n', r"in\.jsonl:2 \(id 'b'\): field 'question' must be a string"),
    (b'["a list"]\n', r"in\.jsonl:2: expected a JSON object, got list"),
]


@pytest.mark.parametrize("line, says", DAMAGED_INPUTS)
def test_a_damaged_input_line_is_one_message_on_the_console(tmp_path, line, says):
    src = write_lines(tmp_path / "in.jsonl", GOOD, line)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "02_distill.py"), "--in", src, "--out",
                        str(tmp_path / "out.jsonl")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1].startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(says, r.stderr), r.stderr


def test_a_missing_input_file_is_one_message_too(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "02_distill.py"), "--in", str(tmp_path / "nowhere.jsonl"),
                        "--out", str(tmp_path / "out.jsonl")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [  # runs.check_inputs, before any work
        f"--in {tmp_path / 'nowhere.jsonl'}: does not exist (a file was expected; nothing was loaded)"], r.stderr


@pytest.mark.parametrize("content, says", [
    ("[" + DEEP + "]", r"bad JSON array \(nested too deeply\)"),
    ("[{}, ", r"bad JSON array \(Expecting value at column 6\)"),
    (b"[\xff]", r"not UTF-8 \(byte 1\)"),
    ("[3]", r"item 1: expected a JSON object"),
])
def test_a_damaged_json_array_file_is_named_by_the_training_loader(tmp_path, content, says):
    path = tmp_path / "data.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(jsonl.InputError, match=r"data\.json: " + says):
        records.load_records(str(path))


# ----------------------------------------------------------------------------------------------------
# Damaged state: run.json, trainer.json, predictions.jsonl, scores.json

DAMAGED_JSON = [b"{not json", b"[1, 2]", b"\xff\xfe{}", DEEP.encode(), b""]


@pytest.mark.parametrize("content", DAMAGED_JSON)
def test_a_damaged_run_json_is_named_with_what_to_do(tmp_path, content):
    (tmp_path / "run.json").write_bytes(content)
    for claim in (lambda: runs.claim_run(str(tmp_path), {"stage": "04_sft"}),
                  lambda: runs.start_or_resume(str(tmp_path), {"stage": "04_sft"}, True, False, 4, ENV, None, None)):
        with pytest.raises(jsonl.InputError, match=r"run\.json: .*; it says what made the outputs there; use "
                                                   r"another --out, or --overwrite"):
            claim()


ENV = {"master": True, "rank": 0, "world": 1, "device": "cpu"}


def checkpoint_with(out, trainer, step=4):
    """A run folder (run.json of `identity`) whose only checkpoint, ckpt-STEP, holds `trainer` as trainer.json."""
    identity = {"stage": "04_sft", "flags": {}}
    runs.claim_run(out, identity)
    run_id = runs._sha256(json.dumps(identity, sort_keys=True).encode())[:16]
    folder = os.path.join(out, "checkpoints", f"ckpt-{step}")
    os.makedirs(folder)
    for name, data in (("DONE", b""), ("rank-0.json", json.dumps({"run_id": run_id}).encode())):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    if trainer is not None:
        with open(os.path.join(folder, "trainer.json"), "wb") as f:
            f.write(trainer if isinstance(trainer, bytes) else json.dumps({"run_id": run_id, **trainer}).encode())
    return identity


@pytest.mark.parametrize("trainer, says", [
    ({"step": -1, "world": 1}, "step -1 is impossible here"),
    ({"step": 3, "world": 1}, "step 3 is impossible here"),  # the folder is ckpt-4
    ({"step": "4", "world": 1}, "step '4' is impossible here"),
    ({"step": 4, "world": 0}, "world 0 is impossible here"),
    ({"world": 1}, "no field 'step'"),
    (b"{garbage", r"bad JSON"),
    (None, "cannot be read"),
])
def test_a_damaged_trainer_json_is_named_when_resuming(tmp_path, trainer, says):
    out = str(tmp_path)
    identity = checkpoint_with(out, trainer)
    with pytest.raises(jsonl.InputError, match=r"ckpt-4/trainer\.json: .*" + says + r".*delete .*ckpt-4 to resume "
                                               "from the one before it, or start again with --overwrite"):
        runs.start_or_resume(out, identity, True, False, 10, ENV, None, None)
    with pytest.raises(jsonl.InputError, match=says):
        checkpoints.read_trainer(os.path.join(out, "checkpoints", "ckpt-4"))


def test_a_prediction_without_a_text_response_is_a_damaged_line_redone(tmp_path):
    path = write_lines(tmp_path / "predictions.jsonl", {"id": "a"}, {"id": "b", "response": 5},
                       {"id": "c", "response": None}, {"id": "d", "response": "The answer is 3."})
    done, f, damaged = jsonl.open_output(path, ("response",))
    f.close()
    assert (done, damaged) == ({"d"}, [1, 2, 3])
    assert [r["id"] for r in jsonl.read_output(path, ("response",))[0]] == ["d"]
    assert jsonl.read_output(path)[1] == []  # without `need` (other outputs), only the id counts, as before


@pytest.mark.parametrize("content, says", [(None, "cannot be read"), (b"{", "bad JSON"), (b"[]", "got list"),
                                           (b'{"model": "m"}', "no field 'benchmarks'")])
def test_a_damaged_scores_json_is_named_by_the_report(tmp_path, content, says):
    if content is not None:
        (tmp_path / "scores.json").write_bytes(content)
    with pytest.raises(jsonl.InputError, match=r"scores\.json: .*" + says + r".*; rerun 06_eval\.py"):
        evaluate.main(["report", str(tmp_path)])


# ----------------------------------------------------------------------------------------------------
# --skip-bad says why


def test_skip_bad_lists_every_reason_beside_the_output_and_the_first_few_on_the_console(tmp_path, capsys):
    bad = [b"\xff\n", b"{oops\n", {"id": "x", "question": "q"}, {"id": "a", **GOOD}, {"id": 7, "question": [1]},
           {"id": "y", "question": "q", "caption": 3}, {"question": "no id", "caption": "c"}]
    src = write_lines(tmp_path / "in.jsonl", GOOD, *bad)
    out = str(tmp_path / "out.jsonl")
    stats = distill.main(["--in", src, "--out", out, "--skip-bad"])
    assert stats["written"] == 1 and len(stats["bad"]) == 7
    reasons = [json.loads(line)["reason"] for line in open(tmp_path / "out.skipped.jsonl")]
    assert [r.split(": ", 1)[0] for r in reasons] == [f"{src}:{i}" for i in (2, 3)] + [
        f"{src}:4 (id 'x')", f"{src}:5", f"{src}:6 (id '7')", f"{src}:7 (id 'y')", f"{src}:8"]
    assert "missing field 'caption'" in reasons[2] and "duplicate id 'a'" in reasons[3]
    console = capsys.readouterr().out
    assert f"skipped 7 bad record(s) (--skip-bad), every reason in {tmp_path / 'out.skipped.jsonl'}" in console
    assert all(r in console for r in reasons[:5]) and reasons[5] not in console and "... and 2 more" in console
    write_lines(src, GOOD)  # fixed: a rerun skips nothing, and the list of an older run is gone
    distill.main(["--in", src, "--out", out, "--skip-bad"])
    assert not os.path.exists(tmp_path / "out.skipped.jsonl")


def test_the_training_loader_writes_its_skipped_records_where_it_is_told(tmp_path, capsys):
    path = write_lines(tmp_path / "sft.jsonl", {"id": "1", "question": "q"}, b"[]\n")
    skipped = str(tmp_path / "run" / "skipped.jsonl")
    assert records.load_records(path, need=("question",), skip_bad=True, skipped=skipped) == []
    assert [json.loads(line)["reason"] for line in open(skipped)] == [
        f"{path}:1 (id '1'): missing field 'image' (record has: id, question)",
        f"{path}:2: expected a JSON object, got list"]
    assert f"{path}: skipped 2 bad record(s) (--skip-bad), every reason in {skipped}" in capsys.readouterr().out


def test_04_lists_its_skipped_records_and_a_damaged_checkpoint_says_how_to_resume(tmp_path, tiny_model_dir):
    from test_sft import colour_sft_data

    sft = importlib.import_module("04_sft")
    data = colour_sft_data(str(tmp_path / "d"), n=8)
    with open(data, "a") as f:
        f.write('{"id": "x", "image": "images/0.png"}\n')  # no question, no response
    out = str(tmp_path / "run")
    argv = ["--model", tiny_model_dir, "--data", data, "--out", out, "--global-batch", "8", "--micro-batch", "8",
            "--save-every", "1", "--skip-bad"]
    sft.main(argv + ["--max-steps", "2"])
    assert [json.loads(line)["reason"] for line in open(os.path.join(out, "skipped.jsonl"))] == [
        f"{data}:9 (id 'x'): missing field 'question' (record has: id, image)"]
    last = os.path.join(out, "checkpoints", "ckpt-2")
    trainer = json.load(open(os.path.join(last, "trainer.json")))
    with open(os.path.join(last, "trainer.json"), "w") as f:
        json.dump(trainer | {"step": -1}, f)
    with pytest.raises(jsonl.InputError, match=r"ckpt-2/trainer\.json: step -1 is impossible here; .*delete "):
        sft.main(argv + ["--max-steps", "3", "--resume"])
    import shutil

    shutil.rmtree(last)  # what the message says: the run resumes from the checkpoint before
    sft.main(argv + ["--max-steps", "3", "--resume"])
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]


@pytest.mark.parametrize("content, says", [("[" + DEEP + "]", r"bad JSON \(nested too deeply"),
                                           (b"[\xff]", "not UTF-8"), ("[{", "bad JSON")])
def test_a_damaged_source_array_is_named_by_vlaa_sources(tmp_path, content, says):
    from vlaa import collect

    path = tmp_path / "rows.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(jsonl.InputError, match=r"rows\.json: " + says):
        list(collect.local_rows(str(path)))
