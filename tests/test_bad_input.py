"""Bad input, bad servers and damaged files, case by case: every stage either names the file, line, id and
field of what is wrong before any model runs, or with --skip-bad counts it and goes on; a failing server
costs attempts, not the run.

The stages run in-process through main(argv), as on the command line; the loaders of 04, 05 and 06 are
vlaa.records.load_records, called directly. The servers are fake_openai.py's, on 127.0.0.1.
"""

import base64
import importlib
import io
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, rows, solid_image
from fake_openai import dead_url, openai
from PIL import Image

import toy
from vlaa import backends, images, jsonl, openai_client, records

caption = importlib.import_module("01_caption")
distill = importlib.import_module("02_distill")
rewrite_verify = importlib.import_module("03_rewrite_verify")


def ask(*prompts):
    return [{"prompt": p, "image": None, "system": None} for p in prompts]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 toy records through 01 and 02 with the toy teacher: {"train", "captioned", "distilled"} paths."""
    root = tmp_path_factory.mktemp("bad-input")
    toy.make_data(str(root), 12, test_n=0, seed=3)
    paths = {name: str(root / f"{name}.jsonl") for name in ("train", "captioned", "distilled")}
    caption.main(["--in", paths["train"], "--out", paths["captioned"]])
    distill.main(["--in", paths["captioned"], "--out", paths["distilled"], "--model", "reasoner:error_rate=0"])
    return paths


def copy_lines(src, dst, change=None):
    """Write src's lines to dst, image paths made absolute; change(i, bytes) -> bytes changes line i (from 1)."""
    images = f'"{os.path.dirname(src)}/images/'.encode()
    with open(src, "rb") as f:
        lines = [line.replace(b'"images/', images) for line in f.read().splitlines(keepends=True)]
    with open(dst, "wb") as f:
        f.writelines(change(i, line) if change else line for i, line in enumerate(lines, 1))
    return dst


def with_field(line_no, **fields):
    """A `change` for copy_lines: set fields of the record on line_no."""
    def change(i, line):
        return line if i != line_no else (json.dumps({**json.loads(line), **fields}) + "\n").encode()
    return change


# ----------------------------------------------------------------------------------------------------
# The openai backend: a dead server, a refused request, a trickle, a fatal error, empty completions, the key


def test_one_server_of_two_down_costs_a_few_attempts_not_the_run(serve, data, tmp_path):
    live = serve(reply=lambda p: "The answer is 3.")
    start = time.perf_counter()
    stats = distill.main(["--in", data["captioned"], "--out", str(tmp_path / "d.jsonl"), "--backend", "openai",
                          "--base-url", f"{dead_url()},{live.url}", "--batch-size", "4"])  # default retries
    assert stats["written"] == 12 and stats["bad"] == []
    assert time.perf_counter() - start < 5  # no waiting: a retry moves on to the live server at once
    assert {r["reasoning"] for r in rows(str(tmp_path / "d.jsonl"))} == {"The answer is 3."}


def test_a_failing_server_is_skipped_while_it_cools_down(serve):
    failing, good = serve(rule=lambda p: 503), serve()
    out = openai([failing.url, good.url], concurrency=2, backoff=5.0)(ask(*map(str, range(20))))
    assert out == [["ok"]] * 20
    assert len(failing.payloads) <= 2  # sent before its first failure came back; none during the cool-down
    assert len(good.payloads) == 20


def test_a_429_cool_down_is_the_servers_retry_after(serve):
    busy = serve(script=[429], retry_after=0.5)
    start = time.perf_counter()
    assert openai(busy.url)(ask("hi")) == [["ok"]]
    assert 0.5 <= time.perf_counter() - start < 3 and len(busy.payloads) == 2


def test_a_request_the_server_refuses_is_a_bad_record_and_its_batch_is_kept(serve, data, tmp_path):
    src = copy_lines(data["captioned"], str(tmp_path / "in.jsonl"), with_field(6, question="POISON"))
    server = serve(rule=lambda p: 400 if "POISON" in p["messages"][-1]["content"] else None)
    out = str(tmp_path / "d.jsonl")
    argv = ["--in", src, "--out", out, "--backend", "openai", "--base-url", server.url, "--batch-size", "12"]
    with pytest.raises(jsonl.InputError, match=r"in\.jsonl:6 \(id 'train-000005'\): openai backend: refused by "
                                               r"http://127\.0\.0\.1:\d+/v1: HTTP 400: .*scripted 400"):
        distill.main(argv)
    assert len(rows(out)) == 11  # the batch's finished records are kept
    assert sum("POISON" in p for p in server.prompts()) == 1  # a refusal is not retried

    stats = distill.main(argv + ["--skip-bad"])
    assert (stats["written"], stats["done_before"], len(stats["bad"])) == (0, 11, 1)
    assert "HTTP 400" in stats["bad"][0]
    server.rule = lambda p: None  # the server changed its mind: a rerun does the one left
    assert distill.main(argv)["written"] == 1 and len(rows(out)) == 12


def test_the_timeout_is_a_wall_clock_deadline_for_a_trickling_server(serve):
    trickler = serve(script=["trickle"], reply=lambda p: "x" * 100)  # ~25 s for the whole reply
    start = time.perf_counter()
    assert openai(trickler.url, timeout=0.5)(ask("hi")) == [["x" * 100]]  # cut off at 0.5 s, then asked again
    assert time.perf_counter() - start < 2 and len(trickler.payloads) == 2

    trickler.script = ["trickle"] * 2
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"2 attempts failed, last: .*no complete reply within 0.5 s"):
        openai(trickler.url, timeout=0.5, retries=1)(ask("hi"))
    assert time.perf_counter() - start < 2.5


def test_a_broken_reply_is_retried_and_then_named(serve):
    server = serve(script=["cut", "garbage"])
    assert openai(server.url)(ask("hi")) == [["ok"]] and len(server.payloads) == 3
    server.script = ["cut", "garbage"]
    (out,) = openai(server.url, retries=1)(ask("hi"), on_error="return")
    assert isinstance(out, RuntimeError) and "2 attempts failed, last: " in str(out)
    assert "not a chat completion" in str(out)


@pytest.mark.parametrize("fate", [401, 400])
def test_an_error_that_ends_the_call_returns_at_once(serve, fate):
    """401 (bad key) ends every call; 400 ends a call that raises (on_error="raise", 06's way). Neither waits
    for the requests still in flight (here: 30 s each)."""
    server = serve(rule=lambda p: fate if p["messages"][-1]["content"] == "bad" else "sleep", sleep=30)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=f"HTTP {fate}"):
        openai(server.url, concurrency=4)(ask("a", "b", "bad", "c", "d", "e"))
    assert time.perf_counter() - start < 2
    time.sleep(0.2)
    assert set(server.prompts()) <= {"a", "b", "bad", "c"}  # the queued two never started


def test_a_fatal_error_does_not_keep_the_process_waiting_for_requests_in_flight(serve):
    server = serve(rule=lambda p: 401 if p["messages"][-1]["content"] == "bad" else "sleep", sleep=30)
    code = ("import sys; from vlaa.openai_client import openai_backend; "
            f"openai_backend('m', base_url='{server.url}', api_key='')"
            "([{'prompt': p, 'system': None} for p in ('a', 'b', 'bad')])")
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "refused with HTTP 401" in r.stderr
    assert time.perf_counter() - start < 10  # imports and all; the two sleeping requests would take 30 s


def test_null_or_empty_content_is_retried_then_a_bad_record(serve, data, tmp_path):
    server = serve(script=["null", "empty"])
    assert openai(server.url)(ask("hi")) == [["ok"]] and len(server.payloads) == 3

    server = serve(script=["null"] * 6, reply=lambda p: "A red square.")  # the first record: every attempt
    out = str(tmp_path / "c.jsonl")
    stats = caption.main(["--in", data["train"], "--out", out, "--backend", "openai", "--base-url", server.url,
                          "--concurrency", "1", "--skip-bad"])
    assert stats["written"] == 11 and len(stats["bad"]) == 1
    assert "train.jsonl:1 (id 'train-000000'): openai backend: 6 attempts failed, last: " in stats["bad"][0]
    assert stats["bad"][0].endswith("empty completion")
    assert [r["caption"] for r in rows(out)] == ["A red square."] * 11  # no empty caption marked done


def test_the_api_key_is_never_printed_even_when_the_server_echoes_it(serve, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TEACHER_KEY", "sk-secret-4242")
    server = serve(rule=lambda p: "echo-key")
    stats = distill.main(["--in", data["captioned"], "--out", str(tmp_path / "d.jsonl"), "--backend", "openai",
                          "--base-url", server.url, "--api-key-env", "TEACHER_KEY", "--skip-bad"])
    assert server.headers[0]["authorization"] == "Bearer sk-secret-4242"  # sent, and only in the header
    assert len(stats["bad"]) == 12 and all("bad key Bearer ***" in b for b in stats["bad"])
    printed = capsys.readouterr()
    assert "sk-secret" not in printed.out + printed.err + json.dumps(stats)


# ----------------------------------------------------------------------------------------------------
# Bad records: found when the input is read, named by file, line, id and field, or counted by --skip-bad


STAGES = {  # stage -> (its module, the fixture file it reads, extra flags)
    "01": (caption, "train", []),
    "02": (distill, "captioned", []),
    "03": (rewrite_verify, "distilled", ["--judge-model", "judge"]),
}


def run(stage, src, tmp_path, *flags):
    module, _, extra = STAGES[stage]
    out = str(tmp_path / ("out" if stage == "03" else "out.jsonl"))
    return module.main(["--in", src, "--out", out, *extra, *flags]), out


@pytest.mark.parametrize("stage", ["01", "02", "03"])
def test_bytes_that_are_not_utf8_name_file_and_line_in_every_stage(data, tmp_path, stage):
    src = copy_lines(data[STAGES[stage][1]], str(tmp_path / "in.jsonl"),
                     lambda i, line: line.replace(b'"id"', b'"\xff\xfeid"') if i == 2 else line)
    with pytest.raises(ValueError, match=r"in\.jsonl:2: not UTF-8 \(byte 2: b'\\xff'\)"):
        run(stage, src, tmp_path)
    assert not os.path.exists(tmp_path / "out.jsonl")  # no model ran: 03's folder holds its writer's lock alone
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == [".lock"]
    stats, _ = run(stage, src, tmp_path, "--skip-bad")
    total = stats["total"] if stage == "03" else stats["written"]
    bad = stats["bad_records_skipped"] if stage == "03" else len(stats["bad"])
    assert (total, bad) == (11, 1)


def test_bytes_that_are_not_utf8_name_file_and_line_in_the_training_loaders(data, tmp_path):
    src = copy_lines(data["train"], str(tmp_path / "in.jsonl"),
                     lambda i, line: line.replace(b'"id"', b'"\xc3id"') if i == 3 else line)
    with pytest.raises(ValueError, match=r"in\.jsonl:3: not UTF-8 \(byte 2: b'\\xc3'\)"):
        records.load_records(src)
    assert len(records.load_records(src, skip_bad=True)) == 11


WRONG_TYPES = [  # field, value, what the error says
    ("id", ["a"], "field 'id' must be a string, got list"),
    ("question", 7, "field 'question' must be a string, got int"),
    ("image", 7, "field 'image' must be a string, got int"),
    ("answer", {"value": 3}, "field 'answer' must be a string, got dict"),
    ("caption", None, "missing field 'caption'"),
    ("choices", "ABCD", "field 'choices' must be a list of strings"),
    ("verifier_type", ["digit"], r"field 'verifier_type': unknown verifier_type \['digit'\]"),
]


@pytest.mark.parametrize("field, value, why", WRONG_TYPES)
def test_a_field_of_the_wrong_type_is_named_by_02_and_the_loaders(data, tmp_path, field, value, why):
    src = copy_lines(data["captioned"], str(tmp_path / "in.jsonl"), with_field(4, **{field: value}))
    where = r"in\.jsonl:4" + ("" if field == "id" else r" \(id 'train-000003'\)")
    with pytest.raises(ValueError, match=where + ": " + why):
        distill.main(["--in", src, "--out", str(tmp_path / "out.jsonl")])
    if field != "caption":
        with pytest.raises(ValueError, match=where + ": " + why):
            records.load_records(src)
    assert len(distill.main(["--in", src, "--out", str(tmp_path / "out.jsonl"), "--skip-bad"])["bad"]) == 1


def test_numbers_are_read_as_text_where_a_number_is_natural(data, tmp_path):
    """An id 7 or a gold answer 3 is no error: both become strings, as a gold box given as a JSON list does."""
    src = copy_lines(data["train"], str(tmp_path / "in.jsonl"), with_field(1, id=7, answer=3, verifier_type="digit"))
    first = records.load_records(src)[0]
    assert (first["id"], first["answer"]) == ("7", "3")


def test_a_gold_answer_no_verifier_can_match_stops_every_loader(data, tmp_path):
    """digit "nan" would crash scoring in 05 or 06 mid-run; it is refused when the file is read, like 03 does."""
    src = copy_lines(data["distilled"], str(tmp_path / "in.jsonl"), with_field(2, answer="nan", verifier_type="digit"))
    why = r"in\.jsonl:2 \(id 'train-000001'\): field 'answer': digit answer 'nan' is not one integer"
    with pytest.raises(ValueError, match=why):
        records.load_records(src, need=("question", "answer", "verifier_type"))  # 05 and 06
    with pytest.raises(ValueError, match=why):
        rewrite_verify.main(["--in", src, "--out", str(tmp_path / "out")])
    assert len(records.load_records(src, skip_bad=True)) == 11


def thin_png(path, w, h):
    Image.new("RGB", (w, h), (200, 30, 30)).save(path)


BAD_IMAGES = {  # kind -> (make it at `path`, what the error says)
    "empty file": (lambda path: open(path, "wb").close(), r"not an image: .*bad\.png"),
    "text file": (lambda path: open(path, "w").write("root:x:0:0:root:/root:/bin/sh\n"), r"not an image: .*bad\.png"),
    "directory": (os.mkdir, r"not an image: .*bad\.png \(not a regular file\)"),
    "300:1": (lambda path: thin_png(path, 600, 2), r"image too thin \(600x2 px, aspect ratio limit 200\)"),
    "missing": (lambda path: None, r"image not found: .*bad\.png"),
}


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_a_bad_image_is_refused_when_the_file_is_read(data, tmp_path, kind):
    make, why = BAD_IMAGES[kind]
    make(str(tmp_path / "bad.png"))
    src = copy_lines(data["train"], str(tmp_path / "in.jsonl"), with_field(5, image=str(tmp_path / "bad.png")))
    where = r"in\.jsonl:5 \(id 'train-000004'\): field 'image': "
    error = FileNotFoundError if kind == "missing" else ValueError
    with pytest.raises(error, match=where + why):
        records.load_records(src)  # 04, 05, 06: before any training step
    with pytest.raises(error, match=where + why):
        caption.main(["--in", src, "--out", str(tmp_path / "out.jsonl"), "--overwrite"])
    assert not os.path.exists(tmp_path / "out.jsonl")  # before any model call
    stats = caption.main(["--in", src, "--out", str(tmp_path / "out.jsonl"), "--overwrite", "--skip-bad"])
    assert stats["written"] == 11 and len(stats["bad"]) == 1
    assert len(records.load_records(src, skip_bad=True)) == 11


def test_the_toy_captioner_reads_tiny_and_thin_images(tmp_path):
    recs = []
    for name, (w, h) in {"dot": (1, 1), "column": (1, 200), "row": (200, 1), "sliver": (1, 400)}.items():
        thin_png(str(tmp_path / f"{name}.png"), w, h)
        recs.append({"id": name, "image": f"{name}.png"})
    jsonl.write_jsonl(str(tmp_path / "in.jsonl"), recs)
    stats = caption.main(["--in", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"), "--skip-bad"])
    assert [r["id"] for r in rows(str(tmp_path / "out.jsonl"))] == ["dot", "column", "row"]
    assert all(r["caption"].startswith("Setting:") for r in rows(str(tmp_path / "out.jsonl")))
    (why,) = stats["bad"]  # past Qwen2.5-VL's 200:1 limit
    assert "(id 'sliver'): field 'image': image too thin (1x400 px, aspect ratio limit 200)" in why


def test_a_huge_question_is_refused_when_the_file_is_read(data, tmp_path):
    src = copy_lines(data["captioned"], str(tmp_path / "in.jsonl"), with_field(3, question="How many? " * 500_000))
    why = r"in\.jsonl:3 \(id 'train-000002'\): field 'question' is 5000000 characters \(limit 32000\)"
    with pytest.raises(ValueError, match=why):
        records.load_records(src)
    with pytest.raises(ValueError, match=why):
        distill.main(["--in", src, "--out", str(tmp_path / "out.jsonl")])


# ----------------------------------------------------------------------------------------------------
# Damaged output: a bad line in the middle is kept, only its record is redone, and it is counted


def damage(path, line_no, with_blank_after=None):
    """Overwrite line line_no with garbage (a disk error, a bad edit), optionally add a blank line."""
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    lines[line_no - 1] = b'{"id": "train-0\x00\x00\x00 garbage\n'
    if with_blank_after:
        lines.insert(with_blank_after, b"\n")
    with open(path, "wb") as f:
        f.writelines(lines)
    return lines


def test_a_damaged_line_mid_output_is_kept_and_only_its_record_redone(data, tmp_path):
    out = str(tmp_path / "d.jsonl")
    argv = ["--in", data["captioned"], "--out", out, "--model", "reasoner:error_rate=0"]
    distill.main(argv)
    before = damage(out, 4, with_blank_after=8)
    stats = distill.main(argv)
    with open(out, "rb") as f:
        after = f.read().splitlines(keepends=True)
    assert after[:-1] == before and json.loads(after[-1])["id"] == "train-000003"  # kept, and redone at the end
    assert (stats["written"], stats["done_before"], stats["damaged_lines"]) == (1, 11, 1)
    kept, damaged = jsonl.read_output(out)
    assert sorted(r["id"] for r in kept) == sorted(r["id"] for r in rows(data["captioned"])) and damaged == [4]


def test_03_counts_a_damaged_line_of_its_output_in_the_summary(data, tmp_path):
    argv = ["--in", data["distilled"], "--out", str(tmp_path / "f"), "--judge-model", "judge"]
    first = rewrite_verify.main(argv)
    before = damage(str(tmp_path / "f" / "all.jsonl"), 7)
    summary = rewrite_verify.main(argv)
    assert (tmp_path / "f" / "all.jsonl").read_bytes().splitlines(keepends=True)[:-1] == before  # one redone
    assert summary["damaged_lines"] == 1 and summary["total"] == first["total"] == 12
    assert {k: summary[k] for k in ("kept", "sft", "rl")} == {k: first[k] for k in ("kept", "sft", "rl")}


def test_sigkill_mid_run_then_resume_gives_the_bytes_of_one_run(serve, data, tmp_path):
    """02 through the openai backend, killed (SIGKILL) while requests are in flight, then run again."""
    server = serve(rule=lambda p: "sleep", sleep=0.1, reply=lambda p: "I read: " + p["messages"][-1]["content"][-40:])
    argv = ["--in", data["captioned"], "--backend", "openai", "--base-url", server.url, "--batch-size", "2",
            "--concurrency", "2"]
    distill.main(argv + ["--out", str(tmp_path / "once.jsonl")])
    killed = tmp_path / "killed.jsonl"
    child = subprocess.Popen([sys.executable, "02_distill.py", *argv, "--out", str(killed)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (killed.exists() and killed.read_bytes().count(b"\n") >= 3) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        child.kill()
        child.wait()
    assert 3 <= killed.read_bytes().count(b"\n") < 12
    distill.main(argv + ["--out", str(killed)])
    assert killed.read_bytes() == (tmp_path / "once.jsonl").read_bytes()


# ----------------------------------------------------------------------------------------------------
# Images: decoded one request at a time, and only images are ever read into a request or sent


def test_01_hands_the_backend_paths_and_the_openai_backend_decodes_a_few_at_a_time(serve, data, tmp_path, monkeypatch):
    seen, real_make = [], backends.make_backend

    def recording(name, model, **opts):
        gen = real_make(name, model, **opts)

        def record(requests, **kw):
            seen.extend(r["image"] for r in requests)
            return gen(requests, **kw)
        return record
    monkeypatch.setattr(backends, "make_backend", recording)
    caption.main(["--in", data["train"], "--out", str(tmp_path / "toy.jsonl"), "--overwrite"])
    assert len(seen) == 12 and all(isinstance(image, str) for image in seen)  # paths, not decoded images

    server = serve(script=["sleep"] * 12, sleep=0.05)
    decoded, most = [], [0]

    def load_image(path, where=""):
        decoded.append(path)
        most[0] = max(most[0], len(decoded) - server.answered)  # decoded, not yet answered
        return images.load_image(path, where)
    monkeypatch.setattr(openai_client, "load_image", load_image)
    stats = caption.main(["--in", data["train"], "--out", str(tmp_path / "api.jsonl"), "--backend", "openai",
                          "--base-url", server.url, "--concurrency", "2", "--batch-size", "12"])
    # at most --concurrency images decoded and not yet answered (+1: the server counts a reply only after
    # sending it, so the next decode can start first); the old 01 decoded the whole batch of 12 up front
    assert stats["written"] == 12 and len(decoded) == 12 and most[0] <= 3


def test_only_files_that_decode_as_images_are_read_or_sent(serve, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    solid_image(28).save(tmp_path / "elsewhere" / "a.png")  # paths stay free: `..` and absolute ones
    (tmp_path / "secret.txt").write_text("password=hunter2\n")
    recs = [{"id": "up", "image": "../elsewhere/a.png"}, {"id": "abs", "image": str(tmp_path / "elsewhere/a.png")},
            {"id": "secret", "image": "../secret.txt"}, {"id": "absolute", "image": str(tmp_path / "secret.txt")}]
    jsonl.write_jsonl(str(tmp_path / "data" / "in.jsonl"), recs)
    server = serve()
    stats = caption.main(["--in", str(tmp_path / "data" / "in.jsonl"), "--out", str(tmp_path / "out" / "c.jsonl"),
                          "--backend", "openai", "--base-url", server.url, "--skip-bad"])
    assert stats["written"] == 2 and len(stats["bad"]) == 2 and all("not an image" in b for b in stats["bad"])
    assert [r["image"] for r in rows(str(tmp_path / "out" / "c.jsonl"))] == ["../elsewhere/a.png"] * 2
    urls = [p["messages"][0]["content"][0]["image_url"]["url"] for p in server.payloads]
    assert len(urls) == 2 and all(Image.open(io.BytesIO(base64.b64decode(u.split(",")[1]))).size == (28, 28)
                                  for u in urls)

    # the backend itself (06 hands it paths too): a path that is not an image is that request's error
    out = openai(server.url)([{"prompt": "hi", "image": str(tmp_path / "secret.txt")}], on_error="return")
    assert isinstance(out[0], RuntimeError) and "not an image" in str(out[0]) and len(server.payloads) == 2
