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
reward model, is an error, never a silent 0. `score_batch` does the same for a whole GRPO batch.

Used by 03_rewrite_verify.py (is the teacher right?), 05_grpo.py (training rewards, `score_batch`)
and 06_eval.py (scoring jsonl and toy runs). Importing it imports only the standard library.

Safety: model output is parsed, never eval'd. sympy (under math-verify) can hang on `9^{9^{9^9}}`
inside C code that no signal interrupts, so math runs in helper processes that are killed when
late; that also makes `math_reward` safe from any thread.
"""

import contextlib
import functools
import json
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor

BETA = 0.2               # open reward slope: the paper gives none; ScoreRS, the formula's source, uses 0.2
MAX_ANSWER_CHARS = 2000  # a longer <answer> scores 0 unread: no real answer is that long, and it bounds the work
MATH_TIMEOUT = 1.0       # seconds a math check may take; then its worker is killed and the reward is 0
MAX_SERVERS = os.cpu_count() or 1  # math helper processes at most; score_batch(workers=N) raises it to N


# --- the answer, and an opt-in strict format check ---------------------------------------------

def extract_answer(text):
    """The stripped content of the `<answer>...</answer>` block, or None. The paper's extractor is not
    public (SPEC §6), so we decide:
    - several blocks: the LAST counts (drafts come first); nested `<answer><answer>3</answer></answer>`: "3";
    - an unclosed last `<answer>` (cut off by max_new_tokens): None, a truncated output has no answer;
    - text outside the tags is ignored (`format_ok` can penalise it); an empty block is None.
    str.rfind/find only: a 1 MB completion costs one linear scan, and no regex can backtrack."""
    if not isinstance(text, str) or (start := text.rfind("<answer>")) < 0:
        return None
    end = text.find("</answer>", start)
    return (text[start + len("<answer>"):end].strip() or None) if end >= 0 else None


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


def _gold(sample_or_gold):
    """Verifiers take the sample dict or the ground-truth string itself."""
    return str(sample_or_gold["answer"] if isinstance(sample_or_gold, dict) else sample_or_gold)


def _usable(pred):
    return isinstance(pred, str) and 0 < len(pred) <= MAX_ANSWER_CHARS


def _unwrap(s):
    """Undo what models wrap short answers in: unicode variants (NFKC: '３' -> '3'), $...$, \\boxed{}, \\text{}."""
    s = re.sub(r"\\(?:boxed|text|textbf|mathrm)\{([^{}]*)\}", r"\1", unicodedata.normalize("NFKC", s))
    return s.strip().strip("$").strip()


# --- digit: CLEVR-Math counting -----------------------------------------------------------------

_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?!\w)")
_WORDS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                            "nine", "ten"))}


def _integer(text):
    """The one integer an answer states ("3", "3.", " 3 ", "3 objects", "three", "٣"), else None.
    Two different numbers ("3 or 4") give None, so hedging never pays."""
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", _unwrap(text).lower())  # 1,000 -> 1000
    s = re.sub(r"\b(" + "|".join(_WORDS) + r")\b", lambda m: _WORDS[m.group(1)], s)
    values = {float(n) for n in _NUMBER.findall(s)}  # float() reads every script's digits
    return int(v) if len(values) == 1 and (v := values.pop()).is_integer() else None


def digit_reward(pred, gold):
    """paper (Fig. 4): "exact digit match"."""
    want = _integer(_gold(gold))
    if want is None:
        raise ValueError(f"digit gold answer {_gold(gold)!r} is not an integer")
    return float(_usable(pred) and _integer(pred) == want)


# --- mcq: GeoQA170K, ArxivQA --------------------------------------------------------------------

_PREAMBLE = re.compile(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)(?:\s+is)?\s*:?\s*", re.IGNORECASE)
# "(a)" or "(A)"; a capital alone or before . ) : ("A", "A)", "A. text"); a small letter only alone or
# before . ) ("a cat" is words, not option A)
_LETTER = re.compile(r"\(([A-Za-z])\)|([A-Z])(?:[.):]|\s*$)|([a-z])(?:[.)]|\s*$)")


def _clean(s):
    return " ".join(_unwrap(s).casefold().split()).rstrip(".")


def _option(text, choices=None):
    """The option index (A = 0) an answer picks: by its letter, else by the option's text; else None."""
    s = _PREAMBLE.sub("", _unwrap(text))
    if m := _LETTER.match(s):
        index = ord((m.group(1) or m.group(2) or m.group(3)).upper()) - ord("A")
        return index if not choices or index < len(choices) else None
    texts = []
    for i, c in enumerate(choices or []):  # drop a label that repeats the option's place: "B. 3 cm"
        label = re.match(r"\(?([A-Za-z])\s*[.):]\s*", str(c))
        texts.append(_clean(str(c)[label.end():] if label and label.group(1).upper() == chr(ord("A") + i) else c))
    return texts.index(_clean(s)) if _clean(s) in texts else None


def mcq_reward(pred, gold, choices=None):
    """paper (App. C.1): ArxivQA letters came as "A", "A)", "(a)", ... and were normalised; we read
    both sides the same way, and accept the option's text when the choices are known."""
    if isinstance(gold, dict) and choices is None:
        choices = gold.get("choices")
    want = _option(_gold(gold), choices)
    if want is None:
        raise ValueError(f"mcq gold answer {_gold(gold)!r} is neither an option letter nor one of the choices")
    return float(_usable(pred) and _option(pred, choices) == want)


# --- math: Math PUMA, with math-verify in killable helper processes -----------------------------

def _canon(s):
    """Spelling-only normalisation: equal canonical strings are surely equal answers."""
    s = re.sub(r"\\left|\\right|\\[,;! ]|\s|\$", "", unicodedata.normalize("NFKC", s))
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")


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


@functools.lru_cache(maxsize=4096)
def _parse_math(s):
    """math-verify's parse, bare LaTeX wrapped in $...$ first: bare, `\\sqrt{8}` parses to nothing and
    `2\\sqrt{2}` to 2. No signal timeouts (they fail off the main thread): the parent kills us instead."""
    from math_verify import parse
    if not any(d in s for d in ("$", "\\(", "\\[", "\\boxed")) and (wrapped := parse(f"${s}$", parsing_timeout=None)):
        return wrapped
    return parse(s, parsing_timeout=None)


def _math_equal(gold, pred):
    """Runs in a helper. Gold first: math-verify's verify is not symmetric."""
    from math_verify import verify
    g, p = _parse_math(gold), _parse_math(pred)
    if not g:  # the gold is not math ("no solution"): compare spellings
        return _canon(gold) == _canon(pred)
    return bool(p) and verify(g, p, timeout_seconds=None)


def _serve_math():
    """The helper process, `python rewards.py --math-server`. It imports sympy and math-verify once (about
    a second), then forks a worker that inherits them warm; when the parent kills a late worker, the
    next one is forked in milliseconds. The helper has no threads, so fork is safe here."""
    out = os.fdopen(os.dup(1), "w")   # the protocol gets a private copy of stdout,
    os.dup2(2, 1)                     # so stray prints from sympy go to stderr
    logging.disable(logging.WARNING)  # math-verify warns on every call that its own timeout is off
    _math_equal("1", "1")             # import, and build the LaTeX grammar
    while True:
        if (pid := os.fork()) == 0:
            import resource  # a memory bomb raises MemoryError in the worker instead of swapping the node
            resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
            out.write(f"ready {os.getpid()}\n")
            out.flush()
            for line in sys.stdin:  # one [gold, pred] JSON line in, "1" or "0" out
                try:
                    ok = _math_equal(*json.loads(line))
                except Exception:  # noqa: BLE001  MemoryError, RecursionError, sympy's own: not a proof
                    ok = False
                out.write("1\n" if ok else "0\n")
                out.flush()
            os._exit(0)
        if os.WIFEXITED(os.waitpid(pid, 0)[1]):  # the worker saw stdin close: the parent is done
            return


class _MathServer:
    """The parent's end of one helper. subprocess (fork + exec, like the "spawn" start method) rather
    than multiprocessing: safe after torch has started threads or CUDA, where a bare fork is not, and,
    unlike multiprocessing's spawn and forkserver, it does not re-import the caller's main script
    (05_grpo.py, so all of torch) in the helper."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--math-server"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.worker, self.buffer = None, b""

    def _readline(self, timeout):
        deadline, fd = time.monotonic() + timeout, self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            if not select.select([fd], [], [], max(deadline - time.monotonic(), 0))[0]:
                return None
            if not (chunk := os.read(fd, 64)):
                raise RuntimeError("the math-verify helper process died; is math-verify installed?")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def ask(self, gold, pred, timeout):
        """1.0 or 0.0; None when the worker was late (it is killed, and a warm one takes its place)."""
        while self.worker is None:  # deadlines start once a worker is up, not while it imports sympy
            if (line := self._readline(60)) is None:
                raise RuntimeError("the math-verify helper process did not start in 60 s")
            if line.startswith(b"ready"):  # (skips a late answer from a worker we killed)
                self.worker = int(line.split()[1])
        self.proc.stdin.write(json.dumps([gold, pred]).encode() + b"\n")
        self.proc.stdin.flush()
        if (line := self._readline(timeout)) is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.worker, signal.SIGKILL)
            self.worker = None
            return None
        if line.startswith(b"ready"):  # the worker crashed on this item, and the next one is up
            self.worker = int(line.split()[1])
            return 0.0
        return float(line)


_IDLE, _STARTED = [], [0]  # the persistent pool: helpers not in use, and how many exist
_POOL_LOCK = threading.Condition()


def _forget_helpers():
    """A forked child (a DataLoader worker, say) must not share its parent's helpers: it starts its own."""
    global _POOL_LOCK
    _POOL_LOCK = threading.Condition()
    _IDLE.clear()
    _STARTED[0] = 0


os.register_at_fork(after_in_child=_forget_helpers)


def _ask_a_helper(gold, pred, timeout):
    with _POOL_LOCK:
        while not _IDLE and _STARTED[0] >= MAX_SERVERS:
            _POOL_LOCK.wait()
        if _IDLE:
            server = _IDLE.pop()
        else:
            server, _STARTED[0] = _MathServer(), _STARTED[0] + 1
    try:
        return server.ask(gold, pred, timeout)
    finally:
        with _POOL_LOCK:
            _IDLE.append(server)
            _POOL_LOCK.notify()


def math_reward(pred, gold, timeout=MATH_TIMEOUT):
    """paper (Fig. 4): "HF math_verify". 1.0 when math-verify proves the answer equals the gold. A check
    slower than `timeout` s scores 0 (a warm worker is up again in milliseconds). Safe from any thread
    or process; the very first call also waits about a second for a helper to import sympy."""
    if not _usable(pred):
        return 0.0
    gold, pred = _drop_lhs(_gold(gold).strip(), pred.strip())
    if not pred:
        return 0.0
    if _canon(pred) == _canon(gold):  # same spelling: no need for sympy
        return 1.0
    return _ask_a_helper(gold, pred, timeout) or 0.0  # None: too late


# --- iou: LLaVA-CoT grounding -------------------------------------------------------------------

_FLOAT = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?!\w)")


def _box(text, image_size=None):
    """(x1, y1, x2, y2) in [0, 1] from the first four numbers, which reads "[x1, y1, x2, y2]",
    "(x1, y1), (x2, y2)" and JSON ({"bbox_2d": [...]}; the digits in keys like "x1" are not numbers).
    All <= 1: normalised, else pixels of image_size (w, h): for Qwen2.5-VL the size the model saw,
    after resizing. None if malformed, not finite, degenerate (x2 <= x1 or y2 <= y1), or pixels with no size."""
    numbers = [float(n) for n in _FLOAT.findall(unicodedata.normalize("NFKC", text))[:4]]
    if len(numbers) < 4 or not all(math.isfinite(v) for v in numbers):
        return None
    if max(numbers) > 1.0:
        if not image_size or not all(isinstance(v, (int, float)) and 0 < v < math.inf for v in image_size):
            return None
        numbers = [v / image_size[i % 2] for i, v in enumerate(numbers)]
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in numbers)  # clip to the image
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def iou_reward(pred, gold, image_size=None):
    """paper (Fig. 4): the IoU itself, continuous, for training; DESIGN: evaluation counts IoU >= 0.5.
    The image size comes from the argument, or the sample's `image_size` [w, h] or `width`/`height`."""
    if isinstance(gold, dict) and image_size is None:
        image_size = gold.get("image_size") or (gold.get("width"), gold.get("height"))
    want = _box(_gold(gold), image_size)
    if want is None:
        raise ValueError(f"iou gold answer {_gold(gold)!r} is not a box (pixel boxes need image_size)")
    if (got := _box(pred, image_size) if _usable(pred) else None) is None:
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
        """(c) an LLM judge: any vlm.py backend, `gen(requests, n, max_new_tokens, temperature) ->
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
        from PIL import Image
        return Image.open(image).convert("RGB") if os.path.exists(image) else None
    return image


# --- routing: one completion, and a whole GRPO batch --------------------------------------------

VERIFIERS = {"digit": digit_reward, "mcq": mcq_reward, "math": math_reward, "iou": iou_reward, "open": open_reward}


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


def score_batch(completions, samples, rm=None, format_weight=0.0, workers=None, beta=BETA):
    """(rewards, stats) for a GRPO rollout batch; stats has "count/<type>", "reward/<type>" (the mean) and
    "no_answer" (the fraction with no extractable answer), ready to log.

    Math, the one slow verifier, fans out over `workers` helper processes (persistent, reused by every
    call; default one per CPU; 0 or 1: one helper, no threads). digit, mcq and iou cost microseconds and
    run inline: sending them to a process costs more than scoring them (bench/rewards.py). The reward
    model scores every open answer and each distinct reference in ONE call: one trip to the GPU a step."""
    global MAX_SERVERS
    if len(completions) != len(samples):
        raise ValueError(f"{len(completions)} completions but {len(samples)} samples")
    types = [_check_type(s, rm) for s in samples]
    answers = [extract_answer(c) for c in completions]
    rewards = [0.0] * len(samples)
    todo = [i for i, a in enumerate(answers) if a is not None]
    for i in todo:
        if types[i] in ("digit", "mcq", "iou"):
            rewards[i] = VERIFIERS[types[i]](answers[i], samples[i])

    maths = [i for i in todo if types[i] == "math"]
    workers = (os.cpu_count() or 1) if workers is None else max(int(workers), 1)
    MAX_SERVERS = max(MAX_SERVERS, workers)
    with ThreadPoolExecutor(workers) as pool:  # the threads only wait on helper processes
        for i, r in zip(maths, pool.map(lambda i: math_reward(answers[i], samples[i]), maths)):
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
    stats = {"no_answer": (len(samples) - len(todo)) / max(len(samples), 1)}
    for vtype in VERIFIERS:
        if mine := [r for r, t in zip(rewards, types) if t == vtype]:
            stats[f"count/{vtype}"], stats[f"reward/{vtype}"] = len(mine), sum(mine) / len(mine)
    return rewards, stats


if __name__ == "__main__":
    if sys.argv[1:] != ["--math-server"]:
        sys.exit("rewards.py is a library; `python rewards.py --math-server` is the math helper process")
    _serve_math()
