"""Argument plumbing of ``saf figures`` (nothing is trained here)."""

from __future__ import annotations

import json

import pytest

from cli import build_parser, main
from cli._common import UsageError
from cli._figures import build_settings
from figures import Settings
from figures._settings import check_settings
from saf import scaled_hparams


def _settings(*argv):
    return build_settings(build_parser().parse_args(["figures", *argv]))


def test_quick_and_full_defaults():
    q = _settings("--quick", "--out", "x")
    f = _settings("--out", "x")
    assert q.quick and not f.quick and q.epochs < f.epochs
    assert q.seeds == f.seeds == 3
    assert q.methods == f.methods == ("sgd", "sam", "saf", "mesa")


def test_paper_scale_cifar_plumbing(tmp_path):
    s = _settings(
        "--data", "cifar10", "--data-dir", str(tmp_path), "--model", "resnet18", "--out", "x"
    )
    assert (s.data, s.data_dir, s.model, s.epochs, s.batch_size) == (
        "cifar10",
        str(tmp_path),
        "resnet18",
        200,
        128,
    )
    h = scaled_hparams(s.epochs, 391)  # CIFAR-10, batch 128: the paper's own schedule
    assert (h["start_epoch"], h["lag"], h["saf_lambda"], h["tau"]) == (5, 3, 0.3, 5.0)
    assert h["ema_beta"] == pytest.approx(0.9998, abs=1e-6)


def test_cifar_needs_data_dir_and_digits_refuses_it(tmp_path):
    with pytest.raises(UsageError, match="--data-dir"):
        _settings("--data", "cifar100", "--out", "x")
    with pytest.raises(UsageError, match="CIFAR only"):
        _settings("--data-dir", str(tmp_path), "--out", "x")


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["figures", "--out", str(tmp_path), "--seeds", "0"]) == 2
    assert main(["figures", "--out", str(tmp_path), "--methods", "sgd,adam"]) == 2
    assert main(["figures", "--out", str(tmp_path), "--m-values", "4,x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(": error: " in e and e.startswith("saf") for e in err)
    assert "--seeds" in err[0] and "--methods" in err[1] and "--m-values" in err[2]


def test_hidden_options_override(tmp_path):
    s = _settings(
        "--quick", "--out", "x", "--epochs", "2", "--surface-points", "5", "--m-values", "2,8"
    )
    assert (s.epochs, s.surface_points, s.m_values) == (2, 5, (2, 8))


def test_scaled_hparams_short_schedule():
    h = scaled_hparams(30, 23)
    assert h["start_epoch"] == 1 and h["lag"] == 1
    # EMA horizon 1/(1-beta) = 6.4% of the 690 steps
    assert 1 / (1 - h["ema_beta"]) == pytest.approx(0.064 * 30 * 23)


def test_settings_mismatch_refused(tmp_path):
    check_settings(tmp_path, Settings(epochs=5))
    assert json.loads((tmp_path / "settings.json").read_text())["epochs"] == 5
    check_settings(tmp_path, Settings(epochs=5))  # same settings: fine
    with pytest.raises(ValueError, match="epochs"):
        check_settings(tmp_path, Settings(epochs=6))


def _fake_cifar10(root, n=20):
    """A tiny python-format CIFAR-10 folder (random pixels), enough to build configs."""
    import pickle

    import numpy as np

    d = root / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [i % 10 for i in range(n)],
        }
        (d / name).write_bytes(pickle.dumps(batch))
    return root


def test_paper_scale_train_config(tmp_path):
    from figures._stages import train_config

    root = _fake_cifar10(tmp_path)
    s = _settings("--data", "cifar10", "--data-dir", str(root), "--model", "resnet18", "--out", "x")
    cfg = train_config(s, "mesa", 1, tmp_path / "run", "cpu", False).validate()
    assert (cfg.data, cfg.model, cfg.epochs, cfg.batch_size, cfg.lr) == (
        "cifar10",
        "resnet18",
        200,
        128,
        0.1,
    )
    assert (cfg.lam, cfg.start_epoch, cfg.seed, cfg.data_dir) == (0.8, 5, 1, str(root))
    # 100 training images / batch 128 -> 1 step per epoch at most: horizon 6.4% of 200 steps
    assert cfg.ema_decay == pytest.approx(1 - 1 / (0.064 * 200 * 1))
    saf = train_config(s, "saf", 0, tmp_path / "run2", "cpu", False).validate()
    assert (saf.lam, saf.lag, saf.tau, saf.ema_decay) == (0.3, 3, 5.0, None)


def test_cuda_request_without_cuda_is_a_usage_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    argv = ["figures", "--out", str(tmp_path), "--data", "cifar10", "--data-dir", str(tmp_path)]
    assert main([*argv, "--model", "resnet18", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "settings.json").exists()  # nothing was written
