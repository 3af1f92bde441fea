"""python -m vlaa.compare on run folders it makes itself, written the way 04 and 05 write them: run.json by
vlaa.runs.claim_run with training_identity's fields, metrics.jsonl one line per step."""

import json
import os

import pytest

from vlaa import compare, runs


def make_run(root, name, seed, rewards, loss_agg="seq", model="m", evals=None):
    """A 05-like run folder: identity (stage, model, data, flags) and one metrics line per reward."""
    out = os.path.join(root, name)
    os.makedirs(out)
    flags = {"seed": seed, "loss_agg": loss_agg, "lr": 1e-4}
    runs.claim_run(out, runs.run_identity(stage="05_grpo", model={"path": model}, data={"path": "rl.jsonl"},
                                          flags=flags))
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for step, r in enumerate(rewards, 1):
            f.write(json.dumps({"step": step, "reward": r, **(evals or {}).get(step, {})}) + "\n")
    return out


@pytest.fixture
def ablation(tmp_path):
    """Two configurations x two seeds: seq ends at 0.5 and 0.7 (mean 0.6, sd 0.1414), token at 0.9 and 0.9."""
    return [make_run(tmp_path, "seq-s0", 0, [0.1, 0.3, 0.5], evals={3: {"eval/accuracy": 0.4}}),
            make_run(tmp_path, "seq-s1", 1, [0.3, 0.5, 0.7], evals={3: {"eval/accuracy": 0.6}}),
            make_run(tmp_path, "tok-s0", 0, [0.2, 0.6, 0.9], loss_agg="token", evals={3: {"eval/accuracy": 0.5}}),
            make_run(tmp_path, "tok-s1", 1, [0.4, 0.8, 0.9], loss_agg="token", evals={3: {"eval/accuracy": 0.5}})]


def test_runs_that_differ_only_in_seed_are_one_configuration(ablation):
    groups = compare.group_by_config([compare.read_run(f) for f in ablation])
    assert list(groups) == ["loss_agg=seq", "loss_agg=token"]
    assert [[r["seed"] for r in g] for g in groups.values()] == [[0, 1], [0, 1]]


def test_configurations_that_differ_in_the_model_are_named_by_folder(tmp_path):
    a = make_run(tmp_path, "from-base", 0, [0.1], model="base")
    b = make_run(tmp_path, "from-sft", 0, [0.2], model="sft")
    assert list(compare.group_by_config([compare.read_run(a), compare.read_run(b)])) == ["from-base", "from-sft"]


def test_table_means_spread_seeds_and_the_difference(ablation):
    groups = compare.group_by_config([compare.read_run(f) for f in ablation])
    s = compare.summary(groups, "reward", window=1)
    assert s["loss_agg=seq"] == pytest.approx((0.6, 0.1414214, 2))
    assert s["loss_agg=token"] == pytest.approx((0.9, 0.0, 2))
    text = compare.table(groups, ["reward", "eval/accuracy"], window=1)
    assert "| loss_agg=seq | 2 | 0.6000 ± 0.1414 | 0.5000 ± 0.1414 |" in text
    assert "loss_agg=token minus loss_agg=seq, reward: +0.3000 (exceeds the spread: sd 0.0000 over 2 seed(s)" in text
    assert "loss_agg=token minus loss_agg=seq, eval/accuracy: +0.0000 (within the spread" in text


def test_relative_compares_what_each_run_gained(ablation):
    groups = compare.group_by_config([compare.read_run(f) for f in ablation])
    # seq gains 0.4 in both seeds; token 0.7 and 0.5
    assert compare.summary(groups, "reward", 1, relative=True)["loss_agg=seq"][:2] == pytest.approx((0.4, 0.0))
    assert compare.summary(groups, "reward", 1, relative=True)["loss_agg=token"][:2] == pytest.approx((0.6, 0.1414214))
    assert compare.curve(compare.read_run(ablation[0]), "reward", smooth=2, relative=True) == \
        ([1, 2, 3], pytest.approx([0.0, 0.1, 0.3]))


def test_cli_prints_the_table_and_writes_the_figure(ablation, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "fig.png"
    compare.main([*ablation, "--metric", "reward,eval/accuracy", "--window", "1", "--out", str(png)])
    out = capsys.readouterr().out
    assert "| loss_agg=token | 2 | 0.9000 ± 0.0000 | 0.5000 ± 0.0000 |" in out and f"wrote {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_stop_with_a_message(ablation, tmp_path):
    with pytest.raises(SystemExit, match="no run.json"):
        compare.read_run(str(tmp_path))
    twin = make_run(tmp_path, "seq-s0-again", 0, [0.1, 0.2, 0.3])
    with pytest.raises(SystemExit, match="share a seed"):
        compare.group_by_config([compare.read_run(f) for f in (ablation[0], twin)])
    with pytest.raises(SystemExit, match="no metric 'loss'"):
        compare.main([ablation[0], "--metric", "loss"])


def test_smoothing_averages_over_steps_not_over_evaluations(tmp_path):
    run = compare.read_run(make_run(tmp_path, "r", 0, [0.0, 0.2, 0.4, 0.6],
                                    evals={2: {"eval/accuracy": 0.5}, 4: {"eval/accuracy": 0.7}}))
    assert compare.curve(run, "reward", smooth=2) == ([1, 2, 3, 4], pytest.approx([0.0, 0.1, 0.3, 0.5]))
    assert compare.curve(run, "eval/accuracy", smooth=2) == ([2, 4], pytest.approx([0.5, 0.7]))  # 2 steps apart
