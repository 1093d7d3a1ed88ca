"""The README's examples run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def _python_blocks(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_own_loop_examples_run_and_train():
    """SAF, MESA and SAM in a plain loop: the block runs, and each method moves the loss."""
    (block,) = _python_blocks(_section("Use SAF in your own loop"))
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)  # noqa: S102  (our own README)
    saf_loss = ns["saf_loss"]
    assert (saf_loss.store.epoch_of >= 0).all()  # every sample's logits were stored
    assert ns["mesa"].ema.module is not ns["model"]
    assert float(ns["loss"]) > 0
    assert ns["scaler"].get_scale() > 0 and not ns["sam"]._perturbed()  # the AMP loop ended


def test_lightning_and_hugging_face_examples_run_and_train(tmp_path, monkeypatch):
    """The Lightning and ``SAFTrainer`` recipes, after the own loop's block (their data)."""
    import pytest

    pytest.importorskip("lightning", reason="Lightning is an optional extra")
    pytest.importorskip("transformers", reason="transformers is an optional extra")
    monkeypatch.chdir(tmp_path)  # both write checkpoints under the working directory
    (loop,) = _python_blocks(_section("Use SAF in your own loop"))
    lightning, hugging_face = _python_blocks(_section("Lightning and the Hugging Face Trainer"))
    ns: dict = {}
    for code in (loop, lightning, hugging_face):
        exec(compile(code, "README.md", "exec"), ns)  # noqa: S102  (our own README)
    for store in (ns["net"].saf.store, ns["trainer"].trajectory.store):
        assert (store.epoch_of == 2).all()  # every sample stored in the last epoch, 0..2
    assert list(tmp_path.rglob("checkpoints/*.ckpt")) and list(tmp_path.glob("out/checkpoint-*"))
    assert all((d / "saf_state.pt").is_file() for d in tmp_path.glob("out/checkpoint-*"))


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 320


def test_own_model_examples_run_as_written(tmp_path, monkeypatch):
    """`mymodels.py`, the Python example and the two command lines, in a fresh folder."""
    import shlex
    import sys

    import pandas as pd

    from cli import main

    section = _section("Measure and look")
    mymodels, usage = _python_blocks(section)
    bash = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[-1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    (tmp_path / "mymodels.py").write_text(mymodels)
    ns: dict = {}
    exec(compile(usage, "README.md", "exec"), ns)  # noqa: S102  (our own README)
    assert ns["top"].values[0] > 0 and ns["trace"].value > 0
    assert (tmp_path / "regressor.png").is_file() and (tmp_path / "regressor.pdf").is_file()
    for line in bash.strip().splitlines():
        assert main([*shlex.split(line)[1:], "--no-progress"]) == 0, line
    table = pd.read_csv(tmp_path / "t.csv")
    assert (
        set(table.epoch) == {1, 2}
        and table.status.isin(["ok", "n/a: targets are not class labels"]).all()
    )
    assert list((tmp_path / "surf").glob("*.npz"))


def test_the_monitor_example_runs_as_written(tmp_path, monkeypatch):
    """The monitor block: five measured rows, each with lambda_max beside 2(1+beta)/eta."""
    import pandas as pd

    (block,) = _python_blocks(_section("Sharpness during training"))
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102  (our own README)
    rows = pd.read_csv(tmp_path / "sharpness.csv")
    assert (
        list(rows.step) == [10, 20, 30, 40, 50] and (rows.filter(like="lambda").gt(0)).all().all()
    )
    assert rows.filter(like="threshold").iloc[0].max() == pytest.approx(2 * 1.9 / 0.5)
