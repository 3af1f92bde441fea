"""What fits where: the GPU memory of 04_sft.py and 05_grpo.py for Qwen2.5-VL-3B and -7B (and Qwen3-VL-4B and
-8B) at the paper's settings, term by term, per GPU, on 1 and 8 GPUs; and a check of the two terms that depend
on lengths and on the vocabulary (activations, log-probs) against measurements on this CPU.

    python bench/plan.py                # every term per GPU: 3B/7B x 04/05 x 1/8 GPUs, the README's commands
    python bench/plan.py --markdown     # the README's "what do I need" table
    python bench/plan.py --check        # predicted vs measured on this CPU (about a minute): a random
                                        # Qwen2.5-VL with the real vocabulary (151,936) and a small body

Nothing in the stages imports this; bench/gpu_check.py prints its prediction next to the peak it measures.
Every number printed is computed from the shapes (estimated) unless --check measured it on this CPU.

The terms, per GPU, in bytes (P: parameters; W: ranks; FSDP2 shards weights, gradients and AdamW over W):
  weights     fp32 master weights of the policy, 4 P / W (vlaa/training.py load_trainable)
  compute     bf16 copies used by the matrix products: on one GPU autocast keeps a bf16 copy of each trained
              weight for the backward (2 bytes per trained parameter, the input embedding excepted); under
              FSDP2, the gathered bf16 root (embeddings, lm_head) and two gathered decoder layers
  grads       fp32, 4 P_trained / W (the vision tower is frozen: paper, and 04/05's default)
  adam        AdamW's fp32 m and v, 8 P_trained / W
  ref         05's reference model in bf16 on a GPU (vlaa/training.py load_frozen), 2 P / W; 0 with
              --ref-offload, where on one GPU it visits whole for its own forward, when no gradients exist
  vllm        --vllm-gpu-memory x the card while it samples (vLLM's gpu_memory_utilization is a share of the
              whole card); between rollouts it sleeps (level 1: weights to host, KV cache freed) and keeps
              VLLM_ASLEEP_GIB, an estimate (never measured here)
  activations what the backward keeps per token of a micro-batch, counted tensor by tensor from transformers'
              Qwen2.5-VL decoder layer (layer_bytes); with checkpointing, each layer's input plus one layer
              recomputed at a time
  logprob     the log-prob path at its peak (logprob_bytes): 04's and 05's chunked path (vlaa/logprobs.py)
              holds one chunk of CHUNK positions' logits, or in the backward the head's weight gradient;
              "full", the path before issue 22 (logits for every position plus fp32 copies), is kept as
              a comparison (`python bench/plan.py` prints both)
With --lora-rank R (vlaa/lora.py) the base is frozen and bf16 (2 P / W), only the adapters train (P_trained:
R x (in + out) per adapted linear, fp32), there is no reference copy (the policy with its adapters off), the
residual stream is bf16 (r = 2) and each adapted linear keeps a bf16 copy of its input for the adapter's
backward (lora_bytes); the head is frozen, so the chunked log-prob path has no weight gradient.
A step's peak is the largest of its phases: 05 samples (resident + vLLM's share), and updates (resident +
compute + grads + activations + log-probs + vLLM asleep); 04 only updates. Resident = weights + adam (+ ref).
"""

import argparse
import os
import sys

GIB = 2 ** 30
# usable GiB (80 GB, 141 GB and 24 GB cards (L4, A10, RTX 4090), less the CUDA context)
CARDS = {"H100": 78.0, "H200": 139.0, "24GB": 21.8}
CARD_TOTAL = {"H100": 79.6, "H200": 139.8, "24GB": 22.3}  # what vLLM's gpu_memory_utilization is a share of (GiB)
VLLM_ASLEEP_GIB = 2.0  # estimated: CUDA graphs and allocator pools a sleeping engine keeps
CHUNK = 128  # vlaa/logprobs.py's CHUNK, positions per head call (tests/test_plan.py: the same value)
PROMPT_TOKENS = 640  # 05: system prompt ~110 + a 256*32*32-pixel image <= 336 + question; padded to the longest

# Qwen2.5-VL's shapes (their config.json); the vision tower is the same in both
QWEN25_VL = {
    "3b": dict(vocab=151936, hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, tied=True),
    "7b": dict(vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, tied=False),
}
VISION = dict(depth=32, hidden=1280, intermediate=3420, heads=16, patch=14, temporal=2, merge=2)
# Qwen3-VL's shapes (Qwen/Qwen3-VL-4B- and -8B-Instruct's config.json): head_dim 128 apart from hidden/heads, no
# q/k/v bias, RMSNorm on q and k; a vision tower with LayerNorms, a plain (not gated) MLP, biased patch embedding,
# learned position embeddings and a DeepStack merger per DeepStack layer (vlaa/vision.py)
QWEN3_VL = {
    "q3-4b": dict(vocab=151936, hidden=2560, layers=36, heads=32, kv_heads=8, intermediate=9728, tied=True,
                  head_dim=128, qkv_bias=False, qk_norm=True,
                  vision=dict(depth=24, hidden=1024, intermediate=4096, heads=16, patch=16, temporal=2, merge=2,
                              qwen3=True, positions=2304, deepstack=3)),
    "q3-8b": dict(vocab=151936, hidden=4096, layers=36, heads=32, kv_heads=8, intermediate=12288, tied=False,
                  head_dim=128, qkv_bias=False, qk_norm=True,
                  vision=dict(depth=27, hidden=1152, intermediate=4304, heads=16, patch=16, temporal=2, merge=2,
                              qwen3=True, positions=2304, deepstack=3)),
}
MODELS = {**QWEN25_VL, **QWEN3_VL}
NAMES = {"3b": "3B", "7b": "7B", "q3-4b": "Qwen3-VL-4B", "q3-8b": "Qwen3-VL-8B"}

# the paper's settings (docs/paper.md) and the micro-batches / flags of the README's commands
SFT = dict(global_batch=128, seq=4096)  # 04: --max-length 4096, samples padded to the longest of a micro-batch
GRPO = dict(prompts=512, G=4, train_batch=256, new_tokens=1024, vllm_share=0.3)
COMMANDS = [  # (stage, size, GPUs, card, micro-batch, activation checkpointing, --ref-offload): README and docstrings
    ("sft", "3b", 1, "H100", 1, True, False),
    ("sft", "3b", 8, "H100", 2, True, False),
    ("sft", "7b", 8, "H100", 2, True, False),
    ("grpo", "3b", 1, "H100", 2, True, True),
    ("grpo", "3b", 8, "H100", 4, True, False),
    ("grpo", "7b", 8, "H100", 4, True, False),
    ("sft", "q3-4b", 8, "H100", 2, True, False),
    ("sft", "q3-8b", 8, "H100", 2, True, False),
    ("grpo", "q3-4b", 8, "H100", 4, True, False),
    ("grpo", "q3-8b", 8, "H100", 4, True, False),
]
# LoRA (--lora-rank 64): (stage, size, GPUs, card, micro-batch, checkpointing, vLLM's share of the card or None)
LORA_RANK = 64
LORA_COMMANDS = [("sft", "3b", 1, "24GB", 1, True, None), ("grpo", "3b", 1, "24GB", 2, True, 0.5),
                 ("grpo", "7b", 1, "H100", 4, True, 0.3), ("grpo", "q3-4b", 1, "24GB", 2, True, 0.5)]


def param_counts(m, vision=VISION):
    """(all, language model, vision tower) parameters from the shapes, counted as transformers builds them."""
    h, i, v, d = m["hidden"], m["intermediate"], m["vocab"], m.get("head_dim", m["hidden"] // m["heads"])
    q, kv, bias = m["heads"] * d, m["kv_heads"] * d, m.get("qkv_bias", True)
    # q, k, v (with bias: Qwen2.5-VL); o; MLP; 2 norms; Qwen3-VL's q and k norms
    layer = h * q + 2 * h * kv + (q + 2 * kv if bias else 0) + q * h + 3 * h * i + 2 * h \
        + (2 * d if m.get("qk_norm") else 0)
    lm = v * h * (1 if m["tied"] else 2) + m["layers"] * layer + h
    vh, vi, qwen3 = vision["hidden"], vision["intermediate"], vision.get("qwen3", False)
    norm = 2 if qwen3 else 1  # LayerNorm (weight, bias) or RMSNorm (weight) per element
    mlp = vh * vi + vi + vi * vh + vh if qwen3 else 2 * (vh * vi + vi) + vi * vh + vh  # plain or gated
    block = 2 * norm * vh + 3 * vh * vh + 3 * vh + vh * vh + vh + mlp
    merged = vh * vision["merge"] ** 2
    merger = merged * merged + merged + merged * h + h  # 2 linears; its norm: over vh, DeepStack's over `merged`
    vis = 3 * vision["temporal"] * vision["patch"] ** 2 * vh + (vh + vision["positions"] * vh if qwen3 else 0) \
        + vision["depth"] * block + norm * vh + merger + vision.get("deepstack", 0) * (norm * merged + merger)
    return lm + vis, lm, vis


def lora_params(m, rank):
    """Adapter parameters: rank x (in + out) for q, k, v, o, gate, up, down of every decoder layer."""
    h, i, d = m["hidden"], m["intermediate"], m.get("head_dim", m["hidden"] // m["heads"])
    q, kv = m["heads"] * d, m["kv_heads"] * d
    return m["layers"] * rank * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))


def lora_bytes(m, rank, c=2):
    """Per token and layer, what the adapters keep for their backward: each adapted linear's input cast to
    the compute dtype for lora_A (six of width hidden, down_proj's of width intermediate) and A's output."""
    return c * (6 * m["hidden"] + m["intermediate"] + 7 * rank) if rank else 0


def norm_bytes(h, r, c, consumers):
    """Qwen2RMSNorm (x.to(fp32), pow, * rsqrt, weight * x.to(input dtype)) and the casts of its output for
    the `consumers` linears that read it: what the backward keeps per token. r: the residual stream's bytes
    (4 on one GPU: fp32 weights under autocast; 2 under FSDP2's bf16 parameters), c: compute bytes (2: bf16)."""
    fp32_copy = 0 if r == 4 else 4 * h
    casts = c * h * consumers if r != c else c * h  # autocast casts the input once per linear
    return r * h + fp32_copy + r * h + casts


def layer_bytes(m, r=4, c=2, masked=True):
    """Bytes one decoder layer keeps for the backward per token (SDPA's fused kernels keep q, k, v, the
    output and its log-sum-exp; with a padding mask transformers repeats k and v to every head first)."""
    h, i, d = m["hidden"], m["intermediate"], m.get("head_dim", m["hidden"] // m["heads"])
    q = m["heads"] * d
    kv = q if masked else m["kv_heads"] * d
    attention = 2 * d * r + c * (q + 2 * kv) + 2 * c * q + 4 * m["heads"]  # cos/sin; q k v; out + o_proj input
    if m.get("qk_norm"):  # Qwen3: RMSNorm on q and k, per head: the projection's output, an fp32 copy, the product
        attention += (c + 8) * (q + m["kv_heads"] * d)
    mlp = 4 * c * i  # gate, silu(gate), up, their product
    return norm_bytes(h, r, c, 3) + attention + norm_bytes(h, r, c, 2) + mlp


def activation_bytes(m, tokens, checkpointing, r=4, c=2, masked=True, backward=True, lora=0):
    """Per micro-batch of `tokens` tokens: every layer's saved tensors, or with checkpointing every layer's
    input (plus, in the backward, one layer recomputed); the final norm; the embeddings' output and M-RoPE's
    cos and sin, made once per forward. lora: the adapters' rank (their inputs are kept too)."""
    h, d = m["hidden"], m.get("head_dim", m["hidden"] // m["heads"])
    layer = layer_bytes(m, r, c, masked) + lora_bytes(m, lora, c)
    layers = m["layers"] * (r * h if checkpointing else layer)
    recompute = layer if checkpointing and backward else 0
    return tokens * (layers + recompute + norm_bytes(h, r, c, 1) + r * h + 2 * d * r)


def logprob_bytes(stage, path, vocab, rows, seq, new_tokens=0, hidden=0, c=2, grad=True, r=4, head_grad=True):
    """The log-prob path's peak for one micro-batch of `rows` rows of `seq` tokens (05: `new_tokens` of them
    completions; 04: the labelled tokens, all `seq` unless `new_tokens` says how many).
    The chunked path ("chunked", vlaa/logprobs.py chosen_logprobs, counted from its code): the hidden states
    of the scored positions (r bytes each, kept by checkpoint() for the backward, and their gradient), and
    the largest of a chunk's moments, for CHUNK positions x the vocabulary:
      no grad        logits c and their fp32 copy, then that copy and the / T copy, then the / T logits and
                     logsumexp's (x - max).exp_() temporary: 8 bytes per entry at the most
      backward       checkpoint() recomputes the chunk: the / T logits kept for logsumexp, its backward's
                     difference, exp and product, the other branch's gradient: 16 bytes per entry; then
                     the head's weight gradient, vocab x hidden in the compute dtype and, on one GPU, its
                     fp32 copy before it is added to the gradient (under FSDP2 the bf16 one is reduced)
    The head's bf16 weight copy is the `compute` term; the accumulated weight gradient, the `grads` term.
    The path before issue 22 ("full"), counted from 04's token_loss_sum and 05's token_logprobs of then:
    logits for all `seq` positions in the compute dtype (c), then fp32 copies:
      04             logits c, the fp32 copy, log_softmax's output, its gradient: (c + 12) per position
      05 update      the fp32 logits / T kept for logsumexp; at the peak the entropy's softmax,
                     nan_to_num and product (no grad), or in the backward two gradients and a temporary:
                     20 bytes per completion position, or c per position + 4 per completion while casting
      05 no grad     the fp32 copy and the / T copy, then the / T copy and logsumexp's temporary: 8 per
                     completion position"""
    f = 4
    if path == "chunked":
        kept = rows * (new_tokens or seq)
        if not grad:
            return max(c + f, 2 * f) * CHUNK * vocab + r * kept * hidden
        weight_grad = (c + (f if r == 4 else 0)) * vocab * hidden if head_grad else 0  # LoRA: a frozen head
        return max(4 * f * CHUNK * vocab, weight_grad) + 2 * r * kept * hidden
    if stage == "sft":
        return rows * vocab * seq * max(c + 2 * f, 3 * f)
    if not grad:
        return rows * vocab * max(c * seq + f * new_tokens, 2 * f * new_tokens)
    return rows * vocab * max(c * seq + f * new_tokens, 5 * f * new_tokens)


def plan(stage, size, gpus, micro, checkpointing, ref_offload=False, card="H100", logprob="chunked", seq=None,
         new_tokens=None, vllm=True, lora=0, vllm_share=None):
    """Every term per GPU in GiB, and the peak of each phase -> dict. Single-GPU runs are plain python
    (autocast, fp32 residual stream); several GPUs are FSDP2 with bf16 parameters (bf16 residual stream).
    size: "3b", "7b" or a shape dict; seq, new_tokens: a micro-batch's row length and completion length
    (default: the paper's); vllm=False: rollouts by transformers generate (no engine's share); lora: the
    adapters' rank (0: full fine-tuning); vllm_share: --vllm-gpu-memory (default: the paper run's 0.3)."""
    m = MODELS[size] if isinstance(size, str) else size
    total, lm, vis = param_counts(m, m.get("vision", VISION))
    trained = lora_params(m, lora) if lora else lm  # vision frozen
    h, v = m["hidden"], m["vocab"]
    r = 4 if gpus == 1 and not lora else 2
    out = {"weights": (2 * total if lora else 4 * total) / gpus + (4 * trained / gpus if lora else 0),
           "grads": 4 * trained / gpus, "adam": 8 * trained / gpus}
    if gpus == 1:
        out["compute"] = 2 * trained if lora else 2 * (trained - (0 if m["tied"] else v * h))  # embedding: no matmul
    else:  # the root unit (embedding, lm_head) gathered for the whole forward + backward, two layers at a time
        layer = (lm - v * h * (1 if m["tied"] else 2) - h) / m["layers"]
        out["compute"] = 2 * (v * h * (1 if m["tied"] else 2)) + 2 * 2 * layer
    if stage == "sft":
        seq, new = seq or SFT["seq"], 0
    else:
        new = new_tokens or GRPO["new_tokens"]
        seq = seq or PROMPT_TOKENS + new
        out["ref"] = 0.0 if ref_offload or lora else 2 * total / gpus
    tokens = micro * seq
    out["activations"] = activation_bytes(m, tokens, checkpointing, r=r, lora=lora)
    out["activations_no_ckpt"] = activation_bytes(m, tokens, False, r=r, lora=lora)
    out["activations_ckpt"] = activation_bytes(m, tokens, True, r=r, lora=lora)
    out["logprob"] = logprob_bytes(stage, logprob, v, micro, seq, new, h, r=r, head_grad=not lora)
    out = {k: x / GIB for k, x in out.items()}
    resident = out["weights"] + out["adam"] + out.get("ref", 0.0)
    phases = {"update": resident + out["compute"] + out["grads"] + out["activations"] + out["logprob"]}
    if stage == "grpo":
        asleep = VLLM_ASLEEP_GIB if vllm else 0.0
        out["vllm"] = (vllm_share or GRPO["vllm_share"]) * CARD_TOTAL[card] if vllm else 0.0
        phases["update"] += asleep
        phases["rollout"] = resident + out["vllm"]
        if ref_offload and gpus == 1:  # the reference visits whole; no gradients exist then
            ref = 2 * total / GIB
            no_grad = logprob_bytes(stage, logprob, v, micro, seq, new, h, grad=False, r=r) / GIB
            phases["reference"] = resident + ref + asleep + no_grad
    out["phases"] = phases
    out["peak"] = max(phases.values())
    out["fits"] = out["peak"] <= CARDS[card]
    return out


def hours(stage, size, gpus, mfu=0.3, peak_tflops=989.0, sft_tokens=700, gen_tok_s=2500.0):
    """Wall time (estimated): the train phase from its FLOPs (6 per parameter per token for forward and
    backward, + 2 for the recompute of checkpointing; 05: + 2 for the reference and 2 for the old log-probs,
    its 8 updates per rollout being off-policy) at `mfu` of the card's dense bf16 peak; 05's generation at
    `gen_tok_s` sampled tokens per second per GPU. Assumptions, not measurements: SFT-126K samples of
    `sft_tokens` tokens, completions of 300 tokens (the paper's curves show 150-300), 1 epoch / 49 steps."""
    total, lm, _ = param_counts(MODELS[size], MODELS[size].get("vision", VISION))
    rate = mfu * peak_tflops * 1e12 * gpus
    if stage == "sft":
        return 126_000 * sft_tokens * 8 * lm / rate / 3600
    rows, completion = GRPO["prompts"] * GRPO["G"], 300
    train = rows * (PROMPT_TOKENS + completion) * 12 * lm / rate
    generate = rows * completion / (gen_tok_s * gpus)
    return 49 * (train + generate) / 3600


def table(markdown=False):
    """The README's table: per stage, size and GPU count, the plan's peak per GPU, what fits, the time."""
    rows = []
    for stage, size, gpus, card, micro, ckpt, offload in COMMANDS + [("sft", "7b", 1, "H200", 1, True, False),
                                                                    ("grpo", "7b", 1, "H200", 1, True, True)]:
        p = plan(stage, size, gpus, micro, ckpt, offload, card)
        flags = f"--micro-batch {micro}" + (" --activation-checkpointing" if ckpt else "") \
            + (" --ref-offload" if offload else "")
        word = "fits" if p["peak"] <= 0.9 * CARDS[card] else "tight on" if p["fits"] else "does not fit"
        verdict = f"{p['peak']:.0f} GiB: {word} {card} ({CARDS[card]:.0f})"
        time = f"~{hours(stage, size, gpus):.1f} h" if p["fits"] else "-"
        rows.append((NAMES[size], "SFT (04)" if stage == "sft" else "GRPO (05)", gpus, flags, verdict, time))
    for stage, size, gpus, card, micro, ckpt, share in LORA_COMMANDS:
        p = plan(stage, size, gpus, micro, ckpt, card=card, lora=LORA_RANK, vllm_share=share)
        flags = f"--lora-rank {LORA_RANK} --micro-batch {micro}" + (" --activation-checkpointing" if ckpt else "") \
            + (f" --rollout vllm --vllm-gpu-memory {share}" if share else "")
        word = "fits" if p["peak"] <= 0.9 * CARDS[card] else "tight on" if p["fits"] else "does not fit"
        rows.append((NAMES[size], "SFT (04)" if stage == "sft" else "GRPO (05)", gpus, flags,
                     f"{p['peak']:.0f} GiB: {word} {card} ({CARDS[card]:.0f})", "-"))
    if markdown:
        print("| model | stage | GPUs | flags | peak per GPU (estimated) | time (estimated) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(map(str, r)) + " |")
    else:
        for r in rows:
            print(f"{r[0]:11s} {r[1]:9s} {r[2]} GPU  {r[3]:55s} {r[4]:30s} {r[5]}")


def show_terms():
    keys = ["weights", "compute", "grads", "adam", "ref", "vllm", "activations_no_ckpt", "activations_ckpt",
            "logprob"]
    print("GiB per GPU, estimated from the shapes; activations and log-probs for one micro-batch (05: prompt "
          f"{PROMPT_TOKENS} + {GRPO['new_tokens']} new tokens; 04: {SFT['seq']} tokens); log-probs by the chunked path")
    print(f"{'':28s}" + "".join(f"{k.replace('activations', 'act'):>12s}" for k in keys) + f"{'peak':>8s}")
    for stage, size, gpus, card, micro, ckpt, offload in COMMANDS:
        p = plan(stage, size, gpus, micro, ckpt, offload, card)
        name = f"{size} {stage} {gpus} GPU mb{micro}{' off' if offload else ''}"
        print(f"{name:28s}" + "".join(f"{p.get(k, 0.0):12.1f}" for k in keys) + f"{p['peak']:8.1f}"
              + ("" if p["fits"] else "  DOES NOT FIT"))
        c = plan(stage, size, gpus, micro, ckpt, offload, card, logprob="full")
        print(f"{'  full logits (before 22)':28s}{'':96s}{c['logprob']:12.1f}{c['peak']:8.1f}"
              + ("" if c["fits"] else "  DOES NOT FIT"))
    for stage, size, gpus, card, micro, ckpt, share in LORA_COMMANDS:
        p = plan(stage, size, gpus, micro, ckpt, card=card, lora=LORA_RANK, vllm_share=share)
        name = f"{size} {stage} LoRA{LORA_RANK} {card} mb{micro}"
        print(f"{name:28s}" + "".join(f"{p.get(k, 0.0):12.1f}" for k in keys) + f"{p['peak']:8.1f}"
              + ("" if p["fits"] else "  DOES NOT FIT"))


# ----------------------------------------------------------------------------------------------------
# The check: predicted vs measured on this CPU, a random Qwen2.5-VL with the real vocabulary


def live_bytes_tracker():
    """A TorchDispatchMode that counts the bytes of every storage an op creates while they live (a CPU
    stand-in for torch.cuda.max_memory_allocated, without the allocator's rounding) -> the mode; read
    .now and .peak, mark() resets the peak."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.now, self.peak, self.seen = 0, 0, {}

        def forget(self, key, n):
            self.seen.pop(key, None)
            self.now -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}  # views and in-place results allocate nothing
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    s = t.untyped_storage()
                    key = s.data_ptr()
                    if key and key not in self.seen and key not in inputs:
                        self.seen[key] = weakref.finalize(s, self.forget, key, s.nbytes())
                        self.now += s.nbytes()
            self.peak = max(self.peak, self.now)
            return out

    return LiveBytes()


def small_model(vocab=151936, hidden=256, layers=8, heads=2, kv_heads=1, intermediate=1376):
    """A random Qwen2.5-VL with the real vocabulary and a small body (head dim 128, as the real ones)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden),
        tie_word_embeddings=True)
    model = Qwen2_5_VLForConditionalGeneration(cfg).train()
    shape = dict(vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                 tied=True)
    return model, shape


def padded_batch(rows, seq, vocab, pad=3):
    """Token ids with a few positions of left padding in every row but the first (05's batches are padded)."""
    import torch

    ids = torch.randint(10, vocab, (rows, seq))
    mask = torch.ones(rows, seq, dtype=torch.long)
    for r in range(1, rows):
        mask[r, :pad * r] = 0
    return {"input_ids": ids, "attention_mask": mask}


def measure(forward, backward=True):
    """(live bytes after the forward, peak bytes of forward + backward) of what `forward` creates."""
    tracker = live_bytes_tracker()
    with tracker:
        loss = forward()
        after_forward = tracker.now
        if backward:
            loss.backward()
    return after_forward, tracker.peak


def check(rows=4, seq=1024, new=256):
    """Predicted vs measured on this CPU under bf16 autocast over fp32 weights, as one GPU computes (r = 4,
    c = 2): the body's activations with and without checkpointing, then 04's loss and 05's log-probs as
    the stages compute them (their log-prob term on top of the body's) -> [(name, predicted, measured)]."""
    import importlib

    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    grpo, sft = importlib.import_module("05_grpo"), importlib.import_module("04_sft")
    assert importlib.import_module("vlaa.logprobs").CHUNK == CHUNK, "bench/plan.py's CHUNK must be vlaa/logprobs.py's"
    model, m = small_model()
    results = []
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731

    def row(name, predicted, measured):
        results.append((name, predicted, measured))
        print(f"  {name:58s} {predicted / 2 ** 20:9.1f} {measured / 2 ** 20:9.1f} {measured / predicted:7.2f}",
              flush=True)

    print(f"predicted vs measured on this CPU, bf16 autocast over fp32 weights: vocabulary {m['vocab']:,}, hidden "
          f"{m['hidden']}, {m['layers']} layers, {m['heads']}/{m['kv_heads']} heads, intermediate {m['intermediate']}")
    print(f"  {'term (MiB; measured: live bytes of what the step allocates)':58s} {'predicted':>9s} {'measured':>9s}"
          f" {'ratio':>7s}")
    batch = padded_batch(rows, seq, m["vocab"])
    model.model.language_model.embed_tokens.weight.requires_grad_(False)  # the body alone: no vocabulary here
    grads = 4 * sum(p.numel() for p in model.model.language_model.layers.parameters())
    for ckpt in (False, True):
        if ckpt:
            model.gradient_checkpointing_enable()

        def fwd():
            with bf16():
                return model.model(**batch).last_hidden_state.float().pow(2).mean()
        after, peak = measure(fwd)
        tag = "with" if ckpt else "without"
        kept = activation_bytes(m, rows * seq, ckpt, backward=False)
        row(f"activations {tag} checkpointing, kept after the forward", kept, after)
        row(f"forward + backward peak {tag} checkpointing, + grads", activation_bytes(m, rows * seq, ckpt,
            backward=True) + grads, peak)
        model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_disable()
    model.model.language_model.embed_tokens.weight.requires_grad_(True)
    trained = sum(p.numel() for p in model.model.language_model.parameters())  # the tied lm_head included
    compute = 2 * trained  # autocast's bf16 copies (the plan's compute term): the head's is the largest

    # 04's loss and 05's log-probs as the stages compute them (the chunked path): n2 labelled or new tokens
    r2, s2, n2 = 2, 512, new
    b = padded_batch(r2, s2, m["vocab"])
    labels = b["input_ids"].clone()
    labels[:, :s2 - n2] = -100
    base = activation_bytes(m, r2 * s2, False, backward=True) + 4 * trained + compute

    def sft_loss():
        with bf16():
            return sft.token_loss_sum(model, dict(b, labels=labels))[0]
    _, peak = measure(sft_loss)
    row(f"04 token_loss_sum + backward, {r2} x {s2} tokens, {n2} labelled", base + logprob_bytes(
        "sft", "chunked", m["vocab"], r2, s2, n2, m["hidden"]), peak)
    model.zero_grad(set_to_none=True)
    comp, width, vision = b["input_ids"][:, s2 - n2:], s2 - n2, torch.tensor([], dtype=torch.long)

    def grpo_logp(grad=True):
        with torch.set_grad_enabled(grad), bf16():
            logp = grpo.token_logprobs(model, b, width, comp, 1.0, vision, torch.device("cpu"), with_entropy=grad)[0]
        return logp.sum()
    _, peak = measure(grpo_logp)
    row(f"05 token_logprobs + backward, {r2} x {s2} tokens, {n2} new", base + logprob_bytes(
        "grpo", "chunked", m["vocab"], r2, s2, n2, m["hidden"]), peak)
    model.zero_grad(set_to_none=True)
    _, peak = measure(lambda: grpo_logp(False), backward=False)
    row(f"05 token_logprobs without grad, {r2} x {s2} tokens, {n2} new", compute + logprob_bytes(
        "grpo", "chunked", m["vocab"], r2, s2, n2, m["hidden"], grad=False), peak)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true", help="print the README's table")
    ap.add_argument("--check", action="store_true", help="predicted vs measured on this CPU (about a minute)")
    args = ap.parse_args()
    if args.check:
        results = check()
        worst = max(abs(meas / pred - 1) for _, pred, meas in results)
        print(f"largest gap {worst:.0%} (goal: within 25%)")
        return
    if args.markdown:
        return table(markdown=True)
    show_terms()
    print()
    table()


if __name__ == "__main__":
    main()
