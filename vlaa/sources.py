"""Step 1 of the recipe, before 01_caption: a source dataset as published -> records of our schema.

paper (§2 step #1, Table 1): image, question and answer are gathered from nine sources, each image
once, answers normalised (App. C.1: ArxivQA's "A", "A)", "(a)"), and every record gets the verifier
its reward will use (Fig. 4). One small function per source below reads one published row;
vlaa/collect.py does the rest for all of them: rows from the hub or a local copy, images saved beside
the output, resume, counts. docs/sources.md says, per source, which field names were read on its
dataset card and which were inferred, and how to rebuild a VLAA-Thinking-like set.

    [vlaa.sources]  ->  01_caption  ->  02_distill  ->  03_rewrite_verify  ->  04_sft / 05_grpo

    python -m vlaa.sources --source clevr_math --out data/clevr_math.jsonl --limit 35000 --unique-images
    python -m vlaa.sources --source arxivqa --local ArxivQA/arxivqa.jsonl --image-root ArxivQA --out data/arxivqa.jsonl
    python -m vlaa.sources --help      # every flag, and each source's hub id, config, split and files

Output: one record per row (id, image, question, answer, verifier_type, choices where there are
options, source, source_id; caption where the source brings one), the image under OUT's folder in
images/<source>/, named by its content. Re-running the same command resumes: rows whose id is in OUT
are skipped, a torn last line is redone. A bad row (missing field, undecodable image, an answer its
verifier cannot read) stops the run naming source, row and field, or with --skip-bad is counted.
"""

import argparse
import collections
import os
import re
from dataclasses import dataclass

from vlaa import flags
from vlaa.answers import read_box, read_integer, read_option
from vlaa.collect import BadRow, collect, hub_rows, local_rows, report


def field(row, *names):
    """The first of `names` the row has, non-empty; else an error naming them and the fields the row has."""
    for name in names:
        if row.get(name) not in (None, "", []):
            return row[name]
    wanted, has = " or ".join(repr(n) for n in names), sorted(k for k, v in row.items() if v not in (None, "", []))
    raise BadRow(f"missing or empty field {wanted} (row has: {', '.join(has) or 'nothing'})")


def turns(row):
    """(question, answer) of a LLaVA-style row: conversations = [{from: human, value}, {from: gpt, value}, ...]."""
    said = {}
    for turn in field(row, "conversations"):
        if isinstance(turn, dict):
            said.setdefault(turn.get("from"), str(turn.get("value") or "").strip())
    if not said.get("human") or not said.get("gpt"):
        raise BadRow("field 'conversations': needs a 'human' turn and a 'gpt' turn, both non-empty")
    return said["human"].replace("<image>", "").strip(), said["gpt"]


def after_question(text):
    """'Hint: ...\\nQuestion: Subtract all balls. ...' -> 'Subtract all balls. ...' (unchanged if no 'Question:')."""
    return text.rpartition("Question:")[2].strip()


def letter_of(said, choices, name):
    """The option letter an answer picks, read as every verifier reads it (vlaa.answers.read_option)."""
    index = read_option(said, choices)
    if index is None:
        raise BadRow(f"field {name!r}: {said!r} is not one of the options A-{chr(ord('A') + len(choices) - 1)}")
    return chr(ord("A") + index)


# ----------------------------------------------------------------------------------------------------
# One function per source: a published row -> {image, question, answer, verifier_type, ...}, or None
# for a row of another kind than the paper took (counted, not an error). `image` may be a datasets
# Image ({bytes, path}), raw bytes, a PIL image or a path; collect() saves it.


def clevr_math(row):
    """lmms-lab/LLaVA-OneVision-Data, config "CLEVR-Math(MathV360K)", split train; card: id, image (Image),
    conversations, data_source. human "<image>Hint: ... Question: Subtract all balls. How many objects are
    left?", gpt "The answer is 3" (the answer's wording is inferred from a loader, not on the card). Also reads
    the original CLEVR-Math rows (dali-does/clevr-math card: question, label). Counts -> `digit` (Fig. 4)."""
    if row.get("conversations") is not None:
        question, said = turns(row)
        question, name = after_question(question), "conversations"
    else:
        question, said, name = field(row, "question"), str(field(row, "label")), "label"
    value = read_integer(said)
    if value is None:
        raise BadRow(f"field {name!r}: answer {said!r} is not one integer")
    return {"image": field(row, "image"), "question": question, "answer": str(value), "verifier_type": "digit"}


def geoqa(row):
    """lmms-lab/LLaVA-OneVision-Data, config "geo170k(qa)", split train (card: as clevr_math). human: an
    instruction line, "Question: ...", then "Choices:\\nA: 30°\\nB: ..."; gpt: a solution ending "Answer:C"
    (inferred from G-LLaVA rows). VLAA kept the problem and its Choices block. Options -> `mcq`."""
    question, said = turns(row)
    question = after_question(question)
    choices = re.findall(r"^\(?([A-Z])\)?\s*[:.)]\s*(.+?)\s*$", question.partition("Choices:")[2], re.M)
    if not choices:
        raise BadRow("field 'conversations': the question has no 'Choices:' block of lettered options")
    choices = [text for _, text in choices]
    answer = letter_of(said.rpartition("Answer:")[2].strip() or said, choices, "conversations")
    return {"image": field(row, "image"), "question": question, "answer": answer, "choices": choices,
            "verifier_type": "mcq"}


def math_puma(row):
    """Math-PUMA/Math-PUMA_Data_Stage2, Synthesis/train.json (images in Synthesis/images.tar.gz); no card lists
    the fields: the names are the Math-PUMA code's (a text-rich problem `instruction`/`output` paired with its
    vision-rich form `instruction_2`/`image_url_2`/`output_2`; which is which is inferred). The paper asked the
    vision-rich question and gave R1 the text-rich problem instead of a caption (§2 #2): it goes in `caption`,
    which 01 keeps. Answer: the expression after the solution's last "†Answer:" -> `math` (math_verify)."""
    solution = field(row, "output_2", "output")
    marked = re.findall(r"Answer:\s*(.+)", solution)
    if not marked:
        raise BadRow("field 'output_2': the solution has no 'Answer:' line")
    answer = marked[-1].strip().rstrip(".").strip()
    question = field(row, "instruction_2", "instruction")
    # App. C.1: some solutions give only the solved parameter ("a = -5") though the question asks for the function
    lhs = re.fullmatch(r"([A-Za-z])\s*=.*", answer)
    if lhs and lhs[1] not in "yY" and re.search(r"function|equation|expression", question, re.I):
        raise BadRow(f"field 'output_2': answer {answer!r} gives a parameter, the question asks for the function")
    rec = {"image": field(row, "image_url_2", "image_url"), "question": question, "answer": answer,
           "verifier_type": "math"}
    if row.get("instruction_2") and row.get("instruction"):
        rec["caption"] = row["instruction"].replace("<image>", "").strip()
    return rec


def arxivqa(row):
    """MMInstruction/ArxivQA, arxivqa.jsonl (images in images.tgz), split train; fields id, image (a path
    "images/....jpg"), question, options ["A) ...", ...], label, rationale (read in loaders; the card shows
    none). Labels come as "A", "A)", "(a)", "C) text" (App. C.1): all normalised to the letter -> `mcq`."""
    options = [str(o) for o in field(row, "options")]
    labelled = [re.match(rf"\(?{chr(ord('A') + i)}\s*[.):]\s*", o, re.I) for i, o in enumerate(options)]
    choices = [o[m.end():].strip() if m else o.strip() for o, m in zip(options, labelled)]
    lines = [f"{chr(ord('A') + i)}) {c}" for i, c in enumerate(choices)]
    return {"image": field(row, "image"), "question": "\n".join([str(field(row, "question")).strip()] + lines),
            "answer": letter_of(str(field(row, "label")), choices, "label"), "choices": choices,
            "verifier_type": "mcq"}


def docvqa(row):
    """HuggingFaceM4/DocumentVQA (docvqa.org's data), split train; card: questionId, question, question_types,
    image (Image), docId, ucsf_document_id, ucsf_document_page_no, answers (list). The paper's 10,194 is the
    number of train pages: one question per page (--unique-images). Answers are free text -> `open` (RM)."""
    answers = field(row, "answers")
    return {"image": field(row, "image"), "question": field(row, "question"),
            "answer": str(answers if isinstance(answers, str) else answers[0]).strip(), "verifier_type": "open"}


def vizwiz(row):
    """vizwiz.org's VQA annotations (train.json, images in train.zip): a list of {image, question, answers
    [{answer, answer_confidence}] x 10, answer_type, answerable}; no train split on the hub (lmms-lab/VizWiz-VQA:
    val and test, answers as strings, also read). Answer: the most frequent of the ten -> `open` (RM)."""
    said = [a.get("answer") if isinstance(a, dict) else a for a in field(row, "answers")]
    said = [" ".join(str(a).split()) for a in said if a is not None and str(a).strip()]
    if not said:
        raise BadRow("field 'answers': every answer is empty")
    return {"image": field(row, "image"), "question": field(row, "question"),
            "answer": collections.Counter(said).most_common(1)[0][0], "verifier_type": "open"}


def allava(row):
    """FreedomIntelligence/ALLaVA-4V, config allava_laion, split instruct (card: id, image a path
    "allava_laion/images/N.jpeg" into images.zip, conversations, original_caption, url). GPT-4V's answer is
    free text -> `open` (RM). The paper reused ALLaVA's captions: --captions ALLaVA-Caption-LAION-4V.json."""
    question, answer = turns(row)
    return {"image": field(row, "image"), "question": question, "answer": answer, "verifier_type": "open"}


def llava_cot(row):
    """Xkev/LLaVA-CoT-100k, train.jsonl (images in the image zip parts); fields id, image (a path:
    coco/train2017/..., vg/VG_100K/...), conversations (read in loaders). The paper took its COCO and
    VisualGenome grounding questions ("Please provide the bounding box coordinate of the region this sentence
    describes: ..."); the box is in <CONCLUSION>, normalised [x1, y1, x2, y2] (inferred) -> `iou`."""
    question, said = turns(row)
    if "bounding box" not in question.lower():
        return None  # not a grounding question
    concluded = re.findall(r"<CONCLUSION>(.*?)</CONCLUSION>", said, re.S)
    box = read_box(concluded[-1] if concluded else said)
    if box is None:
        raise BadRow("field 'conversations': a bounding-box question whose answer has no normalised box")
    image = str(field(row, "image"))
    kind = "coco" if "coco" in image.lower() else "vg" if re.search(r"(^|/)vg/|VG_100K", image) else "other"
    return {"image": image, "question": question, "answer": "[" + ", ".join(f"{round(v, 3):g}" for v in box) + "]",
            "verifier_type": "iou", "source": f"llava_cot_{kind}"}


def chartqa(row):
    """HuggingFaceM4/ChartQA, split train; card: image (Image), query, label (list), human_or_machine. In the
    released image folders, not in Table 1: no reward is given there. Ours: a number -> `math` (math_verify
    reads 17.5 = 17.50), else `open` (RM)."""
    labels = field(row, "label")
    answer = str(labels if isinstance(labels, str) else labels[0]).strip()
    number = re.fullmatch(r"[-+]?\d+(?:\.\d+)?", answer)
    return {"image": field(row, "image"), "question": field(row, "query"), "answer": answer,
            "verifier_type": "math" if number else "open"}


@dataclass(frozen=True)
class Source:
    convert: object
    hub_id: str | None  # None: no usable copy on the hub, --local only
    config: str | None = None
    split: str = "train"
    data_files: str | None = None


SOURCES = {
    "clevr_math": Source(clevr_math, "lmms-lab/LLaVA-OneVision-Data", "CLEVR-Math(MathV360K)"),
    "geoqa": Source(geoqa, "lmms-lab/LLaVA-OneVision-Data", "geo170k(qa)"),
    "math_puma": Source(math_puma, "Math-PUMA/Math-PUMA_Data_Stage2", data_files="Synthesis/train.json"),
    "arxivqa": Source(arxivqa, "MMInstruction/ArxivQA", data_files="arxivqa.jsonl"),
    "docvqa": Source(docvqa, "HuggingFaceM4/DocumentVQA"),
    "vizwiz": Source(vizwiz, None),
    "allava": Source(allava, "FreedomIntelligence/ALLaVA-4V", "allava_laion", split="instruct"),
    "llava_cot": Source(llava_cot, "Xkev/LLaVA-CoT-100k", data_files="train.jsonl"),
    "chartqa": Source(chartqa, "HuggingFaceM4/ChartQA"),
}


def load_captions(path):
    """{image path: caption} from rows of the same form (image, conversations): ALLaVA-Caption-LAION-4V.json."""
    return {str(row["image"]): turns(row)[1] for row in local_rows(path) if isinstance(row, dict) and row.get("image")}


def where_from(spec):
    """'lmms-lab/LLaVA-OneVision-Data, config geo170k(qa), split train' for --help."""
    if spec.hub_id is None:
        return "(--local only)"
    parts = [("config", spec.config), ("split", spec.split), ("files", spec.data_files)]
    return ", ".join([spec.hub_id] + [f"{k} {v}" for k, v in parts if v])


def parse_args(argv=None):
    table = "\n".join(f"  {name:<11} {where_from(spec)}" for name, spec in SOURCES.items())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"sources:\n{table}")
    p.add_argument("--source", required=True, choices=list(SOURCES), help="which source's fields to read")
    p.add_argument("--out", required=True, help="output JSONL (appended, resumable); images go beside it")
    p.add_argument("--local", default=None,
                   help="a local copy with the published fields (.jsonl, .json, .parquet) instead of the hub")
    p.add_argument("--hub-id", default=None,
                   help="another hub id, or the folder of a local clone of a hub repo (default: the source's); "
                        "with it, --config and --data-files have no default and --split defaults to train")
    p.add_argument("--config", default=None, help="hub config (default: the source's)")
    p.add_argument("--split", default=None, help="hub split (default: the source's)")
    p.add_argument("--data-files", default=None, help="the file(s) of the hub repo to read (default: the source's)")
    p.add_argument("--image-root", default=None,
                   help="where image paths in the rows resolve: the folder the source's image archive was "
                        "extracted to (default: the --local file's folder)")
    p.add_argument("--captions", default=None,
                   help="rows of the same form whose answers caption the same images (ALLaVA's "
                        "ALLaVA-Caption-LAION-4V.json): reused as `caption`, which 01 keeps (paper §2 #2)")
    p.add_argument("--limit", type=flags.nonneg_int, default=None, help="only the first N rows (default: all)")
    p.add_argument("--unique-images", action="store_true",
                   help="keep the first row of each image and count the others (paper §2 #1)")
    p.add_argument("--skip-bad", action="store_true", help="count and report bad rows instead of stopping")
    return flags.parse(p, argv)


def main(argv=None):
    args = parse_args(argv)
    spec = SOURCES[args.source]
    hub = spec if args.hub_id is None else Source(spec.convert, args.hub_id)  # another repo: no default config
    if args.local:
        rows, origin = local_rows(args.local), args.local
        image_root = args.image_root or os.path.dirname(os.path.abspath(args.local))
    elif hub.hub_id:
        rows = hub_rows(hub.hub_id, args.config or hub.config, args.split or hub.split,
                        args.data_files or hub.data_files)
        origin, image_root = hub.hub_id, args.image_root
    else:
        raise SystemExit(f"{args.source} has no copy on the hub with the paper's split: pass --local "
                         "(docs/sources.md says where to get it)")
    captions = load_captions(args.captions) if args.captions else None
    stats = collect(spec.convert, args.source, args.out, rows, origin, image_root, args.limit, args.skip_bad,
                    args.unique_images, captions)
    report(args.source, args.out, stats)
    return stats


if __name__ == "__main__":
    flags.cli(main)
