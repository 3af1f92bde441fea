"""What the stages stand on, one module per kind of reader.

    jsonl        JSONL files: read with errors naming file and line; outputs appended and resumed
    records      the record schema: verifier types, the loader (ours and the released VLAA-Thinking files),
                 validation at load; 06's local benchmark rows
    images       the one image loader: decoded in full, EXIF orientation, every PIL mode to RGB as a viewer would
    answers      reading an answer's value (integer, option, box, math spelling), the same way for the
                 gold answer and the model's; the gold check the loader runs
    parsing      answer readers of the benchmarks' own code (VLMEvalKit's letter matcher, MATH-V's reader)
    benchmarks   06_eval.py's per-benchmark rules, VLMEvalKit's and the official repositories'
    judge_prompts  06_eval.py's LLM judge prompts: VLMEvalKit's read from its source, the project's, the paper's
    judge        06_eval.py's judge: when it is asked, how its reply is read (as VLMEvalKit), replies kept
    qwen         the Qwen-VL layer (2.5 and 3): system prompt, encoding, batching, loading, sampling
    vision       cached vision features (DeepStack included) that 05 reuses across a group's completions
    backends     generation for the data stages and eval: hf, toy, vllm (openai in openai_client)
    datastage    the loop and flags the data stages share
    flags        every stage's command line: numeric flag ranges, refused combinations, one-line errors
    training     torchrun, FSDP2, the LR schedule, metrics (04 and 05)
    checkpoints  resumable checkpoints and the Hugging Face export (04 and 05)
    runs         what a run folder was made by, so nothing is reused from another run
    colocate     05's colocated vLLM engine: build, push weights, sample
    mathverify   math-verify in killable helper processes (rewards.py's math verifier)
    sources      step 1: the paper's source datasets -> records, one converter per source (python -m vlaa.sources)
    collect      the loop of vlaa.sources: rows in, records and images out, resumable, counted

Imports run one way: stages -> rewards.py -> vlaa. Nothing here imports a stage, rewards.py, or (except
lazily, inside the `toy` backend) toy.py.
"""
