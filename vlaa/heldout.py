"""Held-out validation during training (--eval-data, --eval-every in 04_sft.py and 05_grpo.py): greedy accuracy
per verifier type on records the run does not train on, sharded over ranks, logged with the step's metrics."""

import torch

from vlaa.training import reduce_metrics


@torch.no_grad()
def held_out_accuracy(model, tokenizer, encode, records, score, world, rank, device, max_new_tokens=256,
                      batch_size=16):
    """Greedy accuracy on held-out records, overall and per verifier type, sharded over ranks (each rank
    answers records[rank::world], the counts are summed) -> {"eval/accuracy": ..., "eval/accuracy/<type>": ...}.
    score(completion, record) -> bool is the stage's rule (rewards.is_correct of the mixed reward). Under
    FSDP2 every rank must run the same number of generate calls: short shards repeat their last record,
    whose extra answers are not counted."""
    from vlaa.qwen import collate, sample_completions, to_device

    mine = records[rank::world]
    per_rank = -(-len(records) // world)  # ceil: every rank takes this many
    padded = mine + mine[-1:] * (per_rank - len(mine)) if mine else records[:1] * per_rank
    right, total = {}, {}
    was_training = model.training
    model.eval()
    for s in range(0, per_rank, batch_size):
        chunk = padded[s:s + batch_size]
        batch = to_device(collate([encode(r) for r in chunk], tokenizer.pad_token_id), device)
        comp, _ = sample_completions(model, batch, max_new_tokens, temperature=0.0, pad_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(comp, skip_special_tokens=True)
        for i, (r, t) in enumerate(zip(chunk, texts)):
            if s + i >= len(mine):
                break  # padding
            vtype = r["verifier_type"]
            total[vtype] = total.get(vtype, 0) + 1
            right[vtype] = right.get(vtype, 0) + bool(score(t, r))
    model.train(was_training)
    types = sorted({r["verifier_type"] for r in records})  # the same keys on every rank
    sums = {f"right/{t}": float(right.get(t, 0)) for t in types} | {f"n/{t}": float(total.get(t, 0)) for t in types}
    sums = reduce_metrics({}, sums, world, device)
    out = {"eval/accuracy": sum(sums[f"right/{t}"] for t in types) / max(1.0, sum(sums[f"n/{t}"] for t in types))}
    return out | {f"eval/accuracy/{t}": sums[f"right/{t}"] / sums[f"n/{t}"] for t in types if sums[f"n/{t}"]}
