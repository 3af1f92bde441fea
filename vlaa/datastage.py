"""The loop and the flags the data stages share (01_caption, 02_distill, 03_rewrite_verify).

    run_stage(IN, OUT, process, ...)   read and check every input record, skip the ids OUT already has,
                                       call `process` a batch at a time, append its records to OUT
    add_generation_args(parser)        --backend, --model options, sampling, --batch-size, --skip-bad, ...
    backend_from_args(args, model)     the generation backend those flags describe

The contract every data stage keeps: re-running the same command resumes (ids already in OUT are
skipped, a torn last line is redone, a damaged line in the middle is kept and its record redone and
counted); nothing is lost when killed; a bad record stops the stage before any model call, naming file,
line, id and field, or with --skip-bad is left out, its reason listed in OUT.skipped.jsonl. A request the
backend could not do (the backends' on_error="return") stops the stage after its batch's other records are
written, or with --skip-bad is left out the same way.
"""

import functools
import itertools
import os

from vlaa.flags import fraction, nonneg_float, nonneg_int, positive_float, positive_int
from vlaa.jsonl import InputError, append_jsonl, open_output, read_jsonl
from vlaa.records import check_record, checked_records, report_skipped, skipped_path


def relocate_image(rec, from_dir, to_dir):
    """`image` is relative to its JSONL's folder; rewrite it for a JSONL that lives in to_dir."""
    image = rec.get("image")
    if not isinstance(image, str) or not image:
        return rec
    path = image if os.path.isabs(image) else os.path.join(from_dir, image)
    return dict(rec, image=path if to_dir is None else os.path.relpath(path, to_dir))


def read_stage_input(in_path, need, limit=None, check_images=False, skip_bad=False):
    """Every input record, checked once -> ([(where, record)], [bad messages]). Duplicate ids are errors:
    the second copy would otherwise be skipped as already done."""
    in_dir = os.path.dirname(os.path.abspath(in_path))
    records, bad = [], []
    # an unreadable line (bytes, JSON) stops here, before any model is called; with skip_bad it is counted.
    # --limit counts good and bad records alike: the rows are read lazily, one per record appended or refused
    rows = itertools.takewhile(lambda _: limit is None or len(records) + len(bad) < limit,
                               read_jsonl(in_path, bad if skip_bad else None))
    check = functools.partial(check_record, need=need, image_root=in_dir if check_images else None,
                              check_images=check_images)
    for where, rec in checked_records(in_path, rows, check, bad if skip_bad else None):
        records.append((where, rec))
    return records, bad


def run_stage(in_path, out_path, process, prepare=None, need=("id",), batch_size=64, limit=None, skip_bad=False,
              desc=None, check_images=False):
    """Read IN, skip ids already in OUT, prepare each record, process them in batches, append to OUT.

    prepare(rec, where) -> item: per-record work that can fail on bad input. process(items) -> one entry
    per item, in order: an output record, or an Exception for an item the backend could not do (the
    batch's other records are still written; the failure stops the stage, or with skip_bad is counted).
    `rec["image"]` is absolute while it is prepared and processed, and written relative to OUT's folder,
    so it still resolves wherever OUT lives.
    Returns {"total", "done_before", "written", "bad": [message, ...], "damaged_lines"}; the bad messages are
    also written to skipped_path(OUT), and the first few printed.
    """
    from tqdm import tqdm

    in_dir, out_dir = (os.path.dirname(os.path.abspath(p)) for p in (in_path, out_path))
    records, bad = read_stage_input(in_path, need, limit, check_images, skip_bad)
    done, f, damaged = open_output(out_path)
    todo = [(w, r) for w, r in records if r["id"] not in done]
    stats = {"total": len(records), "done_before": len(records) - len(todo), "written": 0, "bad": bad,
             "damaged_lines": len(damaged)}
    if stats["done_before"]:
        print(f"{out_path}: {stats['done_before']} of {len(records)} records already done, resuming")
    with f, tqdm(total=len(records), initial=stats["done_before"], desc=desc, unit="rec") as bar:
        for s in range(0, len(todo), batch_size):
            chunk, items, wheres = todo[s:s + batch_size], [], []
            for where, rec in chunk:
                rec = relocate_image(rec, in_dir, None)
                try:
                    items.append(prepare(rec, where) if prepare else rec)
                    wheres.append(f"{where} (id {rec['id']!r})")
                except (ValueError, FileNotFoundError) as e:
                    if not skip_bad:
                        raise
                    stats["bad"].append(str(e))
            outs = process(items) if items else []
            if len(outs) != len(items):
                raise RuntimeError(f"process returned {len(outs)} records for {len(items)} inputs")
            failed = []
            for where, out in zip(wheres, outs):
                if isinstance(out, Exception):
                    failed.append(f"{where}: {out}")
                    continue
                append_jsonl(f, relocate_image(out, in_dir, out_dir))
                stats["written"] += 1
            bar.update(len(chunk))
            if failed and not skip_bad:  # the batch's finished records are on disk; a rerun redoes the rest
                raise InputError(f"{len(failed)} record(s) failed, first: {failed[0]} (--skip-bad counts them)")
            stats["bad"] += failed
    report_skipped(stats["bad"], f"{in_path} (a rerun retries them)", skipped_path(out_path))
    return stats


# --- command-line flags every data stage shares


def add_generation_args(parser, batch_size=64, max_new_tokens=1024, temperature=0.0, top_p=1.0):
    """The backend, sampling and loop flags of 01, 02 and 03 (each stage adds its own --model)."""
    g = parser.add_argument_group("generation")
    g.add_argument("--backend", choices=["toy", "hf", "vllm", "openai"], default="toy",
                   help="toy: toy.py's teacher (CPU); hf: transformers; vllm: offline engine on this node; "
                        "openai: any OpenAI-compatible server (default: %(default)s)")
    g.add_argument("--base-url", default=None,
                   help="openai: server URL, or a comma list of them (one per node; requests are spread "
                        "over them) (default: $OPENAI_BASE_URL or https://api.openai.com/v1)")
    g.add_argument("--api-key-env", default=None,
                   help="openai: name of the environment variable holding the API key, sent to --base-url "
                        "(default: $OPENAI_API_KEY, sent only when --base-url is not given; 06's rule)")
    g.add_argument("--concurrency", type=positive_int, default=16,
                   help="openai: requests in flight (default: %(default)s)")
    g.add_argument("--timeout", type=positive_float, default=600.0,
                   help="openai: seconds one attempt of a request may take in all, connect to last byte "
                        "(default: %(default)s)")
    g.add_argument("--retries", type=nonneg_int, default=5,
                   help="openai: more attempts of a request, each on the next server, after connection errors, "
                        "timeouts, 408, 429, 5xx and empty completions (default: %(default)s)")
    g.add_argument("--tensor-parallel-size", type=positive_int, default=1,
                   help="vllm: GPUs one engine spans (8 for a 72B model) (default: %(default)s)")
    g.add_argument("--max-model-len", type=positive_int, default=None,
                   help="vllm: context length; None keeps the model's (default: %(default)s)")
    g.add_argument("--gpu-memory-utilization", type=fraction, default=None,
                   help="vllm: share of each GPU's memory the engine may take (default: 0.9 on GPU; on CPU, "
                        "where vLLM reads it as a share of host RAM that must also hold this process, a fixed "
                        "1 GiB KV cache instead)")
    g.add_argument("--max-pixels", type=positive_int, default=None,
                   help="hf/vllm: resize images to at most this many pixels (default: the model's setting)")
    g.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help="records per backend call, appended to the output after each; with openai, make it "
                        "several times --concurrency (default: %(default)s)")
    g.add_argument("--limit", type=nonneg_int, default=None, help="only the first N input records (default: all)")
    g.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens,
                   help="the longest completion, in tokens (default: %(default)s)")
    g.add_argument("--temperature", type=nonneg_float, default=temperature, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=fraction, default=top_p, help="nucleus sampling (default: %(default)s)")
    g.add_argument("--seed", type=nonneg_int, default=0, help="sampling seed (default: %(default)s)")
    g.add_argument("--skip-bad", action="store_true",
                   help="count and report bad records (bad field, image or a request the backend cannot do) "
                        "instead of stopping; a rerun retries them")


def check_stage_inputs(args, *model_flags):
    """Before any model loads: --in (and a --prompt-file) must be files, and with the hf or vllm backend each
    model flag a folder or a hub id (vlaa.runs.check_inputs; toy roles and served names are not paths)."""
    from vlaa.runs import check_inputs

    check_inputs(args, files=("inp", "prompt_file"), models=model_flags if args.backend in ("hf", "vllm") else ())


def backend_from_args(args, model):
    """make_backend with the options of `args.backend` taken from add_generation_args' flags."""
    from vlaa.backends import make_backend
    from vlaa.openai_client import api_key_for

    opts = {
        "hf": {"batch_size": args.batch_size, "max_pixels": args.max_pixels},
        "toy": {},
        "vllm": {"tensor_parallel_size": args.tensor_parallel_size, "max_model_len": args.max_model_len,
                 "gpu_memory_utilization": args.gpu_memory_utilization,
                 "max_pixels": args.max_pixels, "seed": args.seed},
        "openai": {"base_url": args.base_url, "api_key": api_key_for(args.api_key_env, args.base_url),
                   "concurrency": args.concurrency, "timeout": args.timeout, "retries": args.retries},
    }[args.backend]
    return make_backend(args.backend, model, **opts)


def sampling_from_args(args):
    """The sampling keywords of a backend call, from add_generation_args' flags."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "seed": args.seed}
