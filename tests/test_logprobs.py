"""vlaa/logprobs.py by example: 04's and 05's chunked log-probs equal the formulation they replaced (values,
gradients, entropy), on the tiny Qwen2.5-VL (images, left padding, reused vision features) and on
bench/memory.py's stand-in; the device comes from the tensors; bench/memory.py --quick runs."""

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, solid_image

from vlaa import logprobs, qwen, vision

grpo = importlib.import_module("05_grpo")
sft = importlib.import_module("04_sft")
spec = importlib.util.spec_from_file_location("bench_memory", os.path.join(ROOT, "bench", "memory.py"))
M = importlib.util.module_from_spec(spec)
spec.loader.exec_module(M)  # its today_05 / today_04 are the formulations before issue 22, verbatim


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK", 5)  # several chunks, the last one short, on tiny inputs


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a, b):
    """The whole gradient (every parameter's, as one vector) within 1e-6 relative, each tensor within 1e-5."""
    assert a.keys() == b.keys() and a
    diff = sum(float((a[n] - b[n]).norm()) ** 2 for n in a) ** 0.5
    norm = sum(float(a[n].norm()) ** 2 for n in a) ** 0.5
    worst = max(float((a[n] - b[n]).norm() / a[n].norm().clamp(min=1e-30)) for n in a)
    print(f"gradient: relative difference {diff / norm:.1e} overall, {worst:.1e} in the worst tensor")
    assert diff <= 1e-6 * norm and worst <= 1e-5


def rollout_batch(tiny_model_dir, tmp_path, reuse_vision):
    """The tiny model (a copy: its gradients are taken), 3 prompts of different image sizes and lengths, 2
    sampled completions each, as 05 batches them."""
    model, tok, ip = qwen.load_model(tiny_model_dir, "float32", "cpu")
    encode = qwen.prompt_encoder(tok, ip, qwen.SYSTEM_PROMPT, model=model)
    prompts = []
    for q, s in (("What colour is the square?", 56), ("hi", 112), ("What colour is the big red square?", 84)):
        solid_image(s).save(tmp_path / f"{s}.png")
        prompts.append(encode({"id": q, "question": q, "image": str(tmp_path / f"{s}.png")}))
    torch.manual_seed(0)
    comp, mask = qwen.sample_completions(model.eval(), qwen.repeat_batch(qwen.collate(prompts, 0), 2), 9,
                                         temperature=1.0, pad_id=tok.pad_token_id)
    features = vision.image_features(model, prompts) if reuse_vision else None
    b, width = grpo.sequence_batch(prompts, list(range(len(comp))), 2, comp, mask, tok.pad_token_id, features)
    return model, b, width, comp, mask


@pytest.mark.parametrize("reuse_vision", [False, True])
def test_05_logprobs_gradients_and_entropy_equal_the_full_logits_formulation(tiny_model_dir, tmp_path,
                                                                              small_chunks, reuse_vision):
    model, b, width, comp, mask = rollout_batch(tiny_model_dir, tmp_path, reuse_vision)
    vision, T = qwen.vision_token_ids(model.config), 0.7
    model.train()
    ref_logp, ref_ent = M.today_05(model, b, width, comp, T, vision, with_entropy=True)
    logp, ent = grpo.token_logprobs(model, b, width, comp, T, vision, "cpu", True)
    assert logp.shape == ent.shape == comp.shape == (6, 9)
    assert (logp - ref_logp).abs().max() < 1e-6 and (ent - ref_ent).abs().max() < 1e-6
    assert not ent.requires_grad and (ent > 0).all()
    weights = torch.linspace(-1, 2, comp.numel()).view(comp.shape) * mask  # any loss that is linear in logp
    assert_same_grads(grads(model, (ref_logp * weights).sum()), grads(model, (logp * weights).sum()))


def test_04_loss_and_gradients_equal_the_full_logits_formulation(tiny_model_dir, small_chunks):
    model, tok, ip = qwen.load_model(tiny_model_dir, "float32", "cpu")
    ex = [qwen.encode_example(tok, ip, q, solid_image(s), response=r)
          for q, s, r in (("Q?", 56, "<answer>red</answer>"), ("What colour?", 84, "A"))]
    batch = qwen.collate(ex, tok.pad_token_id, label_examples=True)  # left-padded, answers of 5 and 2 tokens
    model.train()
    ref_loss, ref_n = M.today_04(model, batch)
    loss, n = sft.token_loss_sum(model, batch)
    assert n == ref_n == sum(len(e["input_ids"]) - e["n_prompt"] for e in ex)
    assert abs(loss.item() - ref_loss.item()) < 1e-6 * ref_loss.item()
    assert_same_grads(grads(model, ref_loss), grads(model, loss))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_stand_in_with_suppressed_ids_and_an_untrained_head(small_chunks, temperature):
    """bench/memory.py's stand-in (tied head, 300 ids, 3 of them at -inf): 4 rows x 7 scored positions, chunks
    of 5; the gradient reaches the tied embedding through both the head and the input lookup."""
    torch.manual_seed(0)
    model = M.StandIn(300, 16)
    model.embed.weight.requires_grad_(True)
    ids = torch.randint(0, 297, (4, 10))
    batch, comp, suppress = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids[:, 3:], [297, 298, 299]
    ref_logp, ref_ent = M.today_05(model, batch, 3, comp, temperature, suppress, with_entropy=True)
    logp, ent = grpo.token_logprobs(model, batch, 3, comp, temperature, suppress, "cpu", True)
    assert (logp - ref_logp).abs().max() < 1e-6 and (ent - ref_ent).abs().max() < 1e-6
    assert_same_grads(grads(model, ref_logp.sum()), grads(model, logp.sum()))
    with torch.no_grad():  # the no-grad pass (reference, old log-probs) gives the same numbers
        assert (grpo.token_logprobs(model, batch, 3, comp, temperature, suppress, "cpu")[0] - logp).abs().max() < 1e-6


def test_the_device_is_taken_from_the_tensors_not_from_model_device():
    """An FSDP2 reference with offloaded shards reports model.device == cpu while it computes on the GPU;
    the formulation before issue 22 sent the inputs and the sampled ids to model.device. Here a model that
    reports 'cuda' but computes on the CPU: the old formulation moves its inputs to 'cuda' and fails (no CUDA
    here; with one, its CPU weights meet CUDA inputs), ours follows the device it is given and the device of
    the hidden states. What this proves: no
    tensor is routed by model.device. What it does not: that FSDP2 with offloaded shards runs on a GPU."""

    class ReportsCuda(M.StandIn):
        device = property(lambda self: torch.device("cuda"))

    torch.manual_seed(0)
    model = ReportsCuda(50, 8)
    ids = torch.randint(0, 50, (2, 6))
    batch, comp = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids[:, 2:]
    with pytest.raises((AssertionError, RuntimeError)):
        M.today_05(model, batch, 2, comp, 1.0, [49])
    logp, _ = grpo.token_logprobs(model, batch, 2, comp, 1.0, [49], torch.device("cpu"))
    plain = M.StandIn(50, 8)
    plain.load_state_dict(model.state_dict())  # the same weights, reporting its real device
    assert logp.device.type == "cpu" and (logp - M.today_05(plain, batch, 2, comp, 1.0, [49])[0]).abs().max() < 1e-6


def test_memory_bench_quick_runs():
    """Functional only: the --quick table has the three paths and a number in every column that has one."""
    r = subprocess.run([sys.executable, "bench/memory.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = {line[:22].strip(): line[22:].split() for line in r.stdout.splitlines()}
    for path, columns in (("05 update + backward", 3), ("05 no-grad", 3), ("04 update + backward", 2)):
        cells = lines[path][:3]
        assert sum(c != "-" for c in cells) == columns and all(float(c) == float(c) for c in cells if c != "-")
