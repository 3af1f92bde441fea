"""The toy world by example: make-data records, the captioner reading pixels, the R1-like reasoner and its dials."""

import json
import os
import random
import re
import statistics

import pytest

import toy
from vlaa.records import has_aha  # the paper's aha words, as 03 splits by them

SCENE = [("red", "circle", (32, 4, 52, 24)), ("blue", "square", (56, 56, 112, 112))]
CAPTION = """Setting: a flat synthetic image, 112 by 112 pixels, plain light grey background, a 4 by 4 grid of cells.
Objects (2):
- a red circle (rgb 224, 46, 22) at row 1, column 2, x 32-52, y 4-24
- a blue square (rgb 36, 82, 231) at rows 3-4, columns 3-4, x 56-112, y 56-112
Text: none."""


def distill_prompt(caption, question):
    """The tail 02_distill.py writes: the reasoner reads the last Caption and Question blocks."""
    return f"Pretend you see the image.\n\nCaption:\n{caption}\n\nQuestion:\n{question}"


def examples(n, world=None, tasks=None):
    """n fresh (record, scene, image) triples over all tasks (or the given ones)."""
    tasks = tasks or list(toy.TASKS)
    return [toy.make_example(random.Random(i), tasks[i % len(tasks)], world or toy.World()) for i in range(n)]


def final_answer(trace):
    return trace.rpartition("</think>")[2].strip()


# ----------------------------------------------------------------------------------------------------
# make-data


@pytest.mark.parametrize("task", list(toy.TASKS))
def test_every_task_makes_a_valid_record(task):
    record, scene, image = toy.make_example(random.Random(0), task, toy.World())
    _, verifier_type, source = toy.TASKS[task]
    assert record["verifier_type"] == verifier_type and record["source"] == source and record["task"] == task
    assert image.size == (112, 112) and record["question"].endswith(("?", ".", "yellow"))
    answer = record["answer"]
    if verifier_type == "mcq":
        assert answer in "ABCD" and record["choices"] == ["red", "green", "blue", "yellow"]
        assert record["question"].endswith("A. red B. green C. blue D. yellow")
    else:
        assert "choices" not in record
    if verifier_type in ("digit", "math"):
        assert re.fullmatch(r"-?\d+", answer)
    if verifier_type == "iou":
        assert re.fullmatch(r"\[\d\.\d\d, \d\.\d\d, \d\.\d\d, \d\.\d\d\]", answer)
    assert scene["objects"] or scene["text"]  # the scene exists, but only in the pixels


def test_make_data_writes_records_images_and_the_same_bytes_twice(tmp_path):
    for out in ("a", "b"):
        toy.main(["make-data", str(tmp_path / out), "--n", "40", "--test-n", "8", "--seed", "3"])
    train, test = ([json.loads(line) for line in (tmp_path / "a" / f"{split}.jsonl").read_text().splitlines()]
                   for split in ("train", "test"))
    assert len(train) == 40 and len(test) == 8 and len({r["id"] for r in train + test}) == 48
    assert train[0]["id"] == "train-000000" and train[0]["image"] == "images/train-000000.png"
    assert list(train[0])[:5] == ["id", "image", "question", "answer", "verifier_type"]
    for r in train + test:
        assert os.path.exists(tmp_path / "a" / r["image"])
        assert set(r) <= {"id", "image", "question", "answer", "verifier_type", "choices", "source", "task"}
    for name in ["train.jsonl", "test.jsonl", "images/train-000039.png", "images/test-000007.png"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_direct_answers_are_right_plain_and_in_the_output_format():
    records, traces = [], []
    for record, scene, _ in examples(500):
        records.append(record)
        traces.append(toy.direct_response(record, scene, toy.World()))
    assert all(re.fullmatch(r"<think>[^<]+</think> <answer>[^<]+</answer>", t) for t in traces)
    assert all(t.endswith(f"<answer>{r['answer']}</answer>") for r, t in zip(records, traces))
    assert not any(map(has_aha, traces))  # the instruct model's own voice never hesitates
    record, scene, _ = toy.make_example(random.Random(0), "remove", toy.World())
    assert toy.direct_response(record, scene, toy.World()) == \
        "<think>The image shows 4 objects, 0 of them red. 4 - 0 = 4.</think> <answer>4</answer>"


def test_make_data_with_responses_adds_only_the_response(tmp_path):
    toy.main(["make-data", str(tmp_path / "plain"), "--n", "12", "--test-n", "2", "--seed", "5"])
    toy.main(["make-data", str(tmp_path / "direct"), "--n", "12", "--test-n", "2", "--seed", "5", "--responses"])
    for split in ("train", "test"):
        plain, direct = ([json.loads(line) for line in (tmp_path / d / f"{split}.jsonl").read_text().splitlines()]
                         for d in ("plain", "direct"))
        assert [{k: v for k, v in r.items() if k != "response"} for r in direct] == plain
        assert all(r["response"].endswith(f"<answer>{r['answer']}</answer>") for r in direct)


def test_the_default_mix_has_all_five_verifier_types_and_favours_the_learnable_tasks():
    mix = toy.parse_mix(toy.DEFAULT_MIX)
    assert {toy.TASKS[t][1] for t in mix} == {"digit", "mcq", "math", "iou", "open"}
    assert mix["colour"] == mix["box"] == mix["count"] == 2 and mix["sum"] == mix["shapes"] == 1
    assert toy.parse_mix("colour:3,sum") == {"colour": 3.0, "sum": 1.0}
    with pytest.raises(ValueError, match="unknown task 'colur'.*known: colour, largest"):
        toy.parse_mix("colur")


@pytest.mark.parametrize("kinds, says", [
    ("colur", "unknown task 'colur'"), ("colour:x", "weight 'x' of 'colour'"), ("count:-1", "weight '-1' of 'count'"),
    ("box:0", "weight '0' of 'box'"), ("sum:nan", "weight 'nan' of 'sum'"), ("colour,", "unknown task ''")])
def test_a_bad_kinds_flag_is_a_usage_error_naming_it(kinds, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        toy.main(["make-data", str(tmp_path / "data"), "--kinds", kinds])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--kinds" in err and says in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()  # refused before anything is written


def test_harder_variants_are_one_flag_away():
    world = toy.World(size=168, max_objects=6, grid=8, shuffle_options=True)
    records = [r for r, _, _ in examples(200, world, ["largest", "box", "count"])]
    assert {r["choices"][0] for r in records if "choices" in r} == {"red", "green", "blue", "yellow"}
    assert {r["answer"] for r in records if r["task"] == "count"} == {"1", "2", "3", "4", "5", "6"}
    assert any("0.12" in r["answer"] or "0.38" in r["answer"] for r in records if r["task"] == "box")  # eighths


# ----------------------------------------------------------------------------------------------------
# The captioner reads the pixels


def test_captioner_writes_a_structured_caption_from_pixels_alone():
    image = toy.draw_image(random.Random(0), 112, SCENE)
    captioner = toy.make_teacher("captioner")
    assert captioner([{"prompt": "Describe the image.", "image": image, "system": None}]) == [[CAPTION]]
    with pytest.raises(ValueError, match="needs request\\['image'\\]"):
        captioner([{"prompt": "Describe the image.", "image": None, "system": None}])


def test_seven_segment_text_reads_back_exactly():
    for text in ["0123", "4567", "89", "7-3", "5+2", "3 9"]:
        image = toy.draw_image(random.Random(0), 112, text=text)
        assert toy.read_image(image) == ([], text)
    assert 'Text: "5+2"' in toy.caption_image(toy.draw_image(random.Random(0), 112, text="5+2"))


def test_captioner_matches_the_scene_on_500_images():
    right = 0
    for record, scene, image in examples(500):
        objects, text = toy.read_image(image)
        seen = [o[:3] for o in objects]  # (colour, shape, box); the fourth item is the exact shade
        right += seen == sorted(scene["objects"], key=lambda o: (o[2][1], o[2][0])) and text == scene["text"]
    assert right / 500 >= 0.99


# ----------------------------------------------------------------------------------------------------
# The reasoner: caption and question in, R1-style trace out


def test_a_plain_trace_speaks_as_if_it_saw_the_image():
    reasoner = toy.make_teacher("reasoner", error_rate=0, hesitation_rate=0, caption_mention_rate=0)
    questions = ["Remove all red objects. How many objects are left?", "Give the bounding box of the blue square."]
    out = reasoner([{"prompt": distill_prompt(CAPTION, q), "image": None, "system": None} for q in questions])
    assert out == [["<think> The image shows 2 objects, 1 of them red. 2 - 1 = 1. </think> 1"],
                   [("<think> The image shows the blue square from x 0.50 to 1.00 and y 0.50 to 1.00. "
                     "That is the box. </think> [0.50, 0.50, 1.00, 1.00]")]]


def reason_all(n, **options):
    """(records, traces): the reasoner on the captioner's captions of n fresh records, via the teacher API."""
    records, images = zip(*[(r, im) for r, _, im in examples(n)])
    captions = [c for [c] in toy.make_teacher("captioner")([{"prompt": "", "image": im} for im in images])]
    reasoner = toy.make_teacher("reasoner", **options)
    traces = reasoner([{"prompt": distill_prompt(c, r["question"])} for c, r in zip(captions, records)], seed=0)
    return records, [t for [t] in traces]


def test_without_errors_the_reasoner_answers_from_the_caption_correctly():
    records, traces = reason_all(500, error_rate=0)
    right = sum(final_answer(t) == r["answer"] for r, t in zip(records, traces))
    assert right / 500 >= 0.99


def test_error_rate_makes_about_that_share_of_answers_wrong():
    records, traces = reason_all(500, error_rate=0.2, hesitation_rate=0)
    wrong = sum(final_answer(t) != r["answer"] for r, t in zip(records, traces)) / 500
    assert abs(wrong - 0.2) < 0.06  # 3 sigma of 500 draws


def test_hesitation_rate_sets_the_share_of_traces_with_aha_words_and_makes_them_longer():
    shares = {}
    for rate in (0.0, 0.3, 1.0):
        _, traces = reason_all(300, hesitation_rate=rate, caption_mention_rate=0.3)
        shares[rate] = sum(map(has_aha, traces)) / 300
    assert shares[0.0] == 0.0 and shares[1.0] == 1.0 and abs(shares[0.3] - 0.3) < 0.08
    caption = CAPTION
    plain, hesitant = (toy.reason(caption, "How many objects are there?", random.Random(1), 0, h, 0) for h in (0, 1))
    assert plain == "<think> The image shows 2 objects. So there are 2. </think> 2"
    assert has_aha(hesitant) and len(hesitant) > len(plain) and final_answer(hesitant) == "2"


def test_traces_are_short_with_the_tiny_tokenizer():
    tokenizer = toy.build_tokenizer(toy.tokenizer_corpus())
    lengths = {}
    for rate in (0, 1):
        _, traces = reason_all(200, error_rate=0, hesitation_rate=rate, caption_mention_rate=0)
        lengths[rate] = statistics.mean(len(tokenizer(t)["input_ids"]) for t in traces)
    assert lengths[0] <= 30 and lengths[1] > 1.5 * lengths[0]  # plain: 30 tokens at most; hesitant: longer
    assert "3" in tokenizer.tokenize("<answer>3</answer>")  # an answer stays a token of its own


def test_seed_makes_the_teacher_deterministic_and_n_samples_differ():
    reasoner = toy.make_teacher("reasoner", hesitation_rate=0.5, error_rate=0.5)
    request = {"prompt": distill_prompt(CAPTION, "How many objects are there?"), "image": None, "system": None}
    first = reasoner([request], n=8, seed=1)
    assert first == reasoner([request], n=8, seed=1) != reasoner([request], n=8, seed=2)
    assert len(first[0]) == 8 and len(set(first[0])) > 1


# ----------------------------------------------------------------------------------------------------
# 03's rewriter and judge, and the spec that selects a role


def test_caption_mentions_and_the_rewriter_that_removes_them():
    mention = toy.reason(CAPTION, "How many objects are there?", random.Random(1), 0, 0, caption_mention_rate=1)
    assert mention in ("<think> The caption says 2 objects. So there are 2. </think> 2",
                       "<think> The description mentions 2 objects. So there are 2. </think> 2")
    rewriter = toy.make_teacher("rewriter")
    text = "The caption says 2 objects.\nAccording to the description, both are small. The rationale: none."
    assert rewriter([{"prompt": f"Rewrite it.\n\nText:\n{text}"}]) == \
        [["The image shows 2 objects.\nAccording to the image, both are small. The image: none."]]


def test_judge_says_yes_only_when_the_answers_match():
    judge = toy.make_teacher("judge")
    prompts = ["Ground truth: circle, triangle\nAnswer:  Circle, triangle.", "Ground truth: 3\nAnswer: 4",
               "Ground truth: 7\nAnswer: 9\n\nGround truth: B\nAnswer: <think> ok </think> <answer>B</answer>"]
    assert judge([{"prompt": p} for p in prompts]) == [["Yes"], ["No"], ["Yes"]]


def test_teacher_spec_names_the_role_and_its_options():
    assert toy.parse_teacher_spec("reasoner:error_rate=0.1,hesitation_rate=0.3") == \
        ("reasoner", {"error_rate": 0.1, "hesitation_rate": 0.3})
    assert toy.parse_teacher_spec("judge") == ("judge", {})
    with pytest.raises(ValueError, match="known: captioner, reasoner, rewriter, judge"):
        toy.parse_teacher_spec("critic")
    with pytest.raises(ValueError, match="known: error_rate, hesitation_rate, caption_mention_rate"):
        toy.parse_teacher_spec("reasoner:temperature=0.5")
    with pytest.raises(ValueError, match="known: none"):
        toy.make_teacher("captioner", error_rate=0.1)
    with pytest.raises(ValueError, match="probability"):
        toy.make_teacher(*toy.parse_teacher_spec("reasoner:error_rate=2"))
