"""vlaa/lora.py by example: the flags, which layers get adapters, the reference with adapters off, the merged
export and the adapter alone, 04 and 05 with --lora-rank (1 vs 2 ranks, resume), and learning on the toy."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, solid_image
from safetensors.torch import load_file
from test_grpo import format_only_sft, grpo_args
from test_sft import colour_sft_data, losses, run_sft, toy_accuracy

import toy
from vlaa import export, lora, qwen, records, training

sft = importlib.import_module("04_sft")
grpo = importlib.import_module("05_grpo")
CPU = torch.device("cpu")


def lora_trainer(model_dir, rank=4, targets=lora.TARGETS):
    """(model, tokenizer, image_processor, params, optimizer) with adapters, as 04 and 05 build them."""
    return training.load_trainable(model_dir, CPU, 1, 1e-3, lora={"rank": rank, "alpha": 2.0 * rank, "dropout": 0.0,
                                                                  "targets": targets.split(","), "base": model_dir})


def perturb_adapters(model, seed=1):
    """B starts at zero (the adapted model computes as its base); give every adapter a random B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def colour_batch(tok, ip):
    ex = [qwen.encode_example(tok, ip, "What colour is the square?", solid_image(56, c), response=r)
          for c, r in (((220, 40, 40), "<answer>red</answer>"), ((40, 70, 220), "It is blue"))]
    return qwen.collate(ex, tok.pad_token_id, label_examples=True)


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


# ---- flags ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage, extra, why", [
    ("04", ["--lora-alpha", "16"], "--lora-alpha needs --lora-rank"),
    ("04", ["--save-adapter"], "--save-adapter needs --lora-rank"),
    ("05", ["--lora-dropout", "0.1"], "--lora-dropout needs --lora-rank"),
    ("04", ["--lora-rank", "8", "--train-vision"], "--train-vision with --lora-rank"),
    ("05", ["--lora-rank", "8", "--ref-offload"], "--ref-offload with --lora-rank"),
    ("05", ["--lora-rank", "8", "--lora-targets", ","], "--lora-targets names no layer"),
    ("04", ["--lora-rank", "-1"], "argument --lora-rank: must be an integer >= 0"),
])
def test_lora_flags_are_checked_before_any_model_loads(tmp_path, capsys, stage, extra, why):
    main = sft.main if stage == "04" else grpo.main
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "d.jsonl"), "--out",
              str(tmp_path / "o"), *extra])
    assert e.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("targets, unknown", [("qkv", "qkv"), ("q_proj,lm_head,proj", "lm_head,proj")])
def test_unknown_targets_name_the_language_models_layers(tiny_model_dir, targets, unknown):
    # `qkv` and `proj` are the vision tower's attention layers (never adapted), lm_head is outside the body
    with pytest.raises(SystemExit, match=rf"--lora-targets {unknown}: no linear layer .*\(it has: down_proj, "
                                         r"gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj\)"):
        lora_trainer(tiny_model_dir, targets=targets)


# ---- adapters: where, what trains -----------------------------------------------------------------


def test_adapters_sit_on_the_language_models_linear_layers_only_and_only_they_train(tiny_model_dir):
    model, _, _, params, opt = lora_trainer(tiny_model_dir)
    layers = len(model.model.language_model.layers)
    adapted = sorted(lora.adapter_layers(model))
    expected = sorted(f"model.language_model.layers.{i}.{kind}.{name}" for i in range(layers) for kind, names in
                      (("self_attn", "q_proj k_proj v_proj o_proj"), ("mlp", "gate_proj up_proj down_proj"))
                      for name in names.split())
    assert adapted == expected and layers == 2
    # the vision tower has gate_proj/up_proj/down_proj too: a bare name list would have adapted them
    vision_names = {n.rpartition(".")[2] for n, m in model.model.visual.named_modules()
                    if isinstance(m, torch.nn.Linear)}
    assert {"gate_proj", "up_proj", "down_proj"} <= vision_names
    trains = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trains and all(lora.is_adapter(n) for n in trains) and len(trains) == 2 * len(expected)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params} == \
        {id(p) for n, p in model.named_parameters() if lora.is_adapter(n)}
    # the same targets on every rank and rerun: the init draws from its own seeded generator
    again = lora_trainer(tiny_model_dir)[0]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_reference_with_adapters_off_is_the_base_model(tiny_model_dir, tiny):
    base, tok, ip = tiny
    model = lora_trainer(tiny_model_dir)[0]
    batch = colour_batch(tok, ip)
    assert torch.equal(logits(model, batch), logits(base, batch))  # B = 0: the adapted model starts as its base
    perturb_adapters(model)
    assert not torch.allclose(logits(model, batch), logits(base, batch), atol=1e-3)
    with lora.disabled(model):
        assert torch.equal(logits(model, batch), logits(base, batch))
    assert all(p.requires_grad for n, p in model.named_parameters() if lora.is_adapter(n))  # back on, training
    assert not torch.allclose(logits(model, batch), logits(base, batch), atol=1e-3)


def test_merged_export_and_adapter_alone_compute_as_the_policy(tmp_path, tiny_model_dir, tiny):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    _, tok, ip = tiny
    model = lora_trainer(tiny_model_dir)[0].eval()
    perturb_adapters(model)
    batch = colour_batch(tok, ip)
    export.export_hf(model, tok, ip, str(tmp_path / "model"), adapter=str(tmp_path / "adapter"))
    names = load_file(str(tmp_path / "model" / "model.safetensors")).keys()
    assert not [n for n in names if "lora_" in n or "base_layer" in n]  # base names, as any checkpoint
    assert names == load_file(os.path.join(tiny_model_dir, "model.safetensors")).keys()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "model").eval()
    assert (logits(merged, batch) - logits(model, batch)).abs().max() < 1e-5
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert torch.equal(logits(peft_model, batch), logits(model, batch))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8.0, tiny_model_dir)


# ---- 04 and 05 with --lora-rank -------------------------------------------------------------------


def test_sft_with_lora_two_ranks_equal_one_and_checkpoints_hold_the_adapters(tmp_path, tiny_model_dir):
    data = colour_sft_data(str(tmp_path / "d"))
    common = ["--model", tiny_model_dir, "--data", data, "--global-batch", 16, "--micro-batch", 4, "--lr", 2e-2,
              "--max-steps", 4, "--lora-rank", 4, "--save-adapter"]
    run_sft(*common, "--out", tmp_path / "one")
    run_sft(*common, "--out", tmp_path / "two", nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one[-1] < one[0] and max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # (FSDP2's export adds the tied lm_head)
    base = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    changed = {k for k in a if not torch.equal(a[k], base[k])}  # the merged export moved only adapted weights
    assert changed and all(k.endswith("_proj.weight") and "visual" not in k for k in changed)
    for run, world in (("one", 1), ("two", 2)):
        ckpt = tmp_path / run / "checkpoints" / "ckpt-4"
        for r in range(world):
            model_keys = [k for k in load_file(str(ckpt / f"rank-{r}.safetensors")) if k.startswith("model/")]
            assert len(model_keys) == 28 and all(".lora_" in k for k in model_keys)  # 2 layers x 7 x (A, B)
        assert (tmp_path / run / "adapter" / "adapter_model.safetensors").exists()


def test_sft_with_lora_resumes_exactly_and_other_lora_flags_are_another_run(tmp_path, tiny_model_dir):
    data = colour_sft_data(str(tmp_path / "d"))
    common = ["--model", tiny_model_dir, "--data", data, "--global-batch", 8, "--micro-batch", 8, "--lr", 1e-2,
              "--min-lr", 1e-2, "--warmup-ratio", 0, "--lora-rank", 4, "--lora-dropout", 0.1]  # dropout: RNG too
    run_sft(*common, "--out", tmp_path / "straight", "--max-steps", 6)
    run_sft(*common, "--out", tmp_path / "halves", "--max-steps", 3)
    r = run_sft(*common, "--out", tmp_path / "halves", "--max-steps", 6, "--resume")
    assert "ckpt-3" in r.stdout
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "halves" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert losses(tmp_path / "straight") == losses(tmp_path / "halves")
    with pytest.raises(SystemExit, match=r"holds a different run(.|\n)*flags.lora_rank: 4 there, 8 now"):
        sft.main([str(c) for c in common[:-4]] + ["--lora-rank", "8", "--lora-dropout", "0.1", "--out",
                                                  str(tmp_path / "halves"), "--max-steps", "8", "--resume"])


def test_grpo_with_lora_under_torchrun_the_reference_is_the_start_model(tmp_path, format_start, colour_data):
    """Two ranks, FSDP2: the reference is the policy with its adapters off, so the KL is exactly 0 before the
    first update (B = 0) and above 0 after; the adapters are checkpointed, the merged export loads."""
    args = grpo_args(format_start, colour_data, tmp_path / "run", "--max-steps", 3, "--kl-coef", 0.01,
                     "--lora-rank", 4, "--lr", 2e-2)
    args[args.index("--rollout-batch") + 1] = "8"
    args[args.index("--train-batch") + 1] = "32"  # one update a step: step 1's policy is still the start model
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "05_grpo.py", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    kl = [json.loads(line)["kl"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert kl[0] == 0.0 and kl[-1] > 0, kl
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "model")


def test_grpo_with_lora_resumes_exactly(tmp_path, format_start, colour_data):
    common = grpo_args(format_start, colour_data, "OUT", "--kl-coef", 0.01, "--kl-target", 0.001, "--lora-rank", 4,
                       "--lr", 2e-2, "--min-lr", 2e-2)

    def run(out, *extra):
        args = list(common)
        args[args.index("OUT")] = str(out)
        grpo.main(args + [str(e) for e in extra])

    run(tmp_path / "straight", "--max-steps", 4)
    run(tmp_path / "halves", "--max-steps", 2)
    run(tmp_path / "halves", "--max-steps", 4, "--resume")
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "halves" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight, halves = (losses_of(tmp_path / r, "kl") for r in ("straight", "halves"))
    assert straight == halves and straight[0] == 0.0 and straight[-1] > 0


def losses_of(out, key):
    return [json.loads(line)[key] for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("colour"))
    toy.make_data(out, n=256, test_n=32, seed=0, kinds="colour")
    return os.path.join(out, "train.jsonl")


@pytest.fixture(scope="module")
def format_start(tmp_path_factory, tiny_model_dir, colour_data):
    """A start whose completions answer with random letters, so rewards (and advantages) vary within a group."""
    return format_only_sft(tiny_model_dir, colour_data, tmp_path_factory.mktemp("format"), steps=100)


# ---- learning on the toy (slow) -------------------------------------------------------------------


@pytest.mark.slow
def test_lora_sft_learns_the_toy(tmp_path, tiny_model_dir):
    """test_sft's learning test with adapters of rank 16 instead of every weight, at 1.5x its LR (1e-2 diverged)."""
    caption, distill, verify = (importlib.import_module(m) for m in ("01_caption", "02_distill", "03_rewrite_verify"))
    data = tmp_path / "data"
    toy.make_data(str(data), n=1500, test_n=150, seed=0, kinds="colour,box,count")
    caption.main(["--in", str(data / "train.jsonl"), "--out", str(tmp_path / "cap.jsonl"), "--backend", "toy",
                  "--model", "captioner"])
    distill.main(["--in", str(tmp_path / "cap.jsonl"), "--out", str(tmp_path / "dist.jsonl"), "--backend", "toy",
                  "--model", "reasoner:error_rate=0,hesitation_rate=0"])
    verify.main(["--in", str(tmp_path / "dist.jsonl"), "--out", str(tmp_path / "final")])
    test = records.load_records(str(data / "test.jsonl"))
    before = toy_accuracy(tiny_model_dir, test)
    sft.main(["--model", tiny_model_dir, "--data", str(tmp_path / "final" / "sft.jsonl"), "--out",
              str(tmp_path / "sft"), "--global-batch", "32", "--micro-batch", "32", "--lr", "3e-3", "--min-lr", "3e-3",
              "--warmup-ratio", "0", "--max-steps", "500", "--save-every", "100000", "--lora-rank", "16"])
    after = toy_accuracy(str(tmp_path / "sft" / "model"), test)
    print(f"LoRA SFT toy test accuracy (colour, box, count): {before:.2f} -> {after:.2f}")
    assert before < 0.1 and after >= 0.6


@pytest.mark.slow
def test_lora_grpo_learns_the_colour_question_from_a_format_only_start(tmp_path, tiny_model_dir, colour_data):
    """test_grpo's learning test, the policy's adapters (rank 16) trained instead of its weights, at 2x its LR
    (1e-2 collapsed to reward 0). It learns more slowly than full fine-tuning (+0.7 in 150 steps there)."""
    start = format_only_sft(tiny_model_dir, colour_data, tmp_path / "sft", steps=100)
    out = tmp_path / "grpo"
    args = grpo_args(start, colour_data, out, "--max-steps", 150, "--kl-coef", 0, "--lora-rank", 16)
    for flag, value in (("--rollout-batch", "8"), ("--group-size", "8"), ("--train-batch", "64"),
                        ("--micro-batch", "64"), ("--lr", "2e-3"), ("--min-lr", "2e-3")):
        args[args.index(flag) + 1] = value
    grpo.main(args)
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    first = sum(m["reward"] for m in metrics[:25]) / 25
    last = sum(m["reward"] for m in metrics[-25:]) / 25
    print(f"LoRA colour GRPO: mean reward {first:.3f} (steps 1-25) -> {last:.3f} (steps 126-150)")
    assert metrics[0]["no_answer_share"] < 0.5 and last - first >= 0.1
