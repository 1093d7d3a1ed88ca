"""The README's examples run as written."""

import re
from pathlib import Path

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


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
