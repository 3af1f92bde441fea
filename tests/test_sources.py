"""Step 1 by example: each source's published fields -> records of our schema (vlaa.sources).

Every fixture is a few rows shaped like the source's published rows (field names as docs/sources.md
lists them), written the way the source ships them: parquet with an Image column ({bytes, path}) for the
hub's parquet datasets, JSON or JSONL with image paths beside the image files for the others. Images are
drawn with PIL. The last test sends every converter's output through 01-03 with the toy teacher.
"""

import importlib
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlaa import collect, jsonl, sources

caption = importlib.import_module("01_caption")
distill = importlib.import_module("02_distill")
rewrite_verify = importlib.import_module("03_rewrite_verify")


def image(colour, size=(64, 48), fmt="PNG", mode="RGB"):
    """Encoded bytes of a flat image: a light grey background and one coloured square."""
    im = Image.new("RGB", size, (235, 235, 235))
    im.paste(colour, (8, 8, 24, 24))
    im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def hub_image(data):
    return {"bytes": data, "path": None}  # how a datasets Image column is stored in parquet


def write_parquet(path, rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))  # every row's fields; a row without one gets null
    pq.write_table(pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in keys}), path)
    return str(path)


def write_json(path, rows, lines=False):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) if lines else json.dumps(rows))
    return str(path)


def write_files(root, files):
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)


def chat(human, gpt):
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def records(path):
    return [r for _, r in jsonl.read_jsonl(path)]


# ----------------------------------------------------------------------------------------------------
# One fixture per source: (argv for vlaa.sources without --out, the records it must give)

CLEVR_HINT = "<image>\nHint: Please answer the question and provide the final answer at the end.\nQuestion: "
GEO_HINT = ("<image>\nFirst perform reasoning, then finally select the question from the choices in the following "
            "format: Answer: xxx.\nQuestion: ")


def clevr_math(root):
    rows = [
        {"id": "CLEVR_train_000001.png", "image": hub_image(image((200, 30, 30))), "data_source": "CLEVR-Math",
         "conversations": chat(CLEVR_HINT + "Subtract all balls. How many objects are left?", "The answer is 3")},
        # the original CLEVR-Math fields (dali-does/clevr-math)
        {"template": "subtraction", "id": "CLEVR_train_000002.png", "image": hub_image(image((30, 30, 200))),
         "question": "Subtract 0 red cubes. How many objects are left?", "label": 5},
    ]
    return ["--local", write_parquet(root / "clevr.parquet", rows)], [
        {"question": "Subtract all balls. How many objects are left?", "answer": "3", "verifier_type": "digit"},
        {"question": "Subtract 0 red cubes. How many objects are left?", "answer": "5", "verifier_type": "digit"},
    ]


def geoqa(root):
    problem = "In triangle ABC, angle A = 80° and angle B = 60°. What is angle C?\nChoices:\nA: 40°\nB: 60°\nC: 120°"
    rows = [{"id": "geoqa_plus-2905", "image": hub_image(image((30, 160, 30))), "data_source": "geo170k",
             "conversations": chat(GEO_HINT + problem, "C = 180° - 80° - 60° = 40°. The answer is: A.\nAnswer:A")}]
    return ["--local", write_parquet(root / "geo.parquet", rows)], [
        {"question": problem, "answer": "A", "choices": ["40°", "60°", "120°"], "verifier_type": "mcq"}]


def math_puma(root):
    text = "The function y = a * sin(-5 * x) goes through the points (pi/10,5). What is the function's equation?"
    solution = "Step 1: 5 = a * sin(-pi/2), so a = -5.\n\n†Answer: y = -5 * sin(-5 * x)."
    write_files(root / "synthesis", {"images/text_0.png": image((90, 90, 90)), "images/vision_0.png": image((0, 0, 0))})
    rows = [{"image_url": "images/text_0.png", "instruction": text, "output": solution,
             "image_url_2": "images/vision_0.png", "instruction_2": "What is the function's equation?",
             "output_2": solution}]
    return ["--local", write_json(root / "synthesis" / "train.json", rows)], [
        {"question": "What is the function's equation?", "answer": "y = -5 * sin(-5 * x)", "caption": text,
         "verifier_type": "math"}]


def arxivqa(root):
    write_files(root / "arxiv", {"images/1704.01566_1.jpg": image((200, 120, 0), fmt="JPEG")})
    options = ["A) It rises.", "B) It falls.", "C) It levels off after a drop."]
    rows = [{"id": f"cond-mat-{i}", "image": "images/1704.01566_1.jpg", "question": "What does the heat flux do?",
             "options": options, "label": label, "rationale": "It drops, then stays flat."}
            for i, label in enumerate(["C", "C)", "(c)", "C) It levels off after a drop."])]
    question = "What does the heat flux do?\nA) It rises.\nB) It falls.\nC) It levels off after a drop."
    want = {"question": question, "answer": "C", "choices": ["It rises.", "It falls.", "It levels off after a drop."],
            "verifier_type": "mcq"}
    return ["--local", write_json(root / "arxiv" / "arxivqa.jsonl", rows, lines=True)], [want] * 4


def docvqa(root):
    page = hub_image(image((20, 20, 20), size=(60, 80), mode="L"))  # a grey-scale scan
    rows = [{"questionId": 337 + i, "question": q, "question_types": ["form"], "image": page, "docId": 279,
             "ucsf_document_id": "xnbl0037", "ucsf_document_page_no": "1", "answers": a}
            for i, (q, a) in enumerate([("What is the date?", ["1/8/93", "January 8, 1993"]),
                                        ("Who signed it?", ["T.F. Riehl"])])]
    return ["--local", write_parquet(root / "docvqa.parquet", rows)], [
        {"question": "What is the date?", "answer": "1/8/93", "verifier_type": "open"},
        {"question": "Who signed it?", "answer": "T.F. Riehl", "verifier_type": "open"}]


def vizwiz(root):
    write_files(root / "vizwiz" / "train", {"VizWiz_train_00000000.jpg": image((180, 0, 180), fmt="JPEG")})
    said = ["soup", "can of soup", "soup", "unanswerable", "Soup ", "soup"]
    rows = [{"image": "VizWiz_train_00000000.jpg", "question": "What is this?", "answer_type": "other",
             "answerable": 1, "answers": [{"answer": a, "answer_confidence": "yes"} for a in said]}]
    local, images = write_json(root / "vizwiz" / "train.json", rows), str(root / "vizwiz" / "train")
    return ["--local", local, "--image-root", images], [
        {"question": "What is this?", "answer": "soup", "verifier_type": "open"}]


def allava(root):
    path = "allava_laion/images/100277305.jpeg"
    write_files(root / "allava", {path: image((0, 150, 150), fmt="JPEG")})
    instruct = [{"id": "allava_laion_inst_100277305", "image": path, "url": "https://example.com/ring.jpg",
                 "original_caption": "a ring", "conversations": chat("<image>\nWhat does the stone add?",
                                                                     "A touch of sparkle.")}]
    captions = [{"id": "allava_laion_cap_100277305", "image": path,
                 "conversations": chat("<image>\nPlease depict the image in words.", "A teal square on grey.")}]
    write_json(root / "allava" / "captions.json", captions)
    return ["--local", write_json(root / "allava" / "instruct.json", instruct),
            "--captions", str(root / "allava" / "captions.json")], [
        {"question": "What does the stone add?", "answer": "A touch of sparkle.", "caption": "A teal square on grey.",
         "verifier_type": "open"}]


def llava_cot(root):
    write_files(root / "cot", {"coco/train2017/000000000009.jpg": image((250, 200, 0), fmt="JPEG"),
                               "vg/VG_100K/10.jpg": image((0, 90, 200), fmt="JPEG")})
    ask = "Please provide the bounding box coordinate of the region this sentence describes: the "
    said = "<SUMMARY>I will find it.</SUMMARY> <CAPTION>A square.</CAPTION> <REASONING>It is top left.</REASONING>"
    concluded = " <CONCLUSION>{}</CONCLUSION>".format
    rows = [{"id": "1", "image": "coco/train2017/000000000009.jpg",
             "conversations": chat("<image>\n" + ask + "yellow square.", said + concluded("[0.12, 0.17, 0.38, 0.5]"))},
            {"id": "2", "image": "vg/VG_100K/10.jpg",
             "conversations": chat("<image>\n" + ask + "blue square.", said + concluded("[0.125, 0.167, 0.375, 0.5]"))},
            {"id": "3", "image": "vg/VG_100K/10.jpg",  # not a grounding question: another kind, counted
             "conversations": chat("<image>\nWhat colour is the square?", said + concluded("Blue."))}]
    return ["--local", write_json(root / "cot" / "train.jsonl", rows, lines=True)], [
        {"question": ask + "yellow square.", "answer": "[0.12, 0.17, 0.38, 0.5]", "verifier_type": "iou",
         "source": "llava_cot_coco"},
        {"question": ask + "blue square.", "answer": "[0.125, 0.167, 0.375, 0.5]", "verifier_type": "iou",
         "source": "llava_cot_vg"}]


def chartqa(root):
    rows = [{"image": hub_image(image((60, 60, 160), size=(96, 64), mode="RGBA", fmt="PNG")),
             "query": "What is the highest value?", "label": ["17.5"], "human_or_machine": 0},
            {"image": hub_image(image((160, 60, 60), size=(96, 64))), "query": "Which party leads?",
             "label": ["Democratic"], "human_or_machine": 1}]
    return ["--local", write_parquet(root / "chartqa.parquet", rows)], [
        {"question": "What is the highest value?", "answer": "17.5", "verifier_type": "math"},
        {"question": "Which party leads?", "answer": "Democratic", "verifier_type": "open"}]


FIXTURES = {f.__name__: f for f in (clevr_math, geoqa, math_puma, arxivqa, docvqa, vizwiz, allava, llava_cot, chartqa)}


def test_every_source_has_a_fixture():
    assert set(FIXTURES) == set(sources.SOURCES)


def run(name, argv, out, *more):
    return sources.main(["--source", name, "--out", str(out)] + argv + list(more))


@pytest.mark.parametrize("name", FIXTURES)
def test_each_source_gives_records_of_our_schema(tmp_path, name):
    argv, want = FIXTURES[name](tmp_path)
    out = tmp_path / "data" / f"{name}.jsonl"
    stats = run(name, argv, out)

    got = records(out)
    assert [{k: r.get(k) for k in w} for r, w in zip(got, want)] == want
    assert len(got) == len(want) == stats["written"]
    for r in got:
        assert r["id"].startswith(f"{name}-") and r["source"].startswith(name)
        assert r["image"].startswith(f"images/{name}/")
        with Image.open(out.parent / r["image"]) as im:  # saved beside the output, and still an image
            im.load()
    assert sum(n for by_type in stats["counts"].values() for n in by_type.values()) == len(got)


def test_a_local_clone_of_a_hub_repo_reads_like_the_hub(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "query": datasets.Value("string"),
                                  "label": datasets.Sequence(datasets.Value("string"))})
    rows = {"image": [hub_image(image((60, 60, 160), fmt="JPEG"))], "query": ["What is the highest value?"],
            "label": [["17.5"]]}
    os.makedirs(tmp_path / "ChartQA" / "data")
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "ChartQA/data/train-0.parquet"))
    stats = run("chartqa", ["--hub-id", str(tmp_path / "ChartQA")], tmp_path / "data" / "chartqa.jsonl")
    assert stats["counts"] == {"chartqa": {"math": 1}}
    assert records(tmp_path / "data" / "chartqa.jsonl")[0]["image"].endswith(".jpg")  # the bytes, not decoded


def test_images_are_kept_as_published_and_named_by_content(tmp_path):
    argv, _ = arxivqa(tmp_path)
    out = tmp_path / "data" / "arxivqa.jsonl"
    run("arxivqa", argv, out)
    got = records(out)
    assert len({r["image"] for r in got}) == 1 and got[0]["image"].endswith(".jpg")  # four questions, one figure
    with open(out.parent / got[0]["image"], "rb") as f, open(tmp_path / "arxiv" / "images/1704.01566_1.jpg", "rb") as g:
        assert f.read() == g.read()  # the JPEG's bytes, not re-encoded


def test_unique_images_keeps_the_first_row_of_each_image(tmp_path):
    argv, _ = docvqa(tmp_path)
    out = tmp_path / "data" / "docvqa.jsonl"
    stats = run("docvqa", argv, out, "--unique-images")
    assert [r["question"] for r in records(out)] == ["What is the date?"]
    assert stats["duplicates"] == 1


def test_llava_cot_rows_that_ask_for_no_box_are_another_kind_and_counted(tmp_path):
    argv, _ = llava_cot(tmp_path)
    stats = run("llava_cot", argv, tmp_path / "data" / "cot.jsonl")
    assert stats["other_kind"] == 1
    assert stats["counts"] == {"llava_cot_coco": {"iou": 1}, "llava_cot_vg": {"iou": 1}}


def test_limit_and_resume_give_the_same_file_as_one_run(tmp_path):
    argv, _ = arxivqa(tmp_path)
    once = tmp_path / "once" / "a.jsonl"
    run("arxivqa", argv, once)

    out = tmp_path / "twice" / "a.jsonl"
    assert run("arxivqa", argv, out, "--limit", "2")["written"] == 2
    with open(out, "a") as f:
        f.write('{"id": "arxivqa-00000')  # killed while writing the third record
    stats = run("arxivqa", argv, out)
    assert (stats["done_before"], stats["written"]) == (2, 2)
    with open(once) as f, open(out) as g:
        assert f.read() == g.read()


# ----------------------------------------------------------------------------------------------------
# Bad rows: the run stops naming source, row and field; with --skip-bad they are counted


def bad_rows(root):
    """{case: (source, local file, the message of its bad row, the middle one of three)}"""
    good = {"questionId": 1, "question": "What is the date?", "image": hub_image(image((0, 0, 0))),
            "answers": ["1/8/93"]}
    missing = {"questionId": 2, "question": "Who signed it?", "image": hub_image(image((0, 0, 0)))}
    broken = dict(good, questionId=3, image=hub_image(b"\x89PNG not really"))
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).save(buf, format="JPEG")  # noise: most of the file is image data
    truncated = dict(good, questionId=4, image=hub_image(buf.getvalue()[:len(buf.getvalue()) // 2]))
    write_files(root / "arxiv", {"images/f.jpg": image((1, 2, 3), fmt="JPEG")})
    label = {"id": "x", "image": "images/f.jpg", "question": "Which?", "options": ["A) 1", "B) 2", "C) 3", "D) 4"]}
    return {
        "missing answer": ("docvqa", write_parquet(root / "missing.parquet", [good, missing, good]),
                           "missing or empty field 'answers' (row has: image, question, questionId)"),
        "undecodable image": ("docvqa", write_parquet(root / "broken.parquet", [good, broken, good]),
                              "field 'image': not an image"),
        "truncated image": ("docvqa", write_parquet(root / "truncated.parquet", [good, truncated, good]),
                            "field 'image': unreadable"),
        "unknown option label": ("arxivqa", write_json(root / "arxiv" / "label.jsonl", [
            dict(label, label="A"), dict(label, label="E"), dict(label, label="(b)")], lines=True),
            "field 'label': 'E' is not one of the options A-D"),
    }


BAD = ["missing answer", "undecodable image", "truncated image", "unknown option label"]


@pytest.mark.parametrize("case", BAD)
def test_a_bad_row_stops_the_run_naming_source_row_and_field(tmp_path, case):
    name, local, message = bad_rows(tmp_path)[case]
    with pytest.raises(collect.BadRow) as e:
        run(name, ["--local", local], tmp_path / "data" / "out.jsonl")
    assert str(e.value).startswith(f"{name} ({local}) row 1")
    assert message in str(e.value)


@pytest.mark.parametrize("case", BAD)
def test_with_skip_bad_a_bad_row_is_counted_and_leaves_no_image(tmp_path, case, capsys):
    name, local, message = bad_rows(tmp_path)[case]
    out = tmp_path / "data" / "out.jsonl"
    stats = run(name, ["--local", local], out, "--skip-bad")
    assert stats["written"] == 2 and len(stats["bad"]) == 1 and message in stats["bad"][0]
    assert [r["id"] for r in records(out)] == [f"{name}-0000000", f"{name}-0000002"]
    assert len(os.listdir(out.parent / "images" / name)) == len({r["image"] for r in records(out)})
    assert "1 bad" in capsys.readouterr().out
    assert [r["reason"] for r in records(out.parent / "out.skipped.jsonl")] == stats["bad"]  # --skip-bad says why


def test_a_field_of_another_name_is_an_error_listing_the_fields_present(tmp_path):
    rows = [{"image": hub_image(image((0, 0, 0))), "question": "Q?", "answer": "yes"}]  # not ChartQA's names
    with pytest.raises(collect.BadRow, match=r"missing or empty field 'label' \(row has: answer, image, question\)"):
        run("chartqa", ["--local", write_parquet(tmp_path / "c.parquet", rows)], tmp_path / "out.jsonl")


def test_an_image_path_from_the_hub_needs_an_image_root(tmp_path):
    rows = [{"id": "1", "image": "images/f.jpg", "question": "Q?", "options": ["A) 1", "B) 2"], "label": "A"}]
    with pytest.raises(collect.BadRow, match="pass --image-root"):
        collect.collect(sources.arxivqa, "arxivqa", str(tmp_path / "out.jsonl"), rows, "MMInstruction/ArxivQA")


def test_math_puma_answers_that_give_only_the_parameter_are_bad_rows(tmp_path):
    argv, _ = math_puma(tmp_path)
    with open(argv[1]) as f:
        row = json.load(f)[0]
    row["output_2"] = "Step 1: solve for a.\n†Answer: a = -5."  # App. C.1: the function was asked for
    with pytest.raises(collect.BadRow, match="gives a parameter, the question asks for the function"):
        run("math_puma", ["--local", write_json(tmp_path / "synthesis" / "bad.json", [row])], tmp_path / "o.jsonl")


def test_a_source_with_no_hub_copy_asks_for_a_local_one(tmp_path):
    with pytest.raises(SystemExit, match="pass --local"):
        run("vizwiz", [], tmp_path / "out.jsonl")


# ----------------------------------------------------------------------------------------------------
# End to end: every converter's output through 01 -> 02 -> 03 with the toy teacher


def test_every_sources_records_flow_through_01_02_03(tmp_path):
    data = tmp_path / "data"
    written = {}
    for name, fixture in FIXTURES.items():
        os.makedirs(tmp_path / name)
        argv, _ = fixture(tmp_path / name)
        written |= run(name, argv, data / f"{name}.jsonl")["counts"]
    with open(data / "all.jsonl", "w") as f:  # one folder: the image paths of every file still resolve
        for name in FIXTURES:
            with open(data / f"{name}.jsonl") as g:
                f.write(g.read())

    caption.main(["--in", str(data / "all.jsonl"), "--out", str(tmp_path / "captioned.jsonl"),
                  "--backend", "toy", "--model", "captioner"])
    distill.main(["--in", str(tmp_path / "captioned.jsonl"), "--out", str(tmp_path / "distilled.jsonl"),
                  "--backend", "toy", "--model", "reasoner"])
    summary = rewrite_verify.main(["--in", str(tmp_path / "distilled.jsonl"), "--out", str(tmp_path / "final"),
                                   "--backend", "toy", "--rewriter-model", "rewriter", "--judge-model", "judge"])

    n = sum(sum(by_type.values()) for by_type in written.values())
    assert summary["total"] == n == 16
    assert {s: c["total"] for s, c in summary["by_source"].items()} == {s: sum(v.values()) for s, v in written.items()}
    assert summary["kept"] + sum(summary["dropped"].values()) == n
    kept_captions = {r["id"]: r["caption"] for r in records(tmp_path / "captioned.jsonl")}
    assert kept_captions["allava-0000000"] == "A teal square on grey."  # the source's caption, not the toy's
