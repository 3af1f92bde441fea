"""demo.py at a reduced size: every stage runs from the shipped base, two seeds give a mean and a spread."""

import importlib.util
import json
import math
import os

import pytest

import demo


def numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def test_quick_demo_with_two_seeds_writes_the_table_the_comparisons_and_the_curves(tmp_path):
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--quick", "--seeds", "2"])
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == 2 and list(results["arms"]) == demo.ARMS
    assert all(len(runs) == 2 for runs in results["arms"].values())
    assert all("grpo" in run for arm in ("GRPO", "SFT -> GRPO", "SFT on hesitant -> GRPO")
               for run in results["arms"][arm])
    values = [v for v in numbers(results["arms"]) if not math.isnan(v)]  # nan: a type the 16 questions lack
    assert values and all(math.isfinite(v) for v in values)
    md = (out / "results.md").read_text()
    assert md.count("\n| ") >= 5 and "distinct/G at end" in md and " ± " in md
    assert "- SFT -> GRPO vs GRPO: accuracy" in md and "- GRPO from the base: training reward" in md
    assert "Conclusion (2 seeds, mean ± sample sd;" in md and "questions scored of 16" in md
    if importlib.util.find_spec("matplotlib"):  # the `plot` extra
        assert os.path.getsize(out / "reward_curves.png") > 10_000
    for f in ("sft.jsonl", "rl.jsonl", "summary.json"):  # the data recipe ran
        assert (out / "data" / "final" / f).exists()


def test_build_base_writes_a_checkpoint(tmp_path):
    demo.main(["--build-base", "--quick", "--out", str(tmp_path / "base")])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "base"))
    assert not os.path.exists(tmp_path / "base.build")  # the scratch folder is gone


def test_without_a_base_the_quick_demo_builds_a_stand_in_in_its_own_folder(tmp_path):
    demo.main(["--out", str(tmp_path / "demo"), "--quick", "--base", str(tmp_path / "missing")])
    assert (tmp_path / "demo" / "base" / "config.json").exists() and not (tmp_path / "missing").exists()
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["seeds"] == 1


def test_the_shipped_base_is_the_one_the_demo_uses():
    assert os.path.exists(os.path.join(demo.BASE, "model.safetensors"))
    assert os.path.getsize(os.path.join(demo.BASE, "model.safetensors")) < 5_000_000  # a few MB at most


def test_the_demo_never_empties_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="notes.txt"):
        demo.main(["--out", str(tmp_path), "--quick"])
    with pytest.raises(SystemExit, match="notes.txt"):
        demo.main(["--build-base", "--quick", "--out", str(tmp_path)])
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_cell_is_the_mean_and_the_sample_spread():
    assert demo.show([0.5, 0.7]) == "0.60 ± 0.14"
    assert demo.show([0.25]) == "0.25"  # one seed: no spread
    assert demo.show([0.1, 0.3], "{:.0f}", 100) == "20 ± 14"


def fake_results(acc, seeds=3):
    """demo.main's results for given accuracies per arm ({arm: [one per seed]}), the rest constant."""
    def run(a, grpo):
        r = {"scores": {"metrics": {"accuracy": a}, "trace": {"mean_words": 15.0, "aha": 0.0, "no_answer": 0.0}}}
        return r | ({"grpo": {"reward_first": 0.4, "reward_last": 0.5, "distinct_last": 4.0}} if grpo else {})
    return {arm: [run(acc[arm][k], "GRPO" in arm) for k in range(seeds)] for arm in demo.ARMS}


@pytest.mark.parametrize("sft_grpo,words", [
    ([0.50, 0.51, 0.52], "ends below GRPO alone: -0.090 (beyond the spread, sd 0.010 and 0.010). So this toy "
                         "reproduces the paper's"),
    ([0.70, 0.71, 0.72], "ends above GRPO alone: +0.110 (beyond the spread, sd 0.010 and 0.010). So this toy "
                         "does not reproduce the paper's"),
    ([0.58, 0.61, 0.64], "ends level with GRPO alone: +0.010 (within the spread, sd 0.030 and 0.010). So this toy "
                         "does not reproduce the paper's")])
def test_the_conclusion_follows_the_numbers_and_their_spread(sft_grpo, words):
    acc = {"base": [0.5] * 3, "GRPO": [0.59, 0.60, 0.61], "SFT": [0.7] * 3, "SFT -> GRPO": sft_grpo,
           "SFT on hesitant": [0.5] * 3, "SFT on hesitant -> GRPO": [0.6] * 3}
    text = demo.conclusion(fake_results(acc))
    assert text.startswith("Conclusion (3 seeds, mean ± sample sd;") and words in text
    assert "training reward by +0.100 ± 0.000 (more than twice its spread)" in text


def test_one_seed_tells_only_the_direction():
    acc = {arm: [0.6] for arm in demo.ARMS} | {"SFT -> GRPO": [0.7]}
    text = demo.conclusion(fake_results(acc, seeds=1))
    assert "ends above GRPO alone: +0.100 (one seed: no spread)" in text and "--seeds 3" in text
