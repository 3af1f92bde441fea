"""Log-probabilities of chosen tokens without vocabulary-sized logits for every position: 04's and 05's losses.

    logp, entropy = chosen_logprobs(model, inputs, keep, targets, temperature, suppress, with_entropy)

`keep` [b, L] marks the positions whose next token is scored (05: the T positions that predict a completion
token; 04: those that predict an assistant token), `targets` [n] are those next tokens in keep's row-major
order; both results are [n]. Why: at Qwen2.5-VL's vocabulary (151,936) one fp32 row of logits is 0.6 MB, and
the plain formulation (logits for all positions, an fp32 copy, a tempered copy, a softmax for the entropy)
kept ~5 of them per token through backward: 3 MB per completion token, 25 GB for 8 x 1,024 new tokens.
Here the model's head runs only at the kept positions, 128 of them at a time, under activation
checkpointing (torch.utils.checkpoint): backward recomputes one chunk's logits at a time, so what stays
alive per token is its hidden state (hidden_size floats) and a handful of numbers, whatever the vocabulary.
The entropy (a metric) is computed per chunk under no_grad. bench/memory.py measures it; tests/test_logprobs.py
checks it against the plain formulation (values, gradients, entropy).

The head is called from inside the model's own forward: its lm_head is swapped for the chunked computation
for the duration of one call. Under FSDP2 (vlaa/training.py) the root unit's parameters, lm_head's weight
among them (tied to embed_tokens in Qwen2.5-VL), are gathered only around the root's forward and backward:
outside them model.lm_head.weight is a shard. TRL's way, `logits_to_keep` and a per-row log-softmax, still
builds [b, T, V] logits for the completion (bench/memory.py compares the three).
"""

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

CHUNK = 128  # positions per head call: 128 x 151,936 fp32 logits are 78 MB, a few copies of it at most


def chosen_logprobs(model, inputs, keep, targets, temperature=1.0, suppress=(), with_entropy=False):
    """log softmax(logits / temperature)[target] at each kept position, with the `suppress` token ids at -inf
    (05: the vision tokens its sampler never emits). inputs: the model's keyword arguments, already on the
    compute device; keep: [b, L] bool; targets: [n] token ids, n = keep.sum(). -> (logp [n], entropy [n] or
    None), on the device the model computed on (taken from its hidden states, never from model.device:
    an FSDP2 model whose shards are offloaded reports the CPU while it computes on the GPU)."""
    head = model.get_output_embeddings()
    entropy = []

    def chunked_head(hidden):  # [b, L, H]: called by the model's forward where it would call lm_head
        h = hidden[keep.to(hidden.device)]  # [n, H]
        tgt = targets.to(hidden.device)
        parts = []
        for s in range(0, len(h), CHUNK):
            args = (h[s:s + CHUNK], head.weight, head.bias, tgt[s:s + CHUNK], temperature, suppress, with_entropy)
            lp, ent = checkpoint(chunk_logprobs, *args, use_reentrant=False) if torch.is_grad_enabled() \
                else chunk_logprobs(*args)
            parts.append(lp)
            entropy.append(ent)
        return torch.cat(parts) if parts else h.new_zeros(0)  # [n]

    with head_replaced(head, chunked_head):
        logp = model(**inputs).logits
    return logp, (torch.cat(entropy) if entropy else logp.new_zeros(0)) if with_entropy else None


def chunk_logprobs(h, weight, bias, targets, temperature, suppress, with_entropy):
    """One chunk: h [c, H] -> (log-probs of targets [c], entropy [c] or None). The same operations as the
    plain formulation on [b, T, V] (fp32 logits, / temperature, suppressed ids at -inf, logsumexp, gather), on
    c rows: in backward, checkpoint() runs this again and the [c, V] logits live for that chunk only."""
    logits = torch.nn.functional.linear(h, weight, bias).float() / temperature  # [c, V]
    if len(suppress):
        logits[:, suppress] = float("-inf")
    lse = torch.logsumexp(logits, -1)  # [c]
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        with torch.no_grad():  # H = lse - sum p * logits; 0 * -inf at the suppressed ids is nan, counted as 0
            p = torch.softmax(logits, -1).mul_(logits)  # [c, V]: the only other vocabulary-sized tensor
            entropy = lse - p.nan_to_num_(0.0).sum(-1)
    return logp, entropy


@contextlib.contextmanager
def head_replaced(head, fn):
    """Inside the block head(x) is fn(x): the model's forward calls its head as usual and gets what fn returns
    (an instance attribute `forward` shadows the class's; deleting it puts the class's back)."""
    head.forward = fn
    try:
        yield
    finally:
        del head.forward
