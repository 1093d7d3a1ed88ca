"""The training loop end to end: SAF(lambda=0) == SGD bitwise, resume bitwise, run directory,
divergence, command-line errors."""

import json

import pytest
import torch

import saf._setup
import saf.methods
from analysis import safe_torch_load
from cli import main
from saf import (
    METRIC_COLUMNS,
    SAFLoss,
    Stepper,
    TrainConfig,
    TrainingDiverged,
    build_model,
    epoch_batches,
    is_run_dir,
    list_checkpoints,
    load_dataset,
    model_from_run,
    read_metrics,
    read_run,
    scaled_ema_decay,
    train,
)

QUICK = dict(limit=256, batch_size=64, epochs=3, lr=0.05, progress=False)


def _weights(run_dir):
    return [safe_torch_load(p) for _, p in list_checkpoints(run_dir)]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def record_batches(monkeypatch):
    seen = []
    orig = saf.methods.Stepper.__call__

    def call(self, x, y, idx, epoch, weight=1.0):
        seen.append((self.method, idx.clone()))
        return orig(self, x, y, idx, epoch, weight)

    monkeypatch.setattr(saf.methods.Stepper, "__call__", call)
    return seen


def test_saf_with_lambda_zero_is_sgd_bitwise_and_same_data_order(tmp_path, record_batches):
    a = train(TrainConfig(method="sgd", out=tmp_path / "sgd", **QUICK))
    b = train(
        TrainConfig(method="saf", lam=0.0, start_epoch=0, lag=1, out=tmp_path / "saf", **QUICK)
    )
    wa, wb = _weights(a), _weights(b)
    assert len(wa) == len(wb) == 4
    assert all(_same(x, y) for x, y in zip(wa, wb, strict=True))  # every epoch, bitwise
    assert not _same(wa[0], wa[-1])
    order = {m: [i for mm, i in record_batches if mm == m] for m in ("sgd", "saf")}
    assert len(order["sgd"]) == 12 and all(map(torch.equal, order["sgd"], order["saf"]))
    assert read_metrics(b)["traj_loss"].eq(0).all()


def test_methods_see_the_same_data_order(tmp_path, record_batches):
    for m in ("sam", "mesa"):
        train(TrainConfig(method=m, out=tmp_path / m, start_epoch=0, **{**QUICK, "epochs": 1}))
    sam, mesa = ([i for mm, i in record_batches if mm == m] for m in ("sam", "mesa"))
    assert len(sam) == 4 and all(map(torch.equal, sam, mesa))


@pytest.mark.parametrize("method", ["saf", "mesa", pytest.param("sam", marks=pytest.mark.slow)])
def test_resume_after_interruption_is_bitwise_equal(tmp_path, monkeypatch, method):
    cfg = dict(method=method, start_epoch=1, lag=1, **{**QUICK, "epochs": 4})
    full = train(TrainConfig(out=tmp_path / "full", **cfg))
    calls, orig = [0], saf.methods.Stepper.__call__

    def interrupt(self, *a):
        calls[0] += 1
        if calls[0] == 10:  # in the middle of epoch 3 (4 steps per epoch)
            raise KeyboardInterrupt
        return orig(self, *a)

    monkeypatch.setattr(saf.methods.Stepper, "__call__", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=tmp_path / "cut", **cfg))
    assert [e for e, _ in list_checkpoints(tmp_path / "cut")] == [0, 1, 2]
    monkeypatch.setattr(saf.methods.Stepper, "__call__", orig)
    cut = train(TrainConfig(out=tmp_path / "cut", progress=False), resume=True)
    assert all(_same(x, y) for x, y in zip(_weights(full), _weights(cut), strict=True))
    cols = [c for c in METRIC_COLUMNS if c not in ("seconds", "images_per_s")]
    assert read_metrics(full)[cols].equals(read_metrics(cut)[cols])
    sf, sc = safe_torch_load(full / "state.pt"), safe_torch_load(cut / "state.pt")
    if method == "saf":
        assert torch.equal(sf["store"]["logits"], sc["store"]["logits"])
    if method == "mesa":
        assert _same(sf["ema"]["module"], sc["ema"]["module"])
    if method != "sam":
        assert read_metrics(cut)["traj_loss"].iloc[1:].gt(0).all()


def test_run_directory_is_self_describing(tmp_path):
    d = train(TrainConfig(method="mesa", out=tmp_path / "r", **{**QUICK, "epochs": 2}))
    assert is_run_dir(d) and not is_run_dir(tmp_path)
    run = read_run(d)
    assert run["method"] == "mesa" and run["seed"] == 0 and run["format"] == "saf-run/1"
    assert run["hparams"]["lam"] == 0.8
    assert run["hparams"]["ema_decay"] == scaled_ema_decay(256 // 64, 2)  # the recorded default
    assert run["data"] == {
        **run["data"],
        "name": "digits",
        "num_classes": 10,
        "in_shape": [1, 8, 8],
    }
    assert {"torch", "numpy"} <= set(run["versions"])
    m = read_metrics(d)
    assert list(m.columns) == list(METRIC_COLUMNS) and m["epoch"].tolist() == [1, 2]
    net = model_from_run(d)
    net.load_state_dict(safe_torch_load(list_checkpoints(d)[-1][1]))  # weights_only load
    state = safe_torch_load(d / "state.pt")
    assert state["epoch"] == 2 and "momentum_buffer" in str(state["optimizer"])
    assert not list(d.rglob("*.tmp"))


def test_existing_run_refused_without_resume(tmp_path):
    train(TrainConfig(method="sgd", out=tmp_path / "r", **{**QUICK, "epochs": 1}))
    with pytest.raises(ValueError, match="--resume"):
        train(TrainConfig(method="sgd", out=tmp_path / "r", **QUICK))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    args = ["train", "--method", "sgd", "--model", "mlp", "--lr", "1e30", "--epochs", "3"]
    rc = main([*args, "--limit", "128", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "diverged" in err
    last = safe_torch_load(out / "state.pt")["epoch"]
    assert last < 3 and [e for e, _ in list_checkpoints(out)] == list(range(last + 1))
    assert str(list_checkpoints(out)[-1][1]) in err
    assert (
        len(read_metrics(out)) == last and read_metrics(out)["test_loss"].map(float).lt(1e38).all()
    )
    with pytest.raises(TrainingDiverged):
        train(TrainConfig(out=out, progress=False), resume=True)


@pytest.mark.parametrize(
    "bad",
    [
        ["--method", "adam"],
        ["--model", "vgg"],
        ["--rho", "-0.1"],
        ["--saf-lambda", "-1"],
        ["--saf-tau", "-5"],
        ["--saf-tau", "0"],
        ["--saf-lag", "0"],
        ["--data-dir", "/no/such/dir"],
        ["--data", "cifar10"],
        ["--model-kwargs", '{"nope": 1}'],
        ["--epochs", "nan"],
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, bad):
    out = tmp_path / "run"
    assert main(["train", *bad, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_train_and_resume(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--method", "saf", "--limit", "128", "--epochs", "2", "--batch-size", "64"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "run.json").read_text())["config"]["limit"] == 128
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0  # nothing left: no-op
    assert len(read_metrics(out)) == 2


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_bitwise(tmp_path):
    """A real `saf train` process killed with SIGKILL after epoch 2, then `--resume`."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["train", "--method", "saf", "--saf-start", "1", "--saf-lag", "1", "--limit", "256"]
    args += ["--batch-size", "64", "--epochs", "5", "--no-progress", "--threads", "1"]
    cmd = [sys.executable, "-m", "cli", *args]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "cut")], env={**os.environ})
    state = tmp_path / "cut" / "state.pt"
    while proc.poll() is None:
        if (tmp_path / "cut" / "checkpoints" / "epoch_0002.pt").exists():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert safe_torch_load(state)["epoch"] in (1, 2)  # checkpoint is written before state.pt
    assert subprocess.run([*cmd[:3], "train", "--resume", str(tmp_path / "cut")]).returncode == 0
    assert all(
        _same(a, b)
        for a, b in zip(_weights(tmp_path / "full"), _weights(tmp_path / "cut"), strict=True)
    )


def test_saf_lambda_zero_equals_sgd_after_every_step():
    """SAF with lambda = 0 reads real stored targets and still steps exactly as SGD."""
    ds, nets, steppers = load_dataset("digits"), [], []
    for method in ("sgd", "saf"):
        torch.manual_seed(0)
        net = build_model("resnet_small", 10, ds.in_shape, width=4)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        traj = SAFLoss(len(ds), 10, lam=0.0, lag=1, start_epoch=0) if method == "saf" else None
        nets.append(net)
        steppers.append(Stepper(method, net, opt, traj))
    for epoch in range(2):  # epoch 1 reads real stored logits
        for idx in epoch_batches(len(ds), 256, torch.Generator().manual_seed(epoch)):
            x, y, i = ds.get_batch(idx)
            assert steppers[1].traj.store.read(i, epoch)[1].all() == (epoch == 1)  # real targets
            ce = [s(x, y, idx, epoch)[0] for s in steppers]
            assert torch.equal(ce[0], ce[1])
            assert _same(nets[0].state_dict(), nets[1].state_dict())


@pytest.mark.parametrize("method", ["saf", "sam"])
def test_track_sharpness_leaves_the_run_bitwise_and_survives_a_resume(
    tmp_path, monkeypatch, method
):
    """--track-sharpness: the checkpoints and metrics of the run without it; a row every 2
    steps whose lambda_max is the dense Hessian's on the probe; after a resume the earlier
    rows are kept and the later ones agree with the uninterrupted run's within the Lanczos
    tolerance (the resumed run starts Lanczos cold once)."""
    import pandas as pd
    import torch.nn.functional as F

    from tests.analysis._models import dense_hessian

    cfg = dict(method=method, start_epoch=1, lag=1, model="mlp", model_kwargs={"width": 16})
    cfg = {**cfg, **QUICK}
    plain = train(TrainConfig(out=tmp_path / "plain", **cfg))
    cfg = {**cfg, "track_sharpness": 2, "probe_samples": 64}
    watched = train(TrainConfig(out=tmp_path / "w", **cfg))
    assert all(_same(x, y) for x, y in zip(_weights(plain), _weights(watched), strict=True))
    cols = [c for c in METRIC_COLUMNS if c not in ("seconds", "images_per_s")]
    assert read_metrics(plain)[cols].equals(read_metrics(watched)[cols])
    rows = pd.read_csv(watched / "sharpness.csv")
    assert list(rows.step) == [2, 4, 6, 8, 10, 12] and rows.threshold.gt(0).all()
    model = model_from_run(watched)
    model.load_state_dict(_weights(watched)[-1])  # the weights after the last step
    model = model.double().eval()
    ds, _ = saf._setup.datasets(TrainConfig(**cfg), "cpu")  # the run's (balanced) train set
    x, y, _ = ds.get_batch(torch.arange(64))  # the probe: its first 64 samples
    top = torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, [(x.double(), y)]))[-1]
    assert rows.lambda_1.iloc[-1] == pytest.approx(float(top), rel=2e-3)  # tol 1e-3
    calls, orig = [0], saf.methods.Stepper.__call__

    def interrupt(self, *a):
        calls[0] += 1
        if calls[0] == 10:  # in epoch 3: the state holds epochs 1-2 (steps 1-8)
            raise KeyboardInterrupt
        return orig(self, *a)

    monkeypatch.setattr(saf.methods.Stepper, "__call__", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=tmp_path / "cut", **cfg))
    monkeypatch.setattr(saf.methods.Stepper, "__call__", orig)
    cut = train(TrainConfig(out=tmp_path / "cut", progress=False), resume=True)
    again = pd.read_csv(cut / "sharpness.csv")
    assert list(again.step) == list(rows.step)
    assert again.lambda_1.iloc[:4].tolist() == rows.lambda_1.iloc[:4].tolist()
    assert again.lambda_1.tolist() == pytest.approx(rows.lambda_1.tolist(), rel=1e-2)
