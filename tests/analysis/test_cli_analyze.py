"""`saf analyze` on a run directory of `saf train` and on a foreign folder."""

import sys

import pandas as pd
import pytest
import torch
from torch import nn

from analysis import atomic_torch_save
from cli import main
from saf.runs import save_checkpoint, write_run


def _run_dir(tmp_path, epochs=(0, 1, 2)):
    run = tmp_path / "run"
    write_run(
        run,
        {
            "method": "sgd",
            "seed": 0,
            "hparams": {},
            "model": {"name": "mlp", "kwargs": {"width": 8, "depth": 1}},
            "data": {"name": "digits", "num_classes": 10, "in_shape": [1, 8, 8]},
        },
    )
    from saf.runs import model_from_run

    for e in epochs:
        torch.manual_seed(e)
        save_checkpoint(run, e, model_from_run(run))
    return run


def test_run_directory_end_to_end(tmp_path, capsys):
    run = _run_dir(tmp_path)
    code = main(
        [
            "analyze",
            str(run),
            "--metrics",
            "loss,lambda_2,sam_sharpness",
            "--n-samples",
            "60",
            "--batch-size",
            "32",
            "--no-progress",
        ]
    )
    assert code == 0
    df = pd.read_csv(run / "analysis.csv")
    assert len(df) == 3 * 4 and (df.status == "ok").all()
    assert list(df.epoch.unique()) == [0, 1, 2]
    assert "wrote" in capsys.readouterr().out
    # cross-check one value against the library on the same model and data
    from analysis import hessian_eigenvalues
    from analysis.io import load_state_dict
    from saf.data import data_batches
    from saf.runs import model_from_run

    model = model_from_run(run)
    model.load_state_dict(load_state_dict(run / "checkpoints" / "epoch_0001.pt"))
    ev = hessian_eigenvalues(
        model, nn.CrossEntropyLoss(), data_batches("digits", limit=60, batch_size=32), k=2
    )
    got = df[(df.epoch == 1)].set_index("metric").value
    assert got["lambda_max"] == pytest.approx(float(ev.values[0]), rel=1e-4)
    assert got["lambda_2"] == pytest.approx(float(ev.values[1]), rel=1e-3)


def make_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 10, (20,), generator=g))]


def test_foreign_folder_with_a_skip_exits_3(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ckpts"
    for e in (3, 6):
        torch.manual_seed(e)
        atomic_torch_save({"model": make_net().state_dict()}, folder / f"net-{e}.pth")
    (folder / "net-9.pth").write_bytes(b"junk")
    monkeypatch.setitem(sys.modules, "clitestmod", sys.modules[__name__])
    out = tmp_path / "t.csv"
    code = main(
        [
            "analyze",
            str(folder),
            "--model",
            "clitestmod:make_net",
            "--data",
            "clitestmod:batches",
            "--metrics",
            "loss,trace",
            "--out",
            str(out),
            "--epoch-regex",
            r"net-(\d+)",
            "--no-progress",
        ]
    )
    assert code == 3
    err = capsys.readouterr().err
    assert "net-9.pth" in err
    df = pd.read_csv(out)
    assert list(df[df.status == "ok"].epoch.unique()) == [3, 6]
    # digits by name on a foreign folder works too
    assert (
        main(
            [
                "analyze",
                str(folder),
                "--model",
                "clitestmod:make_net",
                "--data",
                "digits",
                "--n-samples",
                "40",
                "--metrics",
                "loss",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 3
    )


@pytest.mark.parametrize(
    "extra, match",
    [
        ([], "not a run directory"),
        (["--model", "nosuchmod:f", "--data", "digits"], "cannot import"),
        (["--model", "bad", "--data", "digits"], "package.module:name"),
        (["--model", "clitestmod:make_net", "--data", "nope"], "unknown data set"),
        (
            ["--model", "clitestmod:make_net", "--data", "digits", "--metrics", "foo"],
            "unknown metric",
        ),
        (["--model", "clitestmod:make_net", "--data", "digits", "--lambda-se", "1"], "--lambda-se"),
        (
            [
                "--model",
                "clitestmod:make_net",
                "--data",
                "digits",
                "--n-samples",
                "64",
                "--lambda-se",
                "8",
            ],
            "--lambda-se 8 needs at least that many batches",
        ),  # fmt: skip
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, extra, match):
    monkeypatch.setitem(sys.modules, "clitestmod", sys.modules[__name__])
    folder = tmp_path / "c"
    atomic_torch_save(make_net().state_dict(), folder / "e1.pt")
    assert main(["analyze", str(folder), *extra, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and "Traceback" not in err
