"""Memory per token of 04's and 05's log-prob paths at Qwen2.5-VL's real vocabulary (151,936), on this CPU:
the formulation before issue 22 ("today"), ours (vlaa/logprobs.py, called through 04's and 05's own
functions) and TRL's way (logits_to_keep, a per-row log-softmax, the entropy in chunks), side by side.

    python bench/memory.py            # V 151,936, hidden 2048 (3B): ~3 minutes, ~6 GB of RAM
    python bench/memory.py --quick    # a small vocabulary, for tests/test_logprobs.py: runs, measures nothing

Paths: 05's update (token log-probs with the entropy, then backward of their sum), 05's no-grad pass (the
reference and old log-probs) and 04's loss + backward. Per completion token for 05, per sequence token for
04 (every completion position labelled, as the assistant's tokens are). TRL's SFT computes every
position's logits and the model's own loss, today's 04: no column of its own.

Workload: a stand-in causal LM with the real vocabulary and hidden size (embeddings tied to the head, as in
Qwen2.5-VL-3B, one tanh layer as the body), 2 rows of 32 prompt tokens + T new tokens, fp32, 2 threads.
What is measured is the head's share; a real body adds its own activations (the same on all three sides).
The tied weight is frozen here: its gradient (V x H, 1.2 GB, three of them at the moment the tied gradients
add up) is a fixed cost that would set every peak and hide what grows with the length; gradients still
flow through the head into the body.

Method: the peak resident memory of this process (Linux VmHWM, reset through /proc/self/clear_refs before
each measurement) above the resident memory just before it. glibc's mmap threshold is fixed at 64 KiB
(mallopt), so each freed tensor leaves RSS at once, and torch's CPU allocator keeps no cache: the peak is
that of the live tensors. MB per token is the slope between T = 64 and 256 (T = 8 and 24 with --quick):
fixed costs (the weight gradient, one chunk of logits) cancel. The count of live [b, T, V] tensors, which
this measures, is the same on a GPU.
"""

import argparse
import ctypes
import gc
import importlib
import os
import sys
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
VOCAB, HIDDEN = 151_936, 2048  # Qwen2.5-VL-3B
ROWS, PROMPT = 2, 32
SUPPRESS = [151652, 151653, 151655, 151656]  # Qwen2.5-VL's vision ids; 05 puts them at -inf


# ----------------------------------------------------------------------------------------------------
# The stand-in model and the formulations compared


class StandIn(torch.nn.Module):
    """What the log-prob path touches of a causal LM, with transformers' interface: forward(input_ids, ...,
    logits_to_keep) -> .logits from self.lm_head, get_output_embeddings(), .device, .dtype."""

    def __init__(self, vocab, hidden):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.body = torch.nn.Linear(hidden, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False, device="meta")
        self.lm_head.weight = self.embed.weight  # tied, as in Qwen2.5-VL-3B
        self.embed.weight.requires_grad_(False)  # its gradient, a fixed V x H, would set every peak (see above)
        self.dtype = torch.float32

    @property
    def device(self):
        return self.embed.weight.device

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **_):
        h = torch.tanh(self.body(self.embed(input_ids)))  # [b, L, H]
        return SimpleNamespace(logits=self.lm_head(h[:, -logits_to_keep:]))  # 0 keeps every position


def today_05(model, batch, width, comp, temperature, vision_ids, with_entropy=False):
    """05's token_logprobs before issue 22, verbatim: logits for every position, an fp32 slice, a tempered
    copy, logsumexp, gather, a softmax for the entropy. The reference of tests/test_logprobs.py."""
    device = model.device
    inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    logits = model(**inputs).logits[:, width - 1:-1].float() / temperature  # [b, T, V]: position t predicts t+1
    logits[..., vision_ids] = float("-inf")
    lse = torch.logsumexp(logits, -1)  # [b, T]
    logp = logits.gather(-1, comp.to(device).unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        with torch.no_grad():
            probs = torch.softmax(logits, -1)
            entropy = lse - (probs * logits.nan_to_num(neginf=0.0)).sum(-1)
    return logp, entropy


def today_04(model, batch):
    """04's token_loss_sum before issue 22, verbatim: logits for every token, an fp32 copy, cross-entropy."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # [B, L, V]
    labels = batch["labels"][:, 1:]  # [B, L-1]: token t is predicted at position t-1
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                             ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum()


def trl_05(model, batch, width, comp, temperature, with_entropy=False):
    """TRL GRPOTrainer's way (_get_per_token_logps_and_entropies, selective_log_softmax, entropy_from_logits;
    written here after its code): logits for the completion only (logits_to_keep), a tempered copy, one row's
    logsumexp at a time, the entropy 128 positions at a time. TRL does not suppress the vision ids."""
    T = comp.shape[1]
    logits = model(**batch, logits_to_keep=T + 1).logits[:, :-1] / temperature  # [b, T, V]
    picked = logits.gather(-1, comp.unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.stack([torch.logsumexp(row, -1) for row in logits])  # [b, T]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            parts = []
            for c in logits.reshape(-1, logits.shape[-1]).split(128):
                lp = torch.log_softmax(c, -1)
                parts.append(-(lp.exp() * lp).sum(-1))
            entropy = torch.cat(parts).view(comp.shape)
    return logp, entropy


def workloads(model, T, vocab):
    """{path: {side: a function that runs it once}} for rows of PROMPT + T tokens."""
    grpo, sft = importlib.import_module("05_grpo"), importlib.import_module("04_sft")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab - 8, (ROWS, PROMPT + T), generator=g)  # [b, W+T]
    batch, comp = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids[:, PROMPT:]
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    suppress = [i for i in SUPPRESS if i < vocab] or [vocab - 1]
    cpu = torch.device("cpu")

    def update(f):
        logp, _ = f()
        logp.sum().backward()

    def no_grad(f):
        with torch.no_grad():
            f()

    def sft_update(f):
        f()[0].backward()

    return {
        "05 update + backward": {
            "today": lambda: update(lambda: today_05(model, batch, PROMPT, comp, 0.8, suppress, True)),
            "ours": lambda: update(lambda: grpo.token_logprobs(model, batch, PROMPT, comp, 0.8, suppress, cpu, True)),
            "TRL": lambda: update(lambda: trl_05(model, batch, PROMPT, comp, 0.8, True))},
        "05 no-grad": {
            "today": lambda: no_grad(lambda: today_05(model, batch, PROMPT, comp, 0.8, suppress)),
            "ours": lambda: no_grad(lambda: grpo.token_logprobs(model, batch, PROMPT, comp, 0.8, suppress, cpu)),
            "TRL": lambda: no_grad(lambda: trl_05(model, batch, PROMPT, comp, 0.8))},
        "04 update + backward": {
            "today": lambda: sft_update(lambda: today_04(model, {**batch, "labels": labels})),
            "ours": lambda: sft_update(lambda: sft.token_loss_sum(model, {**batch, "labels": labels}))},
    }


# ----------------------------------------------------------------------------------------------------
# Measuring


def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_mb(model, run):
    """Peak resident memory of one call above the resident memory before it, in MB (10^6 bytes)."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = kib("VmRSS:")
    run()
    peak = kib("VmHWM:") - before
    model.zero_grad(set_to_none=True)
    return peak * 1024 / 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="vocabulary 4,096, hidden 64, T = 8 and 24 (for tests)")
    args = ap.parse_args(argv)
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: a freed tensor leaves RSS at once
    torch.set_num_threads(2)
    torch.manual_seed(0)
    vocab, hidden, lengths = (4096, 64, (8, 24)) if args.quick else (VOCAB, HIDDEN, (64, 256))
    model = StandIn(vocab, hidden)
    runs = {T: workloads(model, T, vocab) for T in lengths}
    paths = list(runs[lengths[0]])
    peaks = {}
    for path in paths:
        for side, run in runs[lengths[0]][path].items():
            run()  # warm-up: first-call allocations are not the path's
            for T in lengths:
                peaks[path, side, T] = peak_mb(model, runs[T][path][side])
    growth = ROWS * (lengths[1] - lengths[0])  # tokens: completion and sequence alike (prompt fixed)
    print(f"vocabulary {vocab:,}, hidden {hidden}, {ROWS} rows x ({PROMPT} prompt + T new tokens), T {lengths[0]} "
          f"-> {lengths[1]}; MB per token (05: completion token, 04: sequence token) = peak growth / token growth")
    print(f"{'path':22s} {'today':>8s} {'ours':>8s} {'TRL':>8s} {'today/ours':>11s} {'TRL/ours':>9s}"
          f"   peak MB at T={lengths[1]}: today / ours / TRL")
    for path in paths:
        sides = runs[lengths[0]][path]
        slope = {s: (peaks[path, s, lengths[1]] - peaks[path, s, lengths[0]]) / growth for s in sides}
        ratio = lambda s: f"{slope[s] / max(slope['ours'], 1e-6):.0f}x" if s in slope else "-"  # noqa: E731
        cell = lambda s: f"{slope[s]:8.3f}" if s in slope else f"{'-':>8s}"  # noqa: E731
        tops = " / ".join(f"{peaks[path, s, lengths[1]]:.0f}" if s in slope else "-" for s in ("today", "ours", "TRL"))
        print(f"{path:22s} {cell('today')} {cell('ours')} {cell('TRL')} {ratio('today'):>11s} {ratio('TRL'):>9s}"
              f"   {tops}")


if __name__ == "__main__":
    main()
