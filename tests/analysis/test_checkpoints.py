"""analyze_run on foreign checkpoint folders: values against oracles, skips, cache, resume."""

import dataclasses
import io
import json
import os

import pandas as pd
import pytest
import torch
from torch import nn

import analysis._checkpoints as ck
from analysis import (
    AnalysisSettings,
    analyze_run,
    atomic_torch_save,
    epoch_from_name,
    sam_sharpness,
)
from tests.analysis._models import batches, dense_hessian, mlp

CE = nn.CrossEntropyLoss()


def _folder(tmp_path, n=3):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for e in range(n):
        sd = mlp(seed=e).state_dict()
        wrap = [sd, {"state_dict": sd, "epoch": e}, {"model": sd}][e % 3]
        atomic_torch_save(wrap, folder / f"epoch_{e}.{'pth' if e == 1 else 'pt'}")
    return folder


SETTINGS = {f.name for f in dataclasses.fields(AnalysisSettings)}


def _run(folder, **kw):
    """analyze_run with test defaults; AnalysisSettings fields may be given as keywords."""
    settings = AnalysisSettings(**{k: kw.pop(k) for k in list(kw) if k in SETTINGS})
    kw = {"model_factory": mlp, "data": batches(), "progress": False, "log": io.StringIO()} | kw
    return analyze_run(folder, settings=settings, **kw)


def test_values_match_the_oracles(tmp_path):
    folder = _folder(tmp_path, n=2)
    df = _run(
        folder,
        metrics=["loss", "accuracy", "lambda_2", "trace", "sam_sharpness"],
        tol=1e-10,
        trace_matvecs=159,
    )
    assert list(df.columns) == list(ck.COLUMNS)
    assert (df.status == "ok").all() and len(df) == 2 * 6
    assert (folder / "analysis.csv").is_file()
    assert pd.read_csv(folder / "analysis.csv").shape == df.shape
    data = batches()
    X, Y = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    for e in range(2):
        model = mlp(seed=e).eval()
        rows = df[df.epoch == e].set_index("metric")
        assert rows.loc["loss", "value"] == pytest.approx(float(CE(model(X), Y)), rel=1e-12)
        acc = float((model(X).argmax(1) == Y).double().mean())
        assert rows.loc["accuracy", "value"] == pytest.approx(acc)
        H = dense_hessian(model, CE, data)
        ev = torch.linalg.eigvalsh(H)
        assert rows.loc["lambda_max", "value"] == pytest.approx(float(ev[-1]), rel=1e-6)
        assert rows.loc["lambda_2", "value"] == pytest.approx(float(ev[-2]), rel=1e-6)
        assert rows.loc["trace", "value"] == pytest.approx(float(H.trace()), rel=1e-8)
        s = sam_sharpness(model, CE, data)
        assert rows.loc["sam_sharpness", "value"] == pytest.approx(s.value, rel=1e-12)
        assert rows.loc["sam_sharpness", "rho"] == 0.05


def test_m_sharpness_columns_and_every(tmp_path):
    folder = _folder(tmp_path, n=4)
    df = _run(folder, metrics=["m_sharpness"], m=5, rho=0.1, steps=2, every=2, out=False)
    assert list(df.epoch) == [0, 2] and set(df.metric) == {"m_sharpness"}
    assert (df.m == 5).all() and (df.rho == 0.1).all() and (df.steps == 2).all()
    assert (df.kind == "worst").all()
    assert not (folder / "analysis.csv").exists()


def test_epochs_keeps_only_those_checkpoints(tmp_path):
    folder = _folder(tmp_path, n=4)
    df = _run(folder, metrics=["loss"], epochs=[1, 3, 7], out=False)
    assert list(df.epoch) == [1, 3]  # epoch 7 has no checkpoint: nothing to keep
    both = _run(folder, metrics=["loss"], epochs=[1, 2, 3], every=2, out=False)
    assert list(both.epoch) == [2]


def test_bad_checkpoints_are_named_skipped_and_the_rest_analysed(tmp_path):
    folder = _folder(tmp_path)
    (folder / "epoch_7.pt").write_bytes(b"\x00garbage")
    full = io.BytesIO()
    torch.save(mlp().state_dict(), full)
    (folder / "epoch_8.pt").write_bytes(full.getvalue()[:100])  # truncated
    atomic_torch_save(nn.Linear(2, 2).double().state_dict(), folder / "epoch_9.pt")  # mismatch

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Evil()}, folder / "epoch_10.pt")
    log = io.StringIO()
    df = _run(folder, metrics=["loss"], log=log)
    assert not (tmp_path / "pwned").exists()
    ok = df[df.status == "ok"]
    assert list(ok.epoch) == [0, 1, 2]
    skipped = dict(df.attrs["skipped"])
    assert set(skipped) == {"epoch_7.pt", "epoch_8.pt", "epoch_9.pt", "epoch_10.pt"}
    assert "refused" in skipped["epoch_10.pt"] and "does not match" in skipped["epoch_9.pt"]
    for name in skipped:
        assert f"skipped {name}:" in log.getvalue()
    assert df[df.status != "ok"].value.isna().all()


def test_nan_weights_give_nan_rows_not_a_crash(tmp_path):
    folder = _folder(tmp_path, n=1)
    sd = mlp().state_dict()
    sd["0.weight"][0, 0] = float("nan")
    atomic_torch_save(sd, folder / "epoch_5.pt")
    df = _run(folder, metrics=["loss", "lambda_max", "sam_sharpness"])
    bad = df[df.epoch == 5]
    assert len(bad) == 3 and bad.value.isna().all() and (bad.status == "nonfinite weights").all()
    assert df[df.epoch == 0].value.notna().all()


def test_rerun_reuses_cache_and_resumes_after_a_crash(tmp_path, monkeypatch):
    folder = _folder(tmp_path)
    real = ck._compute
    calls = []

    def crashing(key, *a):
        calls.append(key)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the process dies in the middle of checkpoint 2
        return real(key, *a)

    monkeypatch.setattr(ck, "_compute", crashing)
    with pytest.raises(KeyboardInterrupt):
        _run(folder, metrics=["loss", "lambda_max", "trace"])
    assert not (folder / "analysis.csv").exists()
    calls.clear()
    monkeypatch.setattr(ck, "_compute", lambda key, *a: calls.append(key) or real(key, *a))
    first = _run(folder, metrics=["loss", "lambda_max", "trace"])
    assert calls == ["lambda", "trace", "loss", "lambda", "trace"]  # only what was missing
    calls.clear()
    again = _run(folder, metrics=["loss", "lambda_max", "trace"])
    assert calls == [] and again.equals(first)
    _run(folder, metrics=["loss", "lambda_max", "trace"], seed=1)  # new settings: recompute
    assert len(calls) == 9


def test_changed_checkpoint_content_is_recomputed(tmp_path):
    folder = _folder(tmp_path, n=1)
    a = _run(folder, metrics=["loss"])
    atomic_torch_save(mlp(seed=5).state_dict(), folder / "epoch_0.pt")
    b = _run(folder, metrics=["loss"])
    assert a.value[0] != b.value[0]


def test_run_directory_and_safetensors(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_file(mlp().state_dict(), str(run / "checkpoints" / "epoch=3-step=30.safetensors"))
    df = _run(run, metrics=["loss"])
    assert list(df.checkpoint) == ["epoch=3-step=30.safetensors"] and df.epoch[0] == 3
    assert (run / "analysis.csv").is_file()


def test_input_validation(tmp_path):
    with pytest.raises(ValueError, match="unknown metric"):
        _run(_folder(tmp_path), metrics=["sharpness"])
    with pytest.raises(ValueError, match="no checkpoint"):
        _run(tmp_path / "ckpts" / ".." / "ckpts" if False else tmp_path, metrics=["loss"])
    with pytest.raises(ValueError, match="kind must be"):
        AnalysisSettings(kind="best")
    with pytest.raises(ValueError, match="tol must be"):
        AnalysisSettings(tol=float("nan"))
    assert epoch_from_name("a1-ep22.pt") == 22 and epoch_from_name("x.pt") is None


def test_lambda_k_expands_to_the_top_k_rows_in_order(tmp_path):
    df = _run(_folder(tmp_path, n=1), metrics=["lambda_3", "loss", "lambda_max"], out=False)
    assert list(df.metric) == ["lambda_max", "lambda_2", "lambda_3", "loss"]
    lam = df.set_index("metric").value
    assert lam["lambda_max"] >= lam["lambda_2"] >= lam["lambda_3"]
    assert df.stderr.isna().all()  # nothing here is stochastic


_CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from analysis import analyze_run
from tests.analysis._models import batches, mlp
from analysis import AnalysisSettings
analyze_run({folder!r}, ["loss", "lambda_max", "trace"], model_factory=mlp, data=batches(),
            progress=False, settings=AnalysisSettings(trace_matvecs=12))
"""


def test_sigkill_midway_then_rerun_gives_the_uninterrupted_table(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    folder = _folder(tmp_path, n=4)
    root = str(Path(__file__).resolve().parents[2])
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=root, folder=str(folder))])
    cache = folder / ".analysis.csv.cache"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("*.json"))) < 1:
        time.sleep(0.001)  # poll often: the kill must land before the last file
    child.send_signal(signal.SIGKILL)
    child.wait()
    done_before = {p.name: p.read_text() for p in cache.glob("*.json")}
    assert 1 <= len(done_before) < 4, "the kill should land midway"
    for text in done_before.values():
        json.loads(text)  # every cache file is whole
    resumed = _run(folder, metrics=["loss", "lambda_max", "trace"], trace_matvecs=12)
    fresh = _run(folder, metrics=["loss", "lambda_max", "trace"], trace_matvecs=12, out=False)
    pd.testing.assert_frame_equal(resumed, fresh)
    assert pd.read_csv(folder / "analysis.csv").shape == fresh.shape


def _trajectory(tmp_path, n=6, lr=0.05):
    """Checkpoints of one model along a few SGD steps each: consecutive epochs are close."""
    folder = tmp_path / "traj"
    folder.mkdir()
    model, data = mlp(seed=3), batches()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for e in range(n):
        atomic_torch_save(model.state_dict(), folder / f"epoch_{e}.pt")
        for x, y in data:
            opt.zero_grad()
            CE(model(x), y).backward()
            opt.step()
    return folder


def test_warm_started_lanczos_agrees_with_cold_and_with_the_dense_spectrum(tmp_path):
    folder, tol = _trajectory(tmp_path), 1e-6
    cold = _run(folder, metrics=["lambda_2"], tol=tol, out=tmp_path / "cold.csv")
    warm = _run(folder, metrics=["lambda_2"], tol=tol, warm_start=True, out=tmp_path / "w.csv")
    assert (cold.warm == "False").all() and list(warm.warm) == ["False"] * 2 + ["True"] * 10
    assert (warm.matvecs > 0).all() and (cold.matvecs > 0).all()
    for e in range(6):
        model = mlp(seed=0)
        model.load_state_dict(torch.load(folder / f"epoch_{e}.pt"))
        ev = torch.linalg.eigvalsh(dense_hessian(model.eval(), CE, batches())).flip(0)
        for table in (cold, warm):
            got = table[table.epoch == e].set_index("metric").value
            for j, name in enumerate(["lambda_max", "lambda_2"]):
                assert abs(got[name] - float(ev[j])) <= tol * abs(float(ev[j]))


def test_warm_start_resumes_bit_for_bit(tmp_path):
    folder = _trajectory(tmp_path)
    whole = _run(folder, metrics=["lambda_max"], tol=1e-8, warm_start=True, out=False)
    out = tmp_path / "t.csv"
    _run(folder, metrics=["lambda_max"], tol=1e-8, warm_start=True, out=out, epochs=[0, 1, 2])
    resumed = _run(folder, metrics=["lambda_max"], tol=1e-8, warm_start=True, out=out)
    pd.testing.assert_frame_equal(resumed, whole)


def test_lambda_rows_carry_the_jackknife_stderr(tmp_path):
    folder = _folder(tmp_path, n=1)
    df = _run(folder, metrics=["lambda_2"], tol=1e-10, lambda_se_groups=3, out=False)
    model, data = mlp(seed=0).eval(), batches()
    loo = torch.stack(
        [
            torch.linalg.eigvalsh(dense_hessian(model, CE, data[:g] + data[g + 1 :])).flip(0)[:2]
            for g in range(3)
        ]
    )
    se = (2 / 3 * ((loo - loo.mean(0)) ** 2).sum(0)).sqrt()
    got = df.set_index("metric").stderr
    assert got["lambda_max"] == pytest.approx(float(se[0]), rel=1e-6)
    assert got["lambda_2"] == pytest.approx(float(se[1]), rel=1e-6)
    # the default key is unchanged by the options added later (old caches stay valid)
    assert "lambda_se_groups" not in AnalysisSettings().key()
    with pytest.raises(ValueError, match="lambda_se_groups"):
        AnalysisSettings(lambda_se_groups=1)
    with pytest.raises(ValueError, match="at least that many batches"):  # before any work
        _run(folder, metrics=["lambda_max"], lambda_se_groups=4, out=tmp_path / "none.csv")
    assert not (tmp_path / "none.csv").exists()
