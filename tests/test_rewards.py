"""rewards.py by example: what each verifier accepts, what it refuses, and the adversarial cases.

Every table row is one use: (model output, ground truth) -> reward. All offline, all on CPU.
"""

import math
import random
import threading
import time

import pytest

import rewards
from rewards import (
    RewardModel,
    digit_reward,
    extract_answer,
    format_ok,
    iou_reward,
    math_reward,
    mcq_reward,
    mixed_reward,
    open_reward,
    score_batch,
)


def done(answer, think="I look at the image."):
    """A well-formed completion."""
    return f"<think>{think}</think> <answer>{answer}</answer>"


# ---------------------------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("text, expected", [
    ("<think>count</think> <answer>3</answer>", "3"),
    ("<answer>  3 objects \n</answer>", "3 objects"),                       # stripped
    ("<answer>4</answer> wait, no. <answer>3</answer>", "3"),               # several blocks: the last
    ("<answer><answer>3</answer></answer>", "3"),                           # nested: innermost, last
    ("<answer>4</answer> <answer>3", None),                                 # last block unclosed
    ("<think>...</think> <answer>3", None),                                 # cut off by max_new_tokens
    ("<answer>3</answer> and some words after", "3"),                       # text outside is ignored
    ("<answer> </answer>", None),                                           # empty
    ("3</answer>", None),                                                   # close tag only
    ("The answer is 3.", None),                                             # no tags
    ("<ANSWER>3</ANSWER>", None),                                           # tags are exact, as prompted
    ("<think>maybe <answer>4</answer>?</think> <answer>3</answer>", "3"),
    ("<answer>\\boxed{3}</answer>", "\\boxed{3}"),                          # verifiers unwrap, not extraction
    ("", None),
    (None, None),
    (3, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_on_a_1mb_completion_is_fast():
    junk = "<think>" + "</answer><answer>x" * 60_000 + "</think>"  # about 1 MB of tag soup
    start = time.perf_counter()
    assert extract_answer(junk + "<answer>3</answer>") == "3"
    assert extract_answer(junk) is None  # the last <answer> is never closed
    assert format_ok(junk) is False
    assert mixed_reward(junk + "<answer>" + "9" * 1_000_000 + "</answer>",
                        {"answer": "3", "verifier_type": "digit"}) == 0.0  # over MAX_ANSWER_CHARS
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("text, ok", [
    ("<think>r</think> <answer>3</answer>", True),
    ("\n <think>r</think>\n\n<answer>3</answer>  \n", True),
    ("<think></think><answer>3</answer>", True),                            # empty thinking is allowed
    ("<answer>3</answer>", False),                                          # no think block
    ("<think>r</think> so <answer>3</answer>", False),                      # words between the blocks
    ("<think>r</think> <answer>3</answer> done", False),                    # words after
    ("hi <think>r</think> <answer>3</answer>", False),                      # words before
    ("<think>r</think> <answer> </answer>", False),                         # empty answer
    ("<think>r</think> <answer>3</answer><answer>3</answer>", False),       # repeated
    ("<think>a <think>b</think> <answer>3</answer>", False),                # nested think
    ("<answer>3</answer> <think>r</think>", False),                         # wrong order
    (None, False),
])
def test_format_ok(text, ok):
    assert format_ok(text) is ok


# ---------------------------------------------------------------------------------------------- digit

@pytest.mark.parametrize("pred, gold, reward", [
    ("3", "3", 1.0), ("3.", "3", 1.0), ("3 objects", "3", 1.0), (" 3 ", "3", 1.0),
    ("There are 3 objects.", "3", 1.0), ("three", "3", 1.0), ("3.0", "3", 1.0),
    ("\\boxed{3}", "3", 1.0), ("$3$", "3", 1.0), ("1,000", "1000", 1.0),
    ("３", "3", 1.0),                    # full-width digit
    ("٣", "3", 1.0),                     # Arabic-Indic digit
    ("4", "3", 0.0), ("3.5", "3", 0.0), ("-3", "3", 0.0), ("3rd", "3", 0.0),
    ("3 or 4", "3", 0.0),                # hedging never pays
    ("10 - 7 = 3", "3", 0.0),            # several numbers: not one stated answer
    ("", "3", 0.0), (None, "3", 0.0), ("no idea", "3", 0.0),
    ("0", "zero", 1.0),
])
def test_digit_reward(pred, gold, reward):
    assert digit_reward(pred, gold) == reward


def test_digit_reward_takes_the_sample_and_refuses_a_bad_gold():
    assert digit_reward("2", {"answer": "2", "verifier_type": "digit"}) == 1.0
    with pytest.raises(ValueError, match="not an integer"):
        digit_reward("2", "two or three")


# ---------------------------------------------------------------------------------------------- mcq

CHOICES = ["3 cm", "4 cm", "5 cm", "6 cm"]


@pytest.mark.parametrize("pred, gold, choices, reward", [
    ("B", "B", None, 1.0), ("B)", "B", None, 1.0), ("(b)", "B", None, 1.0), ("(B)", "b)", None, 1.0),
    ("B. 4 cm", "B", None, 1.0), ("B: 4 cm", "(b)", None, 1.0), ("b", "B", None, 1.0),
    ("The answer is B", "B", None, 1.0), ("Answer: (B)", "B", None, 1.0), ("\\boxed{B}", "B", None, 1.0),
    ("Ｂ", "B", None, 1.0),                                   # full-width letter
    ("A", "B", None, 0.0), ("B", "A. 3 cm", None, 0.0),
    ("a cat", "A", None, 0.0),                                # words, not option A
    ("A, B", "A", None, 0.0), ("", "A", None, 0.0), (None, "A", None, 0.0),
    ("4 cm", "B", CHOICES, 1.0),                              # the option's text
    ("4 CM.", "B", CHOICES, 1.0),
    ("B", "4 cm", CHOICES, 1.0),                              # gold given as text
    ("5 cm", "B", CHOICES, 0.0),
    ("E", "B", CHOICES, 0.0),                                 # no option E among four
    ("B", "B", ["A. 3 cm", "B. 4 cm", "C. 5 cm", "D. 6 cm"], 1.0),
    ("4 cm", "B", ["A. 3 cm", "B. 4 cm", "C. 5 cm", "D. 6 cm"], 1.0),  # labels in the choices are dropped
])
def test_mcq_reward(pred, gold, choices, reward):
    assert mcq_reward(pred, gold, choices) == reward


def test_mcq_reward_reads_choices_from_the_sample():
    sample = {"answer": "C", "choices": CHOICES, "verifier_type": "mcq"}
    assert mcq_reward("5 cm", sample) == 1.0
    with pytest.raises(ValueError, match="neither an option letter"):
        mcq_reward("A", {"answer": "7 cm", "choices": CHOICES})
    with pytest.raises(ValueError, match="neither an option letter"):
        mcq_reward("E", {"answer": "E", "choices": CHOICES})  # four options: there is no E


# ---------------------------------------------------------------------------------------------- math

@pytest.fixture(scope="module")
def math_helper():
    """Start a math helper once (about a second: it imports sympy and math-verify)."""
    assert math_reward("1", "2") == 0.0
    return True


@pytest.mark.parametrize("pred, gold, reward", [
    ("\\frac{3}{4}", "\\frac{3}{4}", 1.0),          # same spelling: no sympy needed
    ("0.75", "\\frac{3}{4}", 1.0), ("3/4", "\\frac{3}{4}", 1.0), ("\\dfrac{1}{2}", "0.5", 1.0),
    ("2\\sqrt{2}", "\\sqrt{8}", 1.0),               # bare LaTeX is wrapped in $...$ so it parses
    ("$2\\sqrt{2}$", "\\sqrt{8}", 1.0), ("\\boxed{5}", "5", 1.0),
    ("y = 3 + 2x", "y = 2x + 3", 1.0), ("2x + 3", "y = 2x + 3", 1.0), ("f(x) = x^2 + 1", "f(x)=1+x^2", 1.0),
    ("x = 2x + 3", "y = 2x + 3", 0.0),              # a different left side is a different answer
    ("y = 2x + 4", "y = 2x + 3", 0.0), ("6", "5", 0.0), ("0.333", "\\frac{1}{3}", 0.0),
    ("50\\%", "0.5", 1.0), ("1,000", "1000", 1.0), ("[0, 1)", "[0,1)", 1.0),
    ("red", "5", 0.0), ("", "5", 0.0), (None, "5", 0.0),
])
def test_math_reward(math_helper, pred, gold, reward):
    assert math_reward(pred, gold) == reward


@pytest.mark.parametrize("bomb", [
    "9^{9^{9^{9^9}}}",          # a power tower: sympy tries to evaluate it
    "10^{10^{10}}",
    "(10^{10})!",
    "\\frac{1}{2}" * 1000,      # a 10 KB LaTeX blob: over MAX_ANSWER_CHARS, never parsed
])
def test_math_bombs_score_zero_within_2s_even_off_the_main_thread(math_helper, bomb):
    out = []
    worker = threading.Thread(target=lambda: out.append(math_reward(bomb, "3")))
    start = time.perf_counter()
    worker.start()
    worker.join(timeout=10)
    assert out == [0.0] and time.perf_counter() - start < 2.0
    assert math_reward("\\frac{6}{2}", "3") == 1.0  # and the helper that was killed is replaced


def _math_in_a_worker(pair):
    return math_reward(*pair)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_math_reward_works_in_worker_processes(math_helper, start_method):
    """A forked child (a DataLoader worker) starts its own helper instead of sharing the parent's."""
    import multiprocessing
    with multiprocessing.get_context(start_method).Pool(1) as pool:
        assert pool.map(_math_in_a_worker, [("0.5", "\\frac{1}{2}"), ("0.4", "\\frac{1}{2}")]) == [1.0, 0.0]
    assert math_reward("1/2", "0.5") == 1.0  # and the parent's helper is untouched


def test_a_short_power_tower_is_not_a_bomb(math_helper):
    assert math_reward("9^9^9^9^9", "3") == 0.0  # in $...$ it reads left to right: (((9^9)^9)^9)^9 = 9^6561


# ---------------------------------------------------------------------------------------------- iou

GOLD_BOX = "[0.25, 0.00, 0.75, 0.50]"


@pytest.mark.parametrize("pred, sample_extra, reward", [
    ("[0.25, 0.00, 0.75, 0.50]", {}, 1.0),
    ("[0.25, 0.0, 0.75, 0.25]", {}, 0.5),                        # the top half of the gold box
    ("(0.25, 0.0), (0.75, 0.5)", {}, 1.0),                       # two corner points
    ('{"bbox": [0.25, 0, 0.75, 0.5]}', {}, 1.0),                 # JSON
    ('{"x1": 0.25, "y1": 0, "x2": 0.75, "y2": 0.5}', {}, 1.0),   # the 1s and 2s in "x1" are not numbers
    ('[{"bbox_2d": [160, 0, 480, 240], "label": "dog"}]', {"image_size": [640, 480]}, 1.0),  # pixels
    ("[160, 0, 480, 240]", {"width": 640, "height": 480}, 1.0),
    ("[160, 0, 480, 240]", {}, 0.0),                             # pixels but no image size
    ("[0.5, 0.25, 1.0, 0.75]", {}, 1 / 7),                        # overlap 0.0625 / union 0.4375
    ("[0.8, 0.6, 0.9, 0.9]", {}, 0.0),                           # disjoint
    ("[0.75, 0.5, 0.25, 0.0]", {}, 0.0),                         # corners swapped: malformed
    ("[0.3, 0.3, 0.3, 0.6]", {}, 0.0),                           # zero width: IoU would be 0/0
    ("[0.25, 0.0, 0.75]", {}, 0.0),                              # three numbers
    ("[nan, nan, nan, nan]", {}, 0.0),
    ("[0, 0, 1e999, 1e999]", {"image_size": [640, 480]}, 0.0),   # infinite
    ("[0.25, -1, 0.75, 0.5]", {}, 1.0),                          # clipped to the image first
    ("[0.25, 0.0, 0.75, 0.5]", {"image_size": [0, 0]}, 1.0),     # normalised: a bad size is not needed
    ("[160, 0, 480, 240]", {"width": 640}, 0.0),                 # half a size is no size
    ("", {}, 0.0), (None, {}, 0.0),
])
def test_iou_reward(pred, sample_extra, reward):
    sample = {"answer": GOLD_BOX, "verifier_type": "iou", **sample_extra}
    assert iou_reward(pred, sample) == pytest.approx(reward)


def test_iou_reward_refuses_a_gold_that_is_not_a_box():
    with pytest.raises(ValueError, match="not a box"):
        iou_reward("[0, 0, 1, 1]", "[0.5, 0.5, 0.5, 0.5]")


# ---------------------------------------------------------------------------------------------- open

class FakeRM:
    """A reward model that reads scores off a table and counts its calls."""

    def __init__(self, table):
        self.table, self.calls = table, 0

    def score(self, questions, answers, images=None):
        self.calls += 1
        return [self.table.get(a, 0.0) for a in answers]


OPEN = {"id": "o1", "question": "What does the sign say?", "answer": "open at nine", "verifier_type": "open"}


@pytest.mark.parametrize("s_pred, s_ref, reward", [
    (5.0, 0.0, 1 - math.exp(-1.0)),      # R = 1 - exp(-beta (S(pred) - S(ref))), beta 0.2
    (1.0, 0.0, 1 - math.exp(-0.2)),
    (0.0, 0.0, 0.0),                      # not better than the reference: 0
    (-3.0, 2.0, 0.0),
    (1e9, 0.0, 1.0),
    (float("nan"), 0.0, 0.0), (float("inf"), 0.0, 0.0),
])
def test_open_reward(s_pred, s_ref, reward):
    rm = FakeRM({"pred": s_pred, "open at nine": s_ref})
    assert open_reward("pred", OPEN, rm) == pytest.approx(reward)
    assert rm.calls == 1  # prediction and reference in one batch


def test_open_reward_beta_is_a_flag():
    assert open_reward("pred", OPEN, FakeRM({"pred": 1.0}), beta=1.0) == pytest.approx(1 - math.exp(-1.0))


# ---------------------------------------------------------------------------------------------- routing

DIGIT = {"id": "d1", "question": "How many?", "answer": "3", "verifier_type": "digit"}
MCQ = {"id": "m1", "question": "Which?", "answer": "B", "choices": CHOICES, "verifier_type": "mcq"}
MATH = {"id": "x1", "question": "Which function?", "answer": "y = 2x + 3", "verifier_type": "math"}
IOU = {"id": "i1", "question": "Locate the dog.", "answer": GOLD_BOX, "verifier_type": "iou"}


@pytest.mark.parametrize("completion, sample, format_weight, reward", [
    (done("3"), DIGIT, 0.0, 1.0),
    ("<answer>3</answer>", DIGIT, 0.0, 1.0),                 # the paper has no format term by default
    ("<answer>3</answer>", DIGIT, 0.3, 0.7),                 # opt-in: (1 - w) * answer + w * format_ok
    (done("4"), DIGIT, 0.3, 0.3),
    (done("3"), DIGIT, 0.3, 1.0),
    ("The answer is 3.", DIGIT, 0.3, 0.0),                   # no answer: 0, whatever the weight
    (done("4 cm"), MCQ, 0.0, 1.0),
    (done("y = 3 + 2x"), MATH, 0.0, 1.0),
    (done("[0.25, 0.0, 0.75, 0.25]"), IOU, 0.0, 0.5),
    (done("open at nine"), OPEN, 0.0, 0.0),                   # the reference itself: no gain
    (None, DIGIT, 0.0, 0.0), ("", MCQ, 0.0, 0.0),
])
def test_mixed_reward(math_helper, completion, sample, format_weight, reward):
    rm = FakeRM({"open at nine": 1.0})
    assert mixed_reward(completion, sample, rm=rm, format_weight=format_weight) == pytest.approx(reward)


def test_mixed_reward_errors_are_loud():
    with pytest.raises(ValueError, match="unknown verifier_type 'count'"):
        mixed_reward(done("3"), {**DIGIT, "verifier_type": "count"})
    with pytest.raises(ValueError, match="needs a reward model"):
        mixed_reward("no answer at all", OPEN)  # even without an answer: never a silent 0


def test_score_batch_matches_mixed_reward_and_logs_per_type(math_helper):
    rm = FakeRM({"the sign says open at nine": 5.0, "open at nine": 0.0})
    samples = [DIGIT, DIGIT, MCQ, MATH, MATH, IOU, OPEN, OPEN, OPEN]
    completions = [done("3"), done("4"), done("(b)"), done("2x + 3"), done("y = x"), "<answer>[0.25, 0, 0.75, 0.5]",
                   done("the sign says open at nine"), done("open at nine"), "no answer"]
    expected = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1 - math.exp(-1.0), 0.0, 0.0]
    for workers in (1, 2):
        rm.calls = 0
        got, stats = score_batch(completions, samples, rm=rm, workers=workers)
        assert got == pytest.approx(expected)
        assert rm.calls == 1  # every open answer and the shared reference: one call
        assert stats["count/digit"] == 2 and stats["reward_sum/digit"] == 1.0 and stats["count/open"] == 3
        assert stats["no_answer"] == 2 and stats["over_budget"] == 0
        # the same keys whatever the batch holds (ranks add them up), per-type means from the sums
        assert {k for k in stats if k.startswith("count/")} == {f"count/{t}" for t in rewards.VERIFIERS}
        assert rewards.per_type_rewards(stats)["reward/digit"] == 0.5
    assert [mixed_reward(c, s, rm) for c, s in zip(completions, samples)] == pytest.approx(expected)


def test_score_batch_errors():
    with pytest.raises(ValueError, match="2 completions but 1 samples"):
        score_batch(["a", "b"], [DIGIT])
    with pytest.raises(ValueError, match="needs a reward model"):
        score_batch([done("x")], [OPEN])


# ---------------------------------------------------------------------------------------------- property

FRAGMENTS = ["<answer>", "</answer>", "<think>", "</think>", "3", "B", "(a)", "0.5", "[", "]", ",", " ", "nan",
             "1e999", "-", "\\frac{1}{2}", "x", "=", "٣", "３", "\x00", "🙂", "{", "}", "$", ".", "\n", "0", "1"]


def random_text(rng):
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 25)))


def test_every_reward_stays_in_0_1(math_helper):
    rng = random.Random(0)
    rm = FakeRM({})
    samples = [DIGIT, MCQ, IOU, {**IOU, "image_size": [640, 480]}, OPEN, MATH]
    for i in range(600):
        sample = samples[i % len(samples)]
        if sample is MATH and i % 5:  # math goes through a helper process: fewer cases keep this fast
            continue
        completion = rng.choice([random_text(rng), "<answer>" + random_text(rng) + "</answer>"])
        rm.table = {extract_answer(completion): rng.uniform(-1e3, 1e3), "open at nine": rng.uniform(-5, 5)}
        for weight in (0.0, 0.5):
            r = mixed_reward(completion, sample, rm=rm, format_weight=weight)
            assert isinstance(r, float) and 0.0 <= r <= 1.0, (completion, sample["verifier_type"], r)


# ---------------------------------------------------------------------------------------------- reward models

def test_hf_reward_model_scores_a_batch_and_offloading_changes_nothing(tiny_rm_dir):
    questions = ["What does the sign say?"] * 3
    answers = ["The store opens at nine.", "I cannot tell.", "nine"]
    kept = RewardModel.from_pretrained(tiny_rm_dir, device="cpu", offload=False)
    offloaded = RewardModel.from_pretrained(tiny_rm_dir, device="cpu", offload=True)
    moves = []
    to = offloaded.model.to
    offloaded.model.to = lambda device: moves.append(str(device)) or to(device)
    scores = offloaded.score(questions, answers)
    assert moves == ["cpu", "cpu"]  # to the scoring device, then back to the CPU (both "cpu" here)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores) and len(set(scores)) == 3
    assert kept.score(questions, answers) == pytest.approx(scores)
    one_by_one = [kept.score([q], [a])[0] for q, a in zip(questions, answers)]
    assert one_by_one == pytest.approx(scores, abs=1e-5)  # padding does not change a score
    reward = open_reward(answers[0], {"question": questions[0], "answer": answers[1]}, kept)
    assert reward == pytest.approx(max(0.0, 1 - math.exp(-0.2 * (scores[0] - scores[1]))))


def test_remote_code_reward_model_needs_the_flag():
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        RewardModel.from_pretrained("internlm/internlm-xcomposer2d5-7b-reward", device="cpu")


def test_llm_judge_reward_model():
    seen = []

    def judge(requests, n=1, max_new_tokens=64, temperature=0.0):  # the shape of a vlm.py backend
        seen.extend(requests)
        replies = {"good": "9", "fair": "Score: 6/10", "bad": "I'd say 2.5", "odd": "no idea", "huge": "99"}
        return [[replies[r["prompt"].rsplit("Answer: ", 1)[1]]] for r in requests]

    rm = RewardModel.from_judge(judge)
    assert rm.score(["q"] * 5, ["good", "fair", "bad", "odd", "huge"]) == [9.0, 6.0, 2.5, 0.0, 10.0]
    assert len(seen) == 5 and seen[0]["image"] is None and seen[0]["system"]
    assert open_reward("good", {"question": "q", "answer": "fair"}, rm) == pytest.approx(1 - math.exp(-0.6))


def test_helpers_are_reused_across_calls(math_helper):
    from vlaa import mathverify

    before = mathverify._STARTED[0]
    for _ in range(3):
        score_batch([done("2x+3")] * 4, [MATH] * 4, workers=2)
    assert mathverify._STARTED[0] <= max(before, mathverify.max_helpers())
