"""Stage 01: caption every image with a vision-language model.

paper (§2 step #2): a GPT-4o-class VLM writes a detailed, structured caption of each image, so
that a text-only reasoner (stage 02) can "see" it. The caption must hold everything a question
could ask about: objects with colour, shape and position, every text verbatim, equations in LaTeX,
tables and charts as Markdown. A record that already has a caption keeps it (the paper reused
ALLaVA-LAION's GPT-4V captions); --overwrite recaptions it.

    toy.py make-data  ->  [01_caption]  ->  02_distill  ->  03_rewrite_verify  ->  04_sft / 05_grpo

Run it at three sizes (same flags, another backend):

    # CPU, the toy teacher reads the pixels back (seconds for 2,000 images)
    python 01_caption.py --in runs/data/train.jsonl --out runs/data/captioned.jsonl --backend toy --model captioner
    # one GPU node: an open VLM in an offline vLLM engine over the node's 8 GPUs
    python 01_caption.py --in data/train.jsonl --out data/captioned.jsonl --backend vllm \\
        --model Qwen/Qwen2.5-VL-72B-Instruct --tensor-parallel-size 8 --max-model-len 16384
    # several nodes: `vllm serve Qwen/Qwen2.5-VL-72B-Instruct --tensor-parallel-size 8` on each node, then
    python 01_caption.py --in data/train.jsonl --out data/captioned.jsonl --backend openai \\
        --model Qwen/Qwen2.5-VL-72B-Instruct --base-url http://node1:8000/v1,http://node2:8000/v1 --concurrency 64

Input: JSONL records with `id` and `image` (path relative to the file's folder, or absolute).
Output: the same records plus `caption`; `image` is rewritten relative to the OUTPUT file's folder.
Re-running the same command resumes: ids already in the output are skipped.
"""

import argparse

from vlaa import flags
from vlaa.datastage import add_generation_args, backend_from_args, check_stage_inputs, run_stage, sampling_from_args
from vlaa.locks import hold

# Our own wording of the paper's captioning instructions (App. A.1).
CAPTION_PROMPT = """Write a detailed, structured caption of this image for a reader who cannot see it \
and must answer any question about it from your words alone.

- Begin with the whole: what kind of image it is (photo, diagram, chart, table, document, screenshot, \
rendered scene) and its setting (indoor or outdoor, where, background).
- Then every object: its colour, shape, texture and size, and where it is (left or right, top or bottom, \
relative to the other objects). Count objects that repeat.
- Copy every piece of text exactly as written: labels, signs, logos, axis ticks, numbers. Write formulas \
and equations in LaTeX, but do not solve or simplify them.
- Write tables as Markdown tables, and charts as a Markdown table of their values with the title, axes, \
legend and units.
- Go from the overall layout to the fine details. State only what is visible, in a neutral, factual \
tone: do not guess, interpret, or answer anything.

Output the caption only."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="inp", required=True, help="input JSONL (id, image, ...)")
    p.add_argument("--out", required=True, help="output JSONL: the input records plus `caption` (appended, resumable)")
    p.add_argument("--model", default="captioner",
                   help="the VLM: a hub id or folder (hf, vllm), a served model name (openai), or a toy role "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="recaption records that already have a caption")
    p.add_argument("--prompt-file", default=None, help="a text file replacing the built-in captioning prompt")
    add_generation_args(p, batch_size=32, max_new_tokens=1024, temperature=0.0)
    return flags.parse(p, argv, flags.check_generation)


def prepare(rec, where, overwrite):
    """(record, its image path) for a record that needs a caption, else (record, None). The image was checked
    when the input was read; it is decoded only when its request is sent, so a batch of large images never
    sits in memory at once."""
    if rec.get("caption") and not overwrite:
        return rec, None  # paper: ALLaVA's captions are reused, not redone
    return rec, rec["image"]


def caption_batch(items, gen, prompt, sampling):
    """One backend call for the images of a batch; records that keep their caption pass through. A request
    the backend could not do comes back as its Exception, which run_stage reports (or counts, --skip-bad)."""
    todo = [i for i, (_, image) in enumerate(items) if image is not None]
    requests = [{"prompt": prompt, "image": items[i][1], "system": None} for i in todo]
    outs = gen(requests, n=1, on_error="return", **sampling) if requests else []
    records = [rec for rec, _ in items]
    for i, out in zip(todo, outs):
        records[i] = out if isinstance(out, Exception) else dict(records[i], caption=out[0].strip())
    return records


def main(argv=None):
    args = parse_args(argv)
    check_stage_inputs(args, "model")
    hold(args.out + ".lock", what=args.out)  # one writer per output: a second start stops here, naming the first
    prompt = CAPTION_PROMPT
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read().strip()
    gen = backend_from_args(args, args.model)
    sampling = sampling_from_args(args)
    stats = run_stage(args.inp, args.out, need=("id", "image"), batch_size=args.batch_size, limit=args.limit,
                      skip_bad=args.skip_bad, desc="caption", check_images=True,
                      prepare=lambda rec, where: prepare(rec, where, args.overwrite),
                      process=lambda items: caption_batch(items, gen, prompt, sampling))
    print(f"01_caption: {stats['written']} captioned, {stats['done_before']} already done, "
          f"{len(stats['bad'])} bad, {stats['damaged_lines']} damaged output lines kept -> {args.out}")
    return stats


if __name__ == "__main__":
    flags.cli(main)
