"""The mixed reward of VLAA-Thinking: one number in [0, 1] per model output.

paper (§4.1, Fig. 4): each RL sample is checked by one of five verifiers, chosen by its
`verifier_type`; no weights between them, no reward on the thinking.

    digit  CLEVR-Math counts              digit_reward  integer match                   {0, 1}
    mcq    GeoQA170K, ArxivQA             mcq_reward    option letter (or option text)  {0, 1}
    math   Math PUMA                      math_reward   math-verify equivalence         {0, 1}
    iou    LLaVA-CoT COCO, VisualGenome   iou_reward    IoU of the two boxes            [0, 1]
    open   DocVQA, VizWiz, ALLaVA         open_reward   reward model, pred vs reference [0, 1)

Routing: `mixed_reward(completion, sample)` takes the `<answer>` block out of the completion
(`extract_answer`) and hands it to `VERIFIERS[sample["verifier_type"]]`. No extractable answer
scores 0: the paper's implicit format reward. An unknown type, or an `open` sample without a
reward model, is an error, never a silent 0. `score_batch` does the same for a whole GRPO batch,
within a time budget. `is_correct(reward)` is the one rule for "this answer counts as right".

Used by 03_rewrite_verify.py (is the teacher right?), 05_grpo.py (training rewards, `score_batch`)
and 06_eval.py (scoring toy and jsonl runs). The values an answer states (integers, options, boxes)
are read by vlaa/answers.py, the same way for gold and prediction.

Safety: model output is parsed, never eval'd. math-verify runs in helper processes that are killed
when late (vlaa/mathverify.py), which also makes `math_reward` safe from any thread.
"""

import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

from vlaa.answers import MAX_ANSWER_CHARS, box_image_size, canon_math, read_box, read_integer, read_option
from vlaa.mathverify import ask_math, max_helpers
from vlaa.records import VERIFIER_TYPES

BETA = 0.2           # open reward slope: the paper gives none; ScoreRS, the formula's source, uses 0.2
MATH_TIMEOUT = 1.0   # seconds one math check may take; then its worker is killed and the reward is 0
BATCH_BUDGET = 60.0  # seconds score_batch may spend on math per call; later items score 0 and are counted
CORRECT_AT = 0.5     # a reward at or above this counts as a right answer (for iou: IoU >= 0.5)


# --- the answer, and an opt-in strict format check ---------------------------------------------

def extract_answer(text):
    """The stripped content of the `<answer>...</answer>` block, or None. The paper's extractor is not
    public, so we decide:
    - several blocks: the LAST counts (drafts come first); nested `<answer><answer>3</answer></answer>`: "3";
    - an unclosed last `<answer>` (cut off by max_new_tokens): None, a truncated output has no answer;
    - text outside the tags is ignored (`format_ok` can penalise it); an empty block is None.
    str.rfind/find only: a 1 MB completion costs one linear scan, and no regex can backtrack."""
    if not isinstance(text, str):
        return None
    start = text.rfind("<answer>")
    if start < 0:
        return None
    end = text.find("</answer>", start)
    return (text[start + len("<answer>"):end].strip() or None) if end >= 0 else None


def last_boxed(text):
    """Content of the last \\boxed{...}, braces balanced (\\boxed{\\frac{1}{2}}), stripped. None when there
    is none, it is unclosed (cut off by max_new_tokens) or it is empty: an empty box states no answer, so
    whoever reads the text may look for one elsewhere."""
    start = (text or "").rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip() or None
    return None


def format_ok(text):
    """Strict: `<think>...</think>`, whitespace, `<answer>...</answer>`, each tag once, a non-empty answer,
    nothing else but surrounding whitespace. Not in the paper; opt in with `format_weight`."""
    s = text.strip() if isinstance(text, str) else ""
    if not (s.startswith("<think>") and s.endswith("</answer>")):
        return False
    if any(s.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return False
    think_end, answer_start = s.index("</think>") + len("</think>"), s.index("<answer>")
    return answer_start >= think_end and not s[think_end:answer_start].strip() and extract_answer(s) is not None


def is_correct(reward):
    """The one rule for "right": 03 keeps a teacher's answer, 05 logs accuracy and 06 scores toy/jsonl
    runs with it. Rule-based rewards are 0 or 1; a box counts as found at IoU >= 0.5 (the usual
    grounding threshold)."""
    return reward >= CORRECT_AT


def _gold(sample_or_gold):
    """Verifiers take the sample dict or the ground-truth string itself."""
    return str(sample_or_gold["answer"] if isinstance(sample_or_gold, dict) else sample_or_gold)


def _usable(pred):
    return isinstance(pred, str) and 0 < len(pred) <= MAX_ANSWER_CHARS


# --- digit: CLEVR-Math counting -----------------------------------------------------------------

def digit_reward(pred, gold):
    """paper (Fig. 4): "exact digit match"."""
    want = read_integer(_gold(gold))
    if want is None:
        raise ValueError(f"digit gold answer {_gold(gold)!r} is not an integer")
    return float(_usable(pred) and read_integer(pred) == want)


# --- mcq: GeoQA170K, ArxivQA --------------------------------------------------------------------

def mcq_reward(pred, gold, choices=None):
    """paper (App. C.1): ArxivQA letters came as "A", "A)", "(a)", ... and were normalised; we read
    both sides the same way, and accept the option's text when the choices are known."""
    if isinstance(gold, dict) and choices is None:
        choices = gold.get("choices")
    want = read_option(_gold(gold), choices)
    if want is None:
        raise ValueError(f"mcq gold answer {_gold(gold)!r} is neither an option letter nor one of the choices")
    return float(_usable(pred) and read_option(pred, choices) == want)


# --- math: Math PUMA, math-verify in killable helper processes -----------------------------------

_LHS = re.compile(r"\s*([A-Za-z](?:_\{?\w\}?)?(?:\s*\(\s*[a-z]\s*\))?)\s*=")


def _drop_lhs(gold, pred):
    """"y = 2x + 3" vs "y = 3 + 2x" -> "2x + 3" vs "3 + 2x". Math PUMA asks for function expressions, and
    sympy compares two expressions in ~1 ms but two equations (it solves them) in ~100 ms. Only a shared
    left side, or one on a single side, is dropped: "x = ..." vs "y = ..." stay as they are."""
    sides = []
    for s in (gold, pred):
        m = _LHS.match(s.strip("$ ")) if s.count("=") == 1 and not re.search(r"[<>]|\\[lg]eq?\b", s) else None
        sides.append((m.group(1).replace(" ", ""), s.strip("$ ")[m.end():].strip()) if m else (None, s))
    (g_lhs, g_rhs), (p_lhs, p_rhs) = sides
    return (gold, pred) if g_lhs and p_lhs and g_lhs != p_lhs else (g_rhs, p_rhs)


def math_reward(pred, gold, timeout=MATH_TIMEOUT):
    """paper (Fig. 4): "HF math_verify". 1.0 when math-verify proves the answer equals the gold. A check
    slower than `timeout` s scores 0 (a warm worker is up again in milliseconds). Safe from any thread
    or process; the very first call also waits about a second for a helper to import sympy."""
    if not _usable(pred):
        return 0.0
    gold, pred = _drop_lhs(_gold(gold).strip(), pred.strip())
    if not pred:
        return 0.0
    if canon_math(pred) == canon_math(gold):  # same spelling: no need for sympy
        return 1.0
    return ask_math(gold, pred, timeout) or 0.0  # None: too late


# --- iou: LLaVA-CoT grounding -------------------------------------------------------------------

def iou_reward(pred, gold, image_size=None):
    """paper (Fig. 4): the IoU itself, continuous, for training (is_correct: IoU >= 0.5 counts as right).
    The image size comes from the argument, or the sample's `image_size` [w, h] or `width`/`height`."""
    if isinstance(gold, dict) and image_size is None:
        image_size = box_image_size(gold)
    want = read_box(_gold(gold), image_size)
    if want is None:
        raise ValueError(f"iou gold answer {_gold(gold)!r} is not a box (pixel boxes need image_size)")
    got = read_box(pred, image_size) if _usable(pred) else None
    if got is None:
        return 0.0
    width = min(got[2], want[2]) - max(got[0], want[0])
    height = min(got[3], want[3]) - max(got[1], want[1])
    inter = max(width, 0.0) * max(height, 0.0)
    union = (got[2] - got[0]) * (got[3] - got[1]) + (want[2] - want[0]) * (want[3] - want[1]) - inter
    return min(max(inter / union, 0.0), 1.0)  # union > 0: both boxes have an area


# --- open: a reward model compares the answer with the reference --------------------------------

def _open_from_scores(s_pred, s_ref, beta=BETA):
    """paper (§4.1, after Muhtar et al. 2025): R = 1 - exp(-beta (S(pred) - S(ref))) if S(pred) > S(ref),
    else 0; in [0, 1) "to be consistent with rule-based reward scale, partially avoiding reward hacking"."""
    gap = s_pred - s_ref
    return 1.0 - math.exp(-beta * gap) if math.isfinite(gap) and gap > 0 else 0.0


def open_reward(pred, sample, rm, beta=BETA):
    """Scores the answer and the sample's reference with the same reward model, in one call."""
    if rm is None:
        raise ValueError("an `open` sample needs a reward model or an LLM judge (rm=RewardModel...)")
    if not _usable(pred):
        return 0.0
    q, image = sample["question"], sample.get("image")
    return _open_from_scores(*rm.score([q, q], [pred, _gold(sample)], [image, image]), beta)


class RewardModel:
    """S(question, answer, image) for a whole batch in one call, from any
    `score_fn(questions, answers, images) -> list[float]`. With a torch `model` and offload=True the model
    lives on the CPU and visits `device` only while it scores. paper (§4): the RM "is offloaded to CPU"
    between uses, leaving the GPU to the policy."""

    def __init__(self, score_fn, model=None, device="cpu", offload=False):
        self.score_fn, self.model, self.device, self.offload = score_fn, model, device, offload
        if model is not None:
            model.to("cpu" if offload else device)

    def score(self, questions, answers, images=None):
        moves = self.model is not None and self.offload
        if moves:
            self.model.to(self.device)
        try:
            return [float(s) for s in self.score_fn(questions, answers, images or [None] * len(answers))]
        finally:
            if moves:
                self.model.to("cpu")
                import torch
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    @classmethod
    def from_pretrained(cls, path, device="cuda", offload=True, trust_remote_code=False, batch_size=16,
                        max_length=2048):
        """(a) any Hugging Face sequence-classification RM: text only, score = logits[:, 0]; or (b) the
        paper's internlm/internlm-xcomposer2d5-7b-reward, which sees the image, through its own
        get_scores API: remote code, so only with trust_remote_code=True."""
        import torch
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
        if "xcomposer" in str(path).lower():
            if not trust_remote_code:
                raise ValueError(f"{path} runs its own code from the Hub: pass trust_remote_code=True if you trust it")
            model = AutoModel.from_pretrained(path, dtype=torch.float16, trust_remote_code=True).eval()
            model.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)

            @torch.no_grad()
            def score_xcomposer(questions, answers, images):
                with torch.autocast(device_type=device.split(":")[0], dtype=torch.float16):
                    return model.get_scores([_chat(q, a) for q, a in zip(questions, answers)],
                                            [[im] if im else [] for im in images], hd_num=9)
            return cls(score_xcomposer, model, device, offload)

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code).eval()
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        if model.config.pad_token_id is None:  # the model finds each row's last real token by the pad id
            model.config.pad_token_id = tokenizer.pad_token_id

        @torch.no_grad()
        def score_hf(questions, answers, images):
            texts = [tokenizer.apply_chat_template(_chat(q, a), tokenize=False) if tokenizer.chat_template
                     else f"{q}\n{a}" for q, a in zip(questions, answers)]
            scores = []
            for i in range(0, len(texts), batch_size):
                batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                                  max_length=max_length).to(model.device)
                scores += model(**batch).logits[:, 0].float().tolist()
            return scores
        return cls(score_hf, model, device, offload)

    @classmethod
    def from_judge(cls, gen, max_score=10):
        """(c) an LLM judge: any vlaa.backends backend, `gen(requests, n, max_new_tokens, temperature) ->
        list[list[str]]`, rates each answer 0..max_score. The first number in the reply is the score; no
        number scores 0 (the lowest), so S(pred) and S(ref) come from the same judge by the same rule."""
        system = "You are a strict grader of answers to questions about images."
        prompt = ("Rate how correct and helpful the answer is, from 0 (worst) to {m} (best). "
                  "Reply with the number only.\n\nQuestion: {q}\n\nAnswer: {a}")

        def score_judge(questions, answers, images):
            requests = [{"prompt": prompt.format(m=max_score, q=q, a=a), "image": _pil(im), "system": system}
                        for q, a, im in zip(questions, answers, images)]
            replies = gen(requests, n=1, max_new_tokens=16, temperature=0.0)
            numbers = [re.search(r"-?\d+(?:\.\d+)?", r[0] if r else "") for r in replies]
            return [min(max(float(m.group()), 0.0), max_score) if m else 0.0 for m in numbers]
        return cls(score_judge)


def _chat(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _pil(image):
    """The judge backends take PIL images; records hold paths."""
    if isinstance(image, str):
        from vlaa.images import load_image
        return load_image(image) if os.path.exists(image) else None
    return image


# --- routing: one completion, and a whole GRPO batch --------------------------------------------

VERIFIERS = {"digit": digit_reward, "mcq": mcq_reward, "math": math_reward, "iou": iou_reward, "open": open_reward}
assert tuple(VERIFIERS) == VERIFIER_TYPES  # the record schema and the verifiers name the same types


def _check_type(sample, rm):
    vtype = sample.get("verifier_type")
    if vtype not in VERIFIERS:
        raise ValueError(f"sample {sample.get('id')!r}: unknown verifier_type {vtype!r}; known: {sorted(VERIFIERS)}")
    if vtype == "open" and rm is None:
        raise ValueError(f"sample {sample.get('id')!r} is `open`: it needs a reward model or an LLM judge "
                         "(RewardModel.from_pretrained(...) or .from_judge(...)), or drop open samples")
    return vtype


def _with_format(reward, completion, format_weight):
    """Opt-in explicit format term, not in the paper (ScoreRS uses 0.3):
    reward = (1 - w) * answer_reward + w * format_ok(completion)."""
    return (1.0 - format_weight) * reward + format_weight * format_ok(completion) if format_weight else reward


def mixed_reward(completion, sample, rm=None, format_weight=0.0, beta=BETA):
    """The reward of one completion for one sample, in [0, 1], routed by sample["verifier_type"]."""
    vtype = _check_type(sample, rm)
    answer = extract_answer(completion)
    if answer is None:
        reward = 0.0  # paper: the implicit format reward, no answer -> 0 whatever else is right
    else:
        reward = open_reward(answer, sample, rm, beta) if vtype == "open" else VERIFIERS[vtype](answer, sample)
    return _with_format(reward, completion, format_weight)


def score_batch(completions, samples, rm=None, format_weight=0.0, workers=None, beta=BETA, budget=BATCH_BUDGET):
    """(rewards, stats) for a GRPO rollout batch. stats has the same keys whatever the batch holds, so ranks
    can add them up: "count/<type>" and "reward_sum/<type>" for every verifier type, "no_answer" (the number
    with no extractable answer) and "over_budget" (math checks not started within `budget` seconds: they
    score 0; a step never stalls on hostile output, each check being bounded by MATH_TIMEOUT too).

    Math, the one slow verifier, fans out over up to `workers` helper processes (persistent, reused by every
    call; default: this rank's share of the node's CPUs). digit, mcq and iou cost microseconds and run
    inline. The reward model scores every open answer and each distinct reference in ONE call: one trip to
    the GPU a step."""
    if len(completions) != len(samples):
        raise ValueError(f"{len(completions)} completions but {len(samples)} samples")
    deadline = time.monotonic() + budget
    types = [_check_type(s, rm) for s in samples]
    answers = [extract_answer(c) for c in completions]
    rewards = [0.0] * len(samples)
    todo = [i for i, a in enumerate(answers) if a is not None]
    for i in todo:
        if types[i] in ("digit", "mcq", "iou"):
            rewards[i] = VERIFIERS[types[i]](answers[i], samples[i])

    over_budget = [0]

    def math_within_budget(i):
        left = deadline - time.monotonic()
        if left <= 0:
            over_budget[0] += 1
            return 0.0
        return math_reward(answers[i], samples[i], timeout=min(MATH_TIMEOUT, left))

    maths = [i for i in todo if types[i] == "math"]
    with ThreadPoolExecutor(max(1, min(int(workers or max_helpers()), max(len(maths), 1)))) as pool:
        for i, r in zip(maths, pool.map(math_within_budget, maths)):  # the threads only wait on helpers
            rewards[i] = r

    opens = [i for i in todo if types[i] == "open" and _usable(answers[i])]
    if opens:
        def key(i):
            return samples[i]["question"], _gold(samples[i]), samples[i].get("image")
        refs = list(dict.fromkeys(key(i) for i in opens))  # a GRPO group shares its reference: score it once
        scores = rm.score([samples[i]["question"] for i in opens] + [q for q, _, _ in refs],
                          [answers[i] for i in opens] + [a for _, a, _ in refs],
                          [samples[i].get("image") for i in opens] + [im for _, _, im in refs])
        ref_score = dict(zip(refs, scores[len(opens):]))
        for i, s in zip(opens, scores):
            rewards[i] = _open_from_scores(s, ref_score[key(i)], beta)

    rewards = [float(_with_format(r, c, format_weight)) for r, c in zip(rewards, completions)]
    stats = {"no_answer": float(len(samples) - len(todo)), "over_budget": float(over_budget[0])}
    for vtype in VERIFIER_TYPES:
        mine = [r for r, t in zip(rewards, types) if t == vtype]
        stats[f"count/{vtype}"], stats[f"reward_sum/{vtype}"] = float(len(mine)), float(sum(mine))
    return rewards, stats


def per_type_rewards(stats):
    """reward/<type> = its reward sum / its count, for the types present (after adding up over ranks)."""
    return {f"reward/{t}": stats[f"reward_sum/{t}"] / stats[f"count/{t}"] for t in VERIFIER_TYPES
            if stats.get(f"count/{t}")}
