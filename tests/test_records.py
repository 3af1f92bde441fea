"""vlaa/jsonl.py, vlaa/records.py and vlaa/images.py by example: resume, records (ours and the released files),
images, bad input."""

import json
import os

import pytest
from conftest import solid_image

from vlaa import images, jsonl, records


def test_jsonl_resume_drops_a_torn_last_line(tmp_path):
    path = str(tmp_path / "out.jsonl")
    done, f, _ = jsonl.open_output(path)
    assert done == set()
    jsonl.append_jsonl(f, {"id": "a", "x": 1})
    jsonl.append_jsonl(f, {"id": "b", "x": 2})
    f.close()
    with open(path, "a") as f:
        f.write('{"id": "c", "x"')  # killed mid-write
    done, f, _ = jsonl.open_output(path)
    assert done == {"a", "b"}
    jsonl.append_jsonl(f, {"id": "c", "x": 3})
    f.close()
    assert [r["id"] for _, r in jsonl.read_jsonl(path)] == ["a", "b", "c"]


def test_jsonl_resume_keeps_a_damaged_line_in_the_middle_and_redoes_only_its_record(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "x": \xff\n\n{"x": 1}\n{"id": "c"}\n{"id": "d"')
    done, f, damaged = jsonl.open_output(str(path))
    f.close()
    assert done == {"a", "c"} and damaged == [2, 4]  # not JSON; no id. The blank line 3 is harmless
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b", "x": \xff\n\n{"x": 1}\n{"id": "c"}\n'  # torn line cut
    records, damaged = jsonl.read_output(str(path))
    assert [r["id"] for r in records] == ["a", "c"] and damaged == [2, 4]


def test_read_jsonl_counts_unreadable_lines_when_given_a_list(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 64)
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": "a"}\n\xc3(\n[1, 2]\n{"id": "' + b"x" * 100 + b'"}\n{"id": "b"}\n')
    bad = []
    assert [r["id"] for _, r in jsonl.read_jsonl(str(p), bad)] == ["a", "b"]
    assert bad == [f"{p}:2: not UTF-8 (byte 0: b'\\xc3')", f"{p}:3: expected a JSON object, got list",
                   f"{p}:4: line longer than 64 bytes"]


def test_bad_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "a"}\n\n{"id": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: bad JSON"):
        list(jsonl.read_jsonl(str(p)))


def _write_image(folder, name):
    os.makedirs(folder, exist_ok=True)
    solid_image(28).save(os.path.join(folder, name))


def test_load_records_ours_resolves_images_and_normalises_verifiers(tmp_path):
    _write_image(tmp_path / "images", "1.png")
    (tmp_path / "d.jsonl").write_text(json.dumps(
        {"id": "x1", "image": "images/1.png", "question": "How many?", "answer": "3", "verifier_type": "Digit"}) + "\n")
    (rec,) = records.load_records(str(tmp_path / "d.jsonl"))
    assert rec["image"] == str(tmp_path / "images" / "1.png") and rec["verifier_type"] == "digit"


def test_load_records_released_sft_and_grpo_shapes(tmp_path):
    _write_image(tmp_path / "clevr_math", "a.png")
    sft = {"image": "clevr_math/a.png", "question": "How many?",
           "answer": "<think>I count 3.</think><answer>3</answer>"}
    grpo = {"id": "g1", "image": "clevr_math/a.png", "question": "Where is it?", "gt": "[0.1, 0.2, 0.5, 0.6]",
            "answer": "[0.1, 0.2, 0.5, 0.6]", "verifier_type": "bbox"}
    (tmp_path / "VLAA-Thinking-SFT-126K.json").write_text(json.dumps(sft) + "\n")
    (tmp_path / "grpo.json").write_text(json.dumps([grpo]))  # a JSON array is accepted too
    (s,) = records.load_records(str(tmp_path / "VLAA-Thinking-SFT-126K.json"))
    assert s["response"] == sft["answer"] and s["answer"] == "3" and s["id"] == "VLAA-Thinking-SFT-126K.json:1"
    (g,) = records.load_records(str(tmp_path / "grpo.json"))
    assert g["answer"] == "[0.1, 0.2, 0.5, 0.6]" and g["verifier_type"] == "iou"


def test_load_records_errors_name_file_line_and_field(tmp_path):
    _write_image(tmp_path, "a.png")
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"id": "1", "image": "a.png", "answer": "3"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:1 \(id '1'\): missing field 'question'"):
        records.load_records(str(p))
    p.write_text(json.dumps({"id": "1", "image": "nope.png", "question": "q", "answer": "3"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"d.jsonl:1 \(id '1'\): field 'image': image not found: .*nope.png"):
        records.load_records(str(p))
    p.write_text(json.dumps({"id": "1", "image": "a.png", "question": "q", "answer": "3", "verifier_type": "vibes"}))
    with pytest.raises(ValueError, match=r"unknown verifier_type 'vibes'; known: digit, mcq, math, iou, open"):
        records.load_records(str(p))


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        images.load_image(str(tmp_path / "missing.png"))
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not an image: .*corrupt.png"):
        images.load_image(str(tmp_path / "corrupt.png"))
    with pytest.raises(ValueError, match="not an image: .* \\(not a regular file\\)"):
        images.load_image(str(tmp_path))
    solid_image(30).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])  # the header survives, not the pixels
    with pytest.raises(ValueError, match="unreadable image .*cut.png"):
        images.load_image(str(tmp_path / "cut.png"))
    from PIL import Image

    Image.new("1", (9000, 9000)).save(tmp_path / "huge.png")  # 81 Mpx, a few KB on disk
    with pytest.raises(ValueError, match="image too large"):
        images.load_image(str(tmp_path / "huge.png"))
    solid_image(30).save(tmp_path / "ok.jpg")
    im = images.load_image(str(tmp_path / "ok.jpg"))
    assert im.mode == "RGB" and im.size == (30, 30)


def test_has_aha_is_the_papers_substring_rule():
    assert records.has_aha("Hmm, let me think") and records.has_aha("I checked it")
    assert not records.has_aha("The image shows 3 objects.")
