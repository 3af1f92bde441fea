"""vlaa/lora.py by example: the flags, which layers get adapters, the reference with adapters off, the merged
export and the adapter alone (on each family), 04 and 05 with --lora-rank (04 on each family; 1 vs 2 ranks,
resume), and learning on the toy."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import FAMILY_FIXTURES, ROOT, solid_image
from safetensors.torch import load_file, save_file
from test_grpo import format_only_sft, grpo_args, straight_and_resumed
from test_sft import colour_sft_data, losses, run_sft, teacher_sft_data, toy_accuracy

import toy
from vlaa import export, lora, qwen, training, vision

sft = importlib.import_module("04_sft")
grpo = importlib.import_module("05_grpo")
CPU = torch.device("cpu")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(params=list(FAMILY_FIXTURES))
def family(request):
    """(family, tiny model folder, (model, tokenizer, image_processor)) of each family in turn."""
    folder, loaded = FAMILY_FIXTURES[request.param]
    return request.param, request.getfixturevalue(folder), request.getfixturevalue(loaded)


def lora_trainer(model_dir, rank=4, targets=lora.TARGETS, world=1):
    """(model, tokenizer, image_processor, params, optimizer) with adapters, as 04 and 05 build them."""
    return training.load_trainable(model_dir, CPU, world, 1e-3, lora={"rank": rank, "alpha": 2.0 * rank, "dropout": 0.0,
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


@pytest.mark.parametrize("targets, unknown", [("qkv", "qkv"), ("q_proj,lm_head,proj", "lm_head,proj"),
                                              ("q_proj,in_proj_qkv", "in_proj_qkv")])
def test_unknown_targets_name_the_language_models_layers(tiny_model_dir, targets, unknown):
    # `qkv` and `proj` are the vision tower's attention layers (never adapted), lm_head is outside the body,
    # in_proj_qkv is Qwen3.5's delta-net projection (test below): a name is never silently skipped
    with pytest.raises(SystemExit, match=rf"--lora-targets {unknown}: no linear layer .*\(it has: down_proj, "
                                         r"gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj\)"):
        lora_trainer(tiny_model_dir, targets=targets)


# ---- adapters: where, what trains -----------------------------------------------------------------


def test_adapters_sit_on_the_language_models_linear_layers_only_and_only_they_train(family):
    name, model_dir, _ = family
    model, _, _, params, opt = lora_trainer(model_dir)
    layers = model.model.language_model.layers
    adapted = sorted(lora.adapter_layers(model))
    # Qwen3.5's layer 0 is a gated delta-net (linear_attn: in_proj_qkv, ..., out_proj), no self_attn: there the
    # defaults adapt the MLP only
    expected = sorted(f"model.language_model.layers.{i}.{kind}.{n}" for i, layer in enumerate(layers)
                      for kind, names in (("self_attn", "q_proj k_proj v_proj o_proj"),
                                          ("mlp", "gate_proj up_proj down_proj"))
                      if hasattr(layer, kind) for n in names.split())
    assert adapted == expected and len(layers) == 2 and len(expected) == (10 if name == "qwen3.5" else 14)
    # Qwen2.5-VL's vision tower has gate_proj/up_proj/down_proj too: a bare name list would have adapted them
    vision_names = {n.rpartition(".")[2] for n, m in model.model.visual.named_modules()
                    if isinstance(m, torch.nn.Linear)}
    assert vision_names & set(lora.TARGETS.split(",")) == \
        ({"gate_proj", "up_proj", "down_proj"} if name == "qwen2.5-vl" else set())
    trains = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trains and all(lora.is_adapter(n) for n in trains) and len(trains) == 2 * len(expected)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params} == \
        {id(p) for n, p in model.named_parameters() if lora.is_adapter(n)}
    # the same targets on every rank and rerun: the init draws from its own seeded generator
    again = lora_trainer(model_dir)[0]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_qwen35_delta_net_projections_are_adapted_when_named(tiny_qwen35_dir):
    model = lora_trainer(tiny_qwen35_dir, targets="in_proj_qkv,in_proj_z,out_proj")[0]
    assert sorted(lora.adapter_layers(model)) == [f"model.language_model.layers.0.linear_attn.{n}" for n in
                                                  ("in_proj_qkv", "in_proj_z", "out_proj")]


def test_reference_with_adapters_off_is_the_base_model(family):
    _, model_dir, (base, tok, ip) = family
    model = lora_trainer(model_dir)[0]
    batch = colour_batch(tok, ip)
    assert torch.equal(logits(model, batch), logits(base, batch))  # B = 0: the adapted model starts as its base
    perturb_adapters(model)
    assert not torch.allclose(logits(model, batch), logits(base, batch), atol=1e-3)
    with lora.disabled(model):
        assert torch.equal(logits(model, batch), logits(base, batch))
    assert all(p.requires_grad for n, p in model.named_parameters() if lora.is_adapter(n))  # back on, training
    assert not torch.allclose(logits(model, batch), logits(base, batch), atol=1e-3)


def test_merged_export_and_adapter_alone_compute_as_the_policy(tmp_path, family):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    _, tiny_model_dir, (_, tok, ip) = family
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
    assert_only_adapted_weights_moved(tmp_path / "one", tiny_model_dir)
    for run, world in (("one", 1), ("two", 2)):
        ckpt = tmp_path / run / "checkpoints" / "ckpt-4"
        for r in range(world):
            model_keys = [k for k in load_file(str(ckpt / f"rank-{r}.safetensors")) if k.startswith("model/")]
            assert len(model_keys) == 28 and all(".lora_" in k for k in model_keys)  # 2 layers x 7 x (A, B)
        assert (tmp_path / run / "adapter" / "adapter_model.safetensors").exists()


def assert_only_adapted_weights_moved(out, model_dir):
    """The merged export of a LoRA run differs from its base in the language model's adapted weights only."""
    a = load_file(os.path.join(out, "model", "model.safetensors"))
    base = load_file(os.path.join(model_dir, "model.safetensors"))
    changed = {k for k in a if not torch.equal(a[k], base[k])}
    assert changed and all(k.endswith("_proj.weight") and "visual" not in k for k in changed), changed


def test_sft_with_lora_runs_on_each_family(tmp_path, each_model_dir):
    """04 --lora-rank on every family, with no flag but --model: the loss falls, the merged export moves the
    language model's adapted weights only and loads in transformers."""
    from transformers import AutoModelForImageTextToText

    data = colour_sft_data(str(tmp_path / "d"))
    sft.main(["--model", each_model_dir, "--data", data, "--out", str(tmp_path / "run"), "--global-batch", "16",
              "--micro-batch", "16", "--lr", "2e-2", "--max-steps", "4", "--lora-rank", "4"])
    curve = losses(tmp_path / "run")
    assert curve[-1] < curve[0], curve
    assert_only_adapted_weights_moved(tmp_path / "run", each_model_dir)
    AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "model")


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


COLOURS_AND_ANSWERS = [((220, 40, 40), "<answer>red</answer>", "<answer>blue</answer> no, red"),
                       ((40, 70, 220), "It is blue", "<answer>B</answer>"),
                       ((40, 160, 60), "<think> green </think> <answer>green</answer>", "red"),
                       ((230, 210, 40), "yellow", "<answer>yellow</answer> it is yellow, I think")]


def grpo_lora_updates(model_dir, out):
    """05's update_policy, twice, on the policy with adapters: fixed completions (4 prompts x 2, of different
    lengths), each update's 4 rows split over the ranks, as 2 micro-batches on each (FSDP2 reduces on the last).
    KL to the reference (the policy with its adapters off) is in the loss. SGD, not 05's AdamW: its step is the
    gradient itself, so a wrong reduction over ranks (a missing sum, a factor 2) shows in the weights; AdamW's
    first step is sign(gradient), blind to a factor. Rank 0 writes the adapters after, grad norms, loss stats."""
    env = training.init_distributed()
    rank, world = env["rank"], env["world"]
    args = grpo.p.parse_args(["--model", model_dir, "--data", "-", "--out", out, "--grad-clip", "1e6"])
    model, tok, ip, params, _ = lora_trainer(model_dir, world=world)
    optimizer = torch.optim.SGD(params, lr=0.5)
    encode = qwen.prompt_encoder(tok, ip, qwen.SYSTEM_PROMPT, model=model)
    prompts = [encode({"id": str(i), "question": "What colour is the square?", "image": solid_image(56, c)})
               for i, (c, _, _) in enumerate(COLOURS_AND_ANSWERS)]
    ids = [tok(t + "<|im_end|>", add_special_tokens=False)["input_ids"] for _, *ts in COLOURS_AND_ANSWERS for t in ts]
    comp = torch.full((len(ids), max(map(len, ids))), tok.pad_token_id)  # [8, T], right-padded
    for i, t in enumerate(ids):
        comp[i, :len(t)] = torch.tensor(t)
    mask = (torch.arange(comp.shape[1]) < torch.tensor(list(map(len, ids)))[:, None]).long()  # [8, T]
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0]), 2)
    features = vision.image_features(model, prompts)
    updates = [[0, 3, 4, 6], [5, 1, 7, 2]]  # each update's rows; rank r holds half r of each
    mine = [u[rank * 4 // world:(rank + 1) * 4 // world] for u in updates]
    micro = [[tuple(m[:len(m) // 2]), tuple(m[len(m) // 2:])] for m in mine]  # 2 micro-batches per update
    inputs = {rows: grpo.sequence_batch(prompts, list(rows), 2, comp, mask, tok.pad_token_id, features)
              for ms in micro for rows in ms}
    vision_ids = qwen.vision_token_ids(model.config)
    with lora.disabled(model):
        ref_logp = grpo.frozen_logprobs(model, inputs, comp, args.temperature, vision_ids, CPU)
    old_logp = grpo.frozen_logprobs(model, inputs, comp, args.temperature, vision_ids, CPU)
    grad_norms, stats = [], []
    for ms in micro:
        st, _, norm = grpo.update_policy(model, optimizer, params, ms, inputs, comp, mask.float(), adv, old_logp,
                                         ref_logp, None, 0.1, args, vision_ids, world, CPU)
        tok_n = sum(s["tokens"] for s in st)
        stats.append(training.reduce_metrics({k: (sum(s[k] * s["tokens"] for s in st) / tok_n, tok_n)
                                              for k in ("kl", "ratio", "clip_frac")}, {}, world))
        grad_norms.append(norm)
    adapters = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().contiguous()
                for n, p in model.named_parameters() if lora.is_adapter(n)}
    if env["master"]:
        save_file(adapters, os.path.join(out, f"adapters-{world}.safetensors"))
        with open(os.path.join(out, f"stats-{world}.json"), "w") as f:
            json.dump({"grad_norms": grad_norms, "stats": stats}, f)


GRPO_LORA_UPDATES = """import sys
sys.path[:0] = [{here!r}, {root!r}]
from test_lora import grpo_lora_updates
grpo_lora_updates(*sys.argv[1:])
"""


def test_grpo_lora_update_on_two_ranks_equals_one_rank(tmp_path, tiny_model_dir):
    """05's update with adapters under torchrun (FSDP2, gloo): the adapters after two updates, their grad norms
    and the loss stats (token means over ranks) equal one rank's on the same completions."""
    grpo_lora_updates(tiny_model_dir, str(tmp_path))
    script = tmp_path / "updates.py"
    script.write_text(GRPO_LORA_UPDATES.format(here=HERE, root=ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                        tiny_model_dir, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (load_file(str(tmp_path / f"adapters-{w}.safetensors")) for w in (1, 2))
    start = {n: p.detach() for n, p in lora_trainer(tiny_model_dir)[0].named_parameters() if lora.is_adapter(n)}
    moved = max(float((one[n] - start[n]).abs().max()) for n in one)
    gap = max(float((one[n] - two[n]).abs().max()) for n in one)
    s1, s2 = (json.loads((tmp_path / f"stats-{w}.json").read_text()) for w in (1, 2))
    print(f"adapters moved up to {moved:.3g}; 1 vs 2 ranks: {gap:.3g}; {s1} vs {s2}")
    assert one.keys() == two.keys() == start.keys() and moved > 1e-2 and gap < 1e-6
    assert s1["grad_norms"] == pytest.approx(s2["grad_norms"], rel=1e-5)
    first, second = s1["stats"]  # the first update starts at the reference and the sampling policy
    assert (first["kl"], first["ratio"]) == (0.0, 1.0) and second["kl"] > 0 and second["ratio"] != 1.0
    for a, b in zip(s1["stats"], s2["stats"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


def test_grpo_with_lora_resumes_exactly(tmp_path, format_start, colour_data):
    a, b = straight_and_resumed(tmp_path, grpo_args(format_start, colour_data, "OUT", "--kl-coef", 0.01,
                                                    "--kl-target", 0.001, "--lora-rank", 4, "--lr", 2e-2,
                                                    "--min-lr", 2e-2))
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
    sft_data, test = teacher_sft_data(tmp_path)
    before = toy_accuracy(tiny_model_dir, test)
    sft.main(["--model", tiny_model_dir, "--data", sft_data, "--out",
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
