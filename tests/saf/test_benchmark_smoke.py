"""``benchmarks/train_cost.py`` in a few steps: every row is measured and the store's
memory is what the issue states (the timings themselves are for the benchmark)."""

import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location(
        "train_cost", ROOT / "benchmarks" / "train_cost.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_cost_quick_mode(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "cost.json"
    n = torch.get_num_threads()
    try:
        assert (
            bench.main(["--model", "mlp", "--steps", "4", "--threads", "1", "--json", str(out)])
            == 0
        )
    finally:
        torch.set_num_threads(n)
    res = json.loads(out.read_text())
    assert set(res["ratio_to_sgd"]) == set(bench.METHODS[1:])
    for r in res["ratio_to_sgd"].values():
        assert r["ci95"][0] <= r["median"] <= r["ci95"][1] and r["median"] > 0
    assert res["store_bytes_per_sample_per_class"] == 6  # fp16, lag 3
    assert "MESA EMA copy" in capsys.readouterr().out
