"""demo.py at a reduced size: every stage runs, and the outputs hold finite numbers."""

import json
import math
import os

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


def test_quick_demo_writes_the_table_and_the_curves(tmp_path):
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--quick"])
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["warm-up only", "SFT", "GRPO", "SFT -> GRPO", "SFT on hesitant -> GRPO"]
    assert all("grpo" in results[a] for a in ("GRPO", "SFT -> GRPO", "SFT on hesitant -> GRPO"))
    values = list(numbers(results))
    assert values and all(math.isfinite(v) for v in values)
    table = (out / "results.md").read_text()
    assert table.count("\n| ") >= 5 and "distinct/G at end" in table
    assert os.path.getsize(out / "reward_curves.png") > 1000
    for f in ("sft.jsonl", "rl.jsonl", "summary.json"):  # the data recipe ran
        assert (out / "data" / "final" / f).exists()
