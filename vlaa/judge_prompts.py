"""The LLM judge's prompts of 06_eval.py: VLMEvalKit's (vlmeval/dataset/utils/*.py of April 2025), shortened to
their instruction and one example, and the paper's own Yes/No verify prompt for toy/jsonl `open` answers.
VLMEvalKit asks the judge only where its rules find no answer (always for MathVerse and LogicVista):
06_eval.py's `score_benchmark` applies that policy; docs/eval.md says what changes without a judge.
"""

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
