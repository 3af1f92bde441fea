"""Stage 02: a text-only reasoning model answers each question from the image's caption.

paper (§2 step #3): DeepSeek-R1 cannot see, so it gets the caption of stage 01 and the question,
with the instruction to treat the description as its own sight. Its raw output, an R1-style
`<think>...</think>` followed by the final answer, is kept verbatim in `reasoning`; stage 03
rewrites it, parses it and checks the answer. Outputs with and without `<think>` tags are fine,
and servers that return the thinking in a separate `reasoning_content` field are handled by the
openai backend (it puts the thinking back inside <think> tags).

    toy.py make-data  ->  01_caption  ->  [02_distill]  ->  03_rewrite_verify  ->  04_sft / 05_grpo

Run it at three sizes:

    # CPU, the toy R1 (10% wrong steps, 30% hesitant "wait, let me double-check" traces)
    python 02_distill.py --in runs/data/captioned.jsonl --out runs/data/distilled.jsonl \\
        --backend toy --model reasoner:error_rate=0.1,hesitation_rate=0.3
    # one GPU node: an R1-distilled model in an offline vLLM engine
    python 02_distill.py --in data/captioned.jsonl --out data/distilled.jsonl --backend vllm \\
        --model deepseek-ai/DeepSeek-R1-Distill-Qwen-32B --tensor-parallel-size 8 --max-model-len 16384
    # DeepSeek-R1 behind any OpenAI-compatible endpoint (DeepSeek's API, or `vllm serve` / SGLang per node)
    DEEPSEEK_API_KEY=... python 02_distill.py --in data/captioned.jsonl --out data/distilled.jsonl \\
        --backend openai --base-url https://api.deepseek.com/v1 --api-key-env DEEPSEEK_API_KEY \\
        --model deepseek-reasoner --concurrency 32

Input: records with `id`, `question`, `caption` (and `verifier_type`, used to ask for the answer's form).
Output: the same records plus `reasoning`; `image` is rewritten relative to the OUTPUT file's folder.
Re-running the same command resumes.
"""

import argparse

from vlaa import flags
from vlaa.datastage import add_generation_args, backend_from_args, check_stage_inputs, run_stage, sampling_from_args
from vlaa.locks import hold

# Our own wording of the paper's "pretend you see the image" prompt (App. A.1). The prompt
# ends with the Caption and Question blocks, which is also where the toy reasoner reads them.
DISTILL_PROMPT = """Below is a detailed description of an image, and then a question about that image. \
Take the description as your own sight: reason and answer as if you were looking at the image yourself. \
Never mention a description, caption or text that you were given; speak only of the image and what is in it. \
Answer with confidence, and hedge (for example "it appears that") only where the image itself leaves \
something unclear. Think the problem through first, then give the final answer after your thinking.{hint}

Caption:
{caption}

Question:
{question}"""

# paper (§4.1, Fig. 4): answers are checked by type, so ask for a form the verifier reads
ANSWER_HINTS = {
    "mcq": " Give the final answer as the letter of the correct option.",
    "digit": " Give the final answer as a single number.",
    "math": " Give the final answer in LaTeX.",
    "iou": " Give the final answer as a bounding box [x1, y1, x2, y2] in coordinates normalised to [0, 1], "
           "unless the question asks for another form.",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="inp", required=True, help="input JSONL from 01_caption.py (id, question, caption)")
    p.add_argument("--out", required=True, help="output JSONL: the input records plus `reasoning` (resumable)")
    p.add_argument("--model", default="reasoner",
                   help="the reasoner: hub id or folder (vllm, hf), served model name (openai) or toy role and "
                        "options, e.g. reasoner:error_rate=0.1,hesitation_rate=0.3 (default: %(default)s)")
    p.add_argument("--system", default=None, help="a system prompt for the reasoner (default: none, as R1 advises)")
    # DeepSeek's advice for R1: temperature 0.6, top-p 0.95, no system prompt; R1 thinks at length
    add_generation_args(p, batch_size=64, max_new_tokens=8192, temperature=0.6, top_p=0.95)
    return flags.parse(p, argv, flags.check_generation)


def distill_prompt(rec):
    hint = ANSWER_HINTS.get(str(rec.get("verifier_type", "")).lower(), "")
    return DISTILL_PROMPT.format(hint=hint, caption=rec["caption"].strip(), question=rec["question"].strip())


def distill_batch(records, gen, system, sampling):
    """The raw reasoning of each record (03 parses and rewrites it), or the Exception of a failed request."""
    requests = [{"prompt": distill_prompt(r), "image": None, "system": system} for r in records]
    outs = gen(requests, n=1, on_error="return", **sampling)
    return [out if isinstance(out, Exception) else dict(r, reasoning=out[0]) for r, out in zip(records, outs)]


def main(argv=None):
    args = parse_args(argv)
    check_stage_inputs(args, "model")
    hold(args.out + ".lock", what=args.out)  # one writer per output: a second start stops here, naming the first
    gen = backend_from_args(args, args.model)
    sampling = sampling_from_args(args)
    stats = run_stage(args.inp, args.out, need=("id", "question", "caption"), batch_size=args.batch_size,
                      limit=args.limit, skip_bad=args.skip_bad, desc="distill",
                      process=lambda records: distill_batch(records, gen, args.system, sampling))
    print(f"02_distill: {stats['written']} distilled, {stats['done_before']} already done, "
          f"{len(stats['bad'])} bad, {stats['damaged_lines']} damaged output lines kept -> {args.out}")
    return stats


if __name__ == "__main__":
    flags.cli(main)
