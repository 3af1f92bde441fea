"""04_sft.py by example: the loss mask, 1 vs 2 ranks, resume, released records, too-long samples."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, solid_image

from vlaa import backends, qwen, records, training

sft = importlib.import_module("04_sft")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 40), "blue": (40, 70, 220)}


def colour_sft_data(folder, n=32, seed=0):
    """n solid squares with a one-line R1-style response naming the colour."""
    import random

    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    with open(os.path.join(folder, "sft.jsonl"), "w") as f:
        for i in range(n):
            c = rng.choice(sorted(COLOURS))
            solid_image(56, COLOURS[c]).save(os.path.join(folder, "images", f"{i}.png"))
            f.write(json.dumps({"id": str(i), "image": f"images/{i}.png", "question": "What colour is the square?",
                                "answer": c, "verifier_type": "open",
                                "response": f"<think> It is {c}. </think> <answer>{c}</answer>"}) + "\n")
    return os.path.join(folder, "sft.jsonl")


def run_sft(*args, nproc=1):
    cmd = [sys.executable, "04_sft.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "04_sft.py"]
    r = subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]


def test_loss_mask_covers_exactly_the_answer_tokens(tiny):
    _, tok, ip = tiny
    response = "<think> It is red. </think> <answer>red</answer>"
    ex = qwen.encode_example(tok, ip, "What colour is the square?", solid_image(56), response=response)
    batch = qwen.collate([ex], tok.pad_token_id, label_examples=True)
    n_answer = len(tok(response + "<|im_end|>", add_special_tokens=False)["input_ids"])
    L = batch["input_ids"].shape[1]
    kept = (batch["labels"][0] != -100).nonzero().flatten().tolist()
    assert kept == list(range(L - n_answer, L))  # the assistant's tokens and nothing else
    assert tok.decode(batch["labels"][0, kept]) == response + "<|im_end|>"
    assert tok.image_token_id not in batch["labels"][0, kept].tolist()


def test_token_loss_is_normalised_over_answer_tokens(tiny):
    model, tok, ip = tiny
    ex = [qwen.encode_example(tok, ip, "Q?", solid_image(56), response=r) for r in ("<answer>red</answer>", "A")]
    batch = qwen.collate(ex, tok.pad_token_id, label_examples=True)
    with torch.no_grad():
        loss_sum, n = sft.token_loss_sum(model, batch)
    assert n == sum(len(e["input_ids"]) - e["n_prompt"] for e in ex)
    assert 0 < loss_sum / n < 20


def test_two_ranks_give_the_same_loss_curve_as_one(tmp_path, each_model_dir):
    import toy

    data = colour_sft_data(str(tmp_path / "d"))
    toy.make_data(str(tmp_path / "held"), n=0, test_n=9, seed=1, kinds="colour,count,box")  # mixed types
    common = ["--model", each_model_dir, "--data", data, "--global-batch", 16, "--micro-batch", 4, "--lr", 2e-3,
              "--max-steps", 4, "--eval-data", tmp_path / "held" / "test.jsonl", "--eval-every", 2,
              "--eval-max-new-tokens", 4]
    run_sft(*common, "--out", tmp_path / "one")
    run_sft(*common, "--out", tmp_path / "two", nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == 4 and one[-1] < one[0]
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    # held-out accuracy, sharded over the ranks (5 and 4 records, of different types), equals one process'
    evals = [[{k: v for k, v in json.loads(line).items() if k.startswith("eval/")}
              for line in open(tmp_path / run / "metrics.jsonl")] for run in ("one", "two")]
    assert [bool(e) for e in evals[0]] == [False, True, False, True] and evals[0] == evals[1]
    # the same run again into its folder: refused on every rank, rank 0 says why; without the ranks agreeing,
    # rank 1 would go on to a collective and crash there ("RuntimeError: ... Connection closed by peer")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "04_sft.py"]
    r = subprocess.run(cmd + [str(a) for a in common + ["--out", tmp_path / "two"]], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.count("already holds this run") == 1, r.stderr[-3000:]
    assert "RuntimeError" not in r.stderr, r.stderr[-3000:]


def test_lr_warms_up_from_zero_with_one_point_per_optimizer_step(tmp_path, tiny_model_dir):
    data = colour_sft_data(str(tmp_path / "d"))
    sft.main(["--model", tiny_model_dir, "--data", data, "--out", str(tmp_path / "o"), "--global-batch", "8",
              "--micro-batch", "8", "--lr", "1e-3", "--warmup-ratio", "0.3", "--max-steps", "4"])
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert lrs == pytest.approx([0.0, 0.5e-3, 1e-3, 0.5e-3])  # warmup ceil(0.3 x 4) = 2 steps, then cosine to 0


def test_resume_continues_exactly(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    data = colour_sft_data(str(tmp_path / "d"))
    # a constant LR (min-lr = lr, no warmup), so a 5-step run is the first half of a 10-step run
    common = ["--model", tiny_model_dir, "--data", data, "--global-batch", 8, "--micro-batch", 8, "--lr", 1e-3,
              "--min-lr", 1e-3, "--warmup-ratio", 0]
    run_sft(*common, "--out", tmp_path / "straight", "--max-steps", 10)
    run_sft(*common, "--out", tmp_path / "halves", "--max-steps", 5)
    r = run_sft(*common, "--out", tmp_path / "halves", "--max-steps", 10, "--resume")
    assert "resumed from" in r.stdout and "ckpt-5" in r.stdout
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "halves" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [json.loads(line)["step"] for line in open(tmp_path / "halves" / "metrics.jsonl")] == list(range(1, 11))


def test_released_records_load_and_too_long_samples_are_counted_not_cut(tmp_path, tiny):
    _, tok, ip = tiny
    solid_image(56).save(tmp_path / "a.png")
    short = {"image": "a.png", "question": "Colour?", "answer": "<think>red</think><answer>red</answer>"}
    long = {"image": "a.png", "question": "Colour?",
            "answer": "<think>" + "very long " * 200 + "</think><answer>red</answer>"}
    path = tmp_path / "VLAA-Thinking-SFT-126K.json"
    path.write_text(json.dumps(short) + "\n" + json.dumps(long) + "\n")
    loaded = records.load_records(str(path), need=("question", "response"))
    assert [r["response"] for r in loaded] == [short["answer"], long["answer"]]
    full = qwen.encode_example(tok, ip, "Colour?", solid_image(56), response=short["answer"])
    kept, dropped = qwen.fitting(loaded, tok, ip, len(full["input_ids"]) + 100, qwen.SYSTEM_PROMPT, response=True)
    assert (len(kept), dropped) == (1, 1)
    kept, dropped = qwen.fitting(loaded[:1], tok, ip, len(full["input_ids"]), qwen.SYSTEM_PROMPT, response=True)
    assert (len(kept), dropped) == (1, 0)  # the length check is exact: a sample of exactly max_length fits
    kept, dropped = qwen.fitting(loaded[:1], tok, ip, len(full["input_ids"]) - 1, qwen.SYSTEM_PROMPT, response=True)
    assert (len(kept), dropped) == (0, 1)


def test_bad_input_names_file_and_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "sft.jsonl"
    solid_image(56).save(tmp_path / "a.png")
    bad.write_text(json.dumps({"id": "1", "image": "a.png", "question": "q", "answer": "x"}) + "\n")
    r = subprocess.run([sys.executable, "04_sft.py", "--model", tiny_model_dir, "--data", str(bad), "--out",
                        str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "sft.jsonl:1 (id '1'): missing field 'response'" in r.stderr


@pytest.mark.parametrize("step", [0, 3, 4, 9])
def test_data_position_is_the_step(step):
    # 10 records, global batch 4 -> 2 steps per epoch; each epoch is a fresh permutation
    idx = training.step_indices(step, 10, 4, seed=0)
    assert len(idx) == 4 and len(set(idx)) == 4
    assert idx == training.step_indices(step, 10, 4, seed=0)
    epoch_steps = [training.step_indices(s, 10, 4, seed=0) for s in (2 * (step // 2), 2 * (step // 2) + 1)]
    assert not set(epoch_steps[0]) & set(epoch_steps[1])  # no repeat within an epoch


def toy_accuracy(model_dir, test, max_new_tokens=48):
    """Greedy answers on toy test records, scored like 06_eval's toy benchmark (iou: IoU >= 0.5)."""
    import rewards

    gen = backends.make_backend("hf", model_dir, device="cpu", batch_size=64)
    outs = gen([{"prompt": r["question"], "image": r["image"]} for r in test],
               max_new_tokens=max_new_tokens, temperature=0.0)
    return sum(rewards.is_correct(rewards.mixed_reward(o[0], r)) for o, r in zip(outs, test)) / len(test)


def teacher_sft_data(tmp_path):
    """The toy teacher's traces through 01-03 for the kinds a tiny model learns -> (sft.jsonl, test records)."""
    import toy

    caption, distill, verify = (importlib.import_module(m) for m in ("01_caption", "02_distill", "03_rewrite_verify"))
    data = tmp_path / "data"
    toy.make_data(str(data), n=1500, test_n=150, seed=0, kinds="colour,box,count")  # what a tiny model learns
    caption.main(["--in", str(data / "train.jsonl"), "--out", str(tmp_path / "cap.jsonl"), "--backend", "toy",
                  "--model", "captioner"])
    distill.main(["--in", str(tmp_path / "cap.jsonl"), "--out", str(tmp_path / "dist.jsonl"), "--backend", "toy",
                  "--model", "reasoner:error_rate=0,hesitation_rate=0"])
    verify.main(["--in", str(tmp_path / "dist.jsonl"), "--out", str(tmp_path / "final")])
    return str(tmp_path / "final" / "sft.jsonl"), records.load_records(str(data / "test.jsonl"))


@pytest.mark.slow
def test_sft_on_teacher_traces_learns_the_learnable_kinds(tmp_path, each_learning_model_dir):
    sft_data, test = teacher_sft_data(tmp_path)
    before = toy_accuracy(each_learning_model_dir, test)
    sft.main(["--model", each_learning_model_dir, "--data", sft_data, "--out",
              str(tmp_path / "sft"), "--global-batch", "32", "--micro-batch", "32", "--lr", "2e-3", "--min-lr", "2e-3",
              "--warmup-ratio", "0", "--max-steps", "500", "--save-every", "100000"])
    after = toy_accuracy(str(tmp_path / "sft" / "model"), test)
    print(f"toy test accuracy (colour, box, count): {before:.2f} -> {after:.2f}")
    assert before < 0.1 and after >= 0.6
