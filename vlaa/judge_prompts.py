"""The LLM judge's prompts of 06_eval.py. Under --rules vlmevalkit: VLMEvalKit's own, read from its source at the
commit those rules follow (d9fe347b), parsed with `ast` and built by walking the syntax of its prompt functions
(string literals, +, f-strings, loops, .format; anything else is refused, nothing is run): from $VLMEVALKIT_DIR when
set, else a copy downloaded once into ~/.cache/vlaa/. Their text is not copied into this repository. Without a copy
(offline), and under the other rule sets: the project's own prompts below, VLMEvalKit's shortened to their
instruction and one example, and the paper's Yes/No verify prompt for toy/jsonl `open` answers.
vlaa/judge.py decides when the judge is asked and reads its replies; docs/eval.md lists what differs.
"""

import ast
import functools
import os
import urllib.request

from vlaa.benchmarks import wemath_options

JUDGE_EXTRACT = (  # mathvista.py / mathv.py build_*_gpt4_prompt: in-context examples, then the response
    "Please read the following example. Then extract the answer from the model response and type it at the end.\n\n"
    "Question: What fraction of the shape is blue?\nChoices: (A) 3/11 (B) 8/11 (C) 6/11 (D) 3/5\n"
    "Model response: The correct answer is (B) 8/11.\nExtracted answer: B\n\n"
    "{question}\nModel response: {prediction}\nExtracted answer:")
JUDGE_PROMPTS = {
    "mathvista": JUDGE_EXTRACT, "mathvision": JUDGE_EXTRACT,
    "mathverse": (  # mathverse.py build_mathverse_gpt4_extract_prompt
        "I am providing you a response from a model to a math problem, termed 'Model Response'. You should extract "
        "the answer from the response as 'Extracted Answer'. Directly output the extracted answer with no "
        "explanation.\n\nModel response: 'Therefore, the correct option is:\n\nD. They give the solutions.'\n"
        "Extracted Answer: D\n\nModel response: 'to one decimal place, the distance d is approximately 22.3 "
        "meters.'\nExtracted answer: 22.3\n\nModel response: 'I cannot provide the correct option letter.'\n"
        "Extracted Answer: null\n\nModel response: '{prediction}'\nExtracted Answer: "),
    "dynamath": (  # dynamath.py DynaMath_auxeval
        "Free-form answer: {prediction}\nInstruction: {dynamath_instruction}"),
    "wemath": (  # multiple_choice.py build_prompt_wemath
        "You are an AI assistant who will help me to match an answer with several options of a single-choice "
        "question. You are provided with a question, several options, and an answer, and you need to find which "
        "option is most similar to the answer. If the meaning of all options are significantly different from the "
        "answer, output Z. Your should output a single uppercase character in A, B, C, D, E, F, G (if they are "
        "valid options), and Z.\nExample: \nQuestion: <start>\nWhat is the main object in image?\nOptions: A. teddy "
        "bear B. rabbit C. cat D. dog\n<end>\nAnswer: <start>\na cute teddy bear\n<end>\nYour output: A\n"
        "Question: <start>\n{question}\nOptions: {options}\n<end>\nAnswer: <start>\n{prediction}\n<end>\n"
        "Your output: "),
    "logicvista": (  # logicvista.py build_prompt_logicvista
        "You are a information extractor that extracts multiple choice letter answer choices from a paragraph that "
        "contains the answer choice and sometimes explaination of why that choice is correct to the given question."
        "\nWhat letter did the following answer choose? If the answer did not select a letter answer choice, first "
        "try to infer the answer based off the given choices.\nIf it does not seem like the given answer corresponds "
        "to an answer choice OR if there is no selected answer, please just respond with Z.\nMake sure you answer "
        "with ONLY the letters chosen.\nExample: \nQuestion: <start>\nWhich of the boxes comes next in the sequence? "
        "Select from A-E\n<end>\nAnswer: <start>\nThe sequence of the boxes is A, B, C, D, E.\n<end>\n"
        "Your output: ABCDE\nQuestion: <start>\n{question}\n<end>\nAnswer: <start>\n{prediction}\n<end>\n"
        "Your output: "),
    # the paper's verify prompt (assets/prompts/4.verify.txt of the VLAA-Thinking repository), toy/jsonl `open`
    "toy": ("You are a fair evaluator. Given a question, its groundtruth and an answer, output 'Yes' if the answer "
            "aligns with the groundtruth, otherwise 'No'. Output only Yes or No.\n\nQuestion: {question}\n\n"
            "Groundtruth: {answer}\n\nAnswer: {prediction}"),
}
JUDGE_PROMPTS["jsonl"] = JUDGE_PROMPTS["toy"]
MATHVERSE_GRADE = (  # mathverse.py build_mathverse_gpt4_score_prompt
    "Below are two answers to a math question. Question is [Question], [Standard Answer] is the standard answer to "
    "the question, and [Model_answer] is the answer extracted from a model's output to this question.  Determine "
    "whether these two answers are consistent.\nPlease note that only when the [Model_answer] completely matches the "
    "[Standard Answer] means they are consistent. For non-multiple-choice questions, if the meaning is expressed in "
    "the same way, it is also considered consistent, for example, 0.5m and 50cm.\nIf they are consistent, Judement "
    "is 1; if they are different, Judement is 0.\n\n[Question]: {question}\n[Standard Answer]: {answer}\n"
    "[Model_answer] : {prediction}\nJudgement:")
DYNAMATH_JUDGE = {"multiple choice": "Output the corresponing choice option, such as 'A', 'B', 'C', 'D', in a "
                                     "single line.",
                  "float": "Output a three-digit floating-point number in a single line."}


def judge_prompt(template, rec, prediction):
    """Fill a judge template with the record's question, options, gold and the model's prediction."""
    inst = DYNAMATH_JUDGE.get(rec.get("answer_type"), "Output a short answer in a single line. Any float numbers "
                              "in the answer should be formatted as three-digit floating-point numbers.")
    fields = {"question": rec.get("question_for_eval") or rec.get("query") or rec.get("question", ""),
              "options": " ".join(f"{k}. {v}" for k, v in wemath_options(rec.get("option", "")).items()),
              "answer": rec.get("answer", ""), "prediction": prediction, "dynamath_instruction": inst}
    return template.format_map(fields)


# ----------------------------------------------------------------------------------------------------
# VLMEvalKit's own prompts, read from its source at the commit --rules vlmevalkit follows (never copied here)

VLMEVALKIT_COMMIT = "d9fe347b24459f549a56a3d85065ac4916b35897"  # 2025-04-07, the leaderboard's date
VLMEVALKIT_URL = "https://raw.githubusercontent.com/open-compass/VLMEvalKit/{commit}/vlmeval/{file}"
VLMEVALKIT_BUILDERS = {  # prompt -> (file under vlmeval/, the function that builds it)
    "mathvista": ("dataset/utils/mathvista.py", "build_mathvista_gpt4_prompt"),  # 5 in-context examples
    "mathvision": ("dataset/utils/mathv.py", "build_mathv_gpt4_prompt"),  # MathVision's own 5
    "mathverse": ("dataset/utils/mathverse.py", "build_mathverse_gpt4_extract_prompt"),  # 6
    "mathverse/grade": ("dataset/utils/mathverse.py", "build_mathverse_gpt4_score_prompt"),  # 4
    "logicvista": ("dataset/utils/logicvista.py", "build_prompt_logicvista"),
    "wemath": ("dataset/utils/multiple_choice.py", "build_prompt_wemath"),
}  # DynaMath's judge prompt is one f-string line behind an if/elif: DYNAMATH_JUDGE above is its text
MAX_SOURCE_BYTES = 1 << 20


class SourceError(ValueError):
    """VLMEvalKit's source is not in the shape this reader knows (another commit, an edited copy)."""


def vlmevalkit_source(file):
    """The text of vlmeval/<file> at VLMEVALKIT_COMMIT: from $VLMEVALKIT_DIR (a checkout or a copy of its
    vlmeval/ tree) when set, else from the cache (~/.cache/vlaa/VLMEvalKit-<commit>/), downloaded there once
    unless HF_HUB_OFFLINE is set. None when there is no copy and no network: the caller falls back."""
    root = os.environ.get("VLMEVALKIT_DIR")
    if root:
        path = os.path.join(root, file) if os.path.isdir(os.path.join(root, "dataset")) else \
            os.path.join(root, "vlmeval", file)
        if not os.path.exists(path):
            raise FileNotFoundError(f"VLMEVALKIT_DIR={root}: no vlmeval/{file} there")
        with open(path, encoding="utf-8") as f:
            return f.read(MAX_SOURCE_BYTES)
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlaa",
                         f"VLMEvalKit-{VLMEVALKIT_COMMIT[:8]}", "vlmeval", file)
    if not os.path.exists(cache):
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
            return None
        try:
            with urllib.request.urlopen(VLMEVALKIT_URL.format(commit=VLMEVALKIT_COMMIT, file=file), timeout=30) as r:
                text = r.read(MAX_SOURCE_BYTES).decode("utf-8")
        except (OSError, UnicodeDecodeError):  # offline, or GitHub unreachable: the project's prompts
            return None
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(cache + ".part", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(cache + ".part", cache)
    with open(cache, encoding="utf-8") as f:
        return f.read(MAX_SOURCE_BYTES)


def _value(node, env, functions):
    """A string expression of a prompt builder, evaluated from its syntax tree over the few forms these builders
    use: literals, names, +, f-strings, line['field'], str(x), a helper's call, .format(...) and .replace(...)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _value(node.left, env, functions) + _value(node.right, env, functions)
    if isinstance(node, ast.JoinedStr):
        return "".join(str(_value(v.value if isinstance(v, ast.FormattedValue) else v, env, functions))
                       for v in node.values)
    if isinstance(node, ast.List):
        return [_value(v, env, functions) for v in node.elts]
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return str(_value(node.value, env, functions)[node.slice.value])
    if isinstance(node, ast.Call) and not node.keywords:
        args = [_value(a, env, functions) for a in node.args]
        if isinstance(node.func, ast.Name) and node.func.id == "str" and len(args) == 1:
            return str(args[0])
        if isinstance(node.func, ast.Name) and node.func.id in functions and not args:
            return _run(functions[node.func.id].body, {}, functions)
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("format", "replace"):
            text = _value(node.func.value, env, functions)
            if isinstance(text, str) and all(isinstance(a, str) for a in args):
                return text.format(*args) if node.func.attr == "format" else text.replace(*args)
    raise SourceError(f"line {getattr(node, 'lineno', '?')}: {ast.dump(node)[:80]}")


def _run(body, env, functions):
    """Run a builder's statements over strings: assignments, +=, for-loops over a list, print (skipped), return."""
    for stmt in body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            env[stmt.targets[0].id] = _value(stmt.value, env, functions)
        elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add) and isinstance(stmt.target, ast.Name):
            env[stmt.target.id] = env[stmt.target.id] + _value(stmt.value, env, functions)
        elif isinstance(stmt, ast.For) and isinstance(stmt.target, ast.Name) and not stmt.orelse:
            for item in _value(stmt.iter, env, functions):
                env[stmt.target.id] = item
                if _run(stmt.body, env, functions) is not None:
                    raise SourceError(f"line {stmt.lineno}: return inside a loop")
        elif isinstance(stmt, ast.Return):
            return _value(stmt.value, env, functions)
        elif not isinstance(stmt, ast.Expr):  # a docstring or print(prompt): nothing to build
            raise SourceError(f"line {stmt.lineno}: {type(stmt).__name__}")
    return None


def vlmevalkit_builders():
    """{prompt name: build(fields) -> the prompt VLMEvalKit sends}, read from its source without running it;
    {} when no copy of the source can be had (then the project's prompts above are used)."""
    builders = {}
    for name, (file, function) in VLMEVALKIT_BUILDERS.items():
        text = vlmevalkit_source(file)
        if text is None:
            return {}
        functions = {n.name: n for n in ast.parse(text, filename=file).body if isinstance(n, ast.FunctionDef)}
        if function not in functions:
            raise SourceError(f"vlmeval/{file}: no function {function}")
        builders[name] = functools.partial(_build, functions[function], functions, f"vlmeval/{file}")
        builders[name](dict.fromkeys(("question", "prediction", "answer", "extract", "question_for_eval",
                                      "options"), "x"))  # its shape checked now, before any model runs
    return builders


def _build(fn, functions, where, fields):
    env = {a.arg: fields if a.arg == "line" else fields[a.arg] for a in fn.args.args}
    try:
        prompt = _run(fn.body, env, functions)
    except (SourceError, KeyError, TypeError, IndexError, ValueError) as e:
        raise SourceError(f"{where} {fn.name}: not the shape of VLMEvalKit {VLMEVALKIT_COMMIT[:8]} ({e})") from None
    if not isinstance(prompt, str):
        raise SourceError(f"{where} {fn.name}: builds no text")
    return prompt
