"""`saf train` does what it says: one regression test per trap a new user fell into."""

import importlib
import json

import pytest

from analysis import safe_torch_load
from saf import list_checkpoints, read_metrics
from tests.reliability.conftest import files_under, run_cli

TINY = ["--model", "mlp", "--limit", "64", "--batch-size", "32", "--no-progress"]


def _hp(run):
    return json.loads((run / "run.json").read_text())["hparams"]


def test_short_run_scales_lag_and_start_so_saf_is_not_sgd(tmp_path, capsys):
    """`--epochs 3` once gave bitwise SGD: E_start stayed 5. Now it is the paper's 5 of 200
    epochs scaled to the run (1), and the trajectory loss is on from there."""
    rc, _, err = run_cli(capsys, ["train", *TINY, "--epochs", "3", "--out", tmp_path / "r"])
    assert rc == 0, err
    hp = _hp(tmp_path / "r")
    assert (hp["lag"], hp["start_epoch"]) == (1, 1)
    assert read_metrics(tmp_path / "r")["traj_loss"].iloc[1:].gt(0).all()


def test_a_trajectory_loss_that_never_switches_on_is_refused(tmp_path, capsys):
    argv = ["train", *TINY, "--epochs", "3", "--saf-start", "5", "--out", tmp_path / "r"]
    rc, _, err = run_cli(capsys, argv)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "never switch on" in err, err
    assert not (tmp_path / "r").exists()


def test_resume_extends_with_epochs_and_refuses_other_flags(tmp_path, capsys):
    run = tmp_path / "r"
    assert run_cli(capsys, ["train", *TINY, "--epochs", "2", "--out", run])[0] == 0
    before = files_under(run)
    for flag in (["--lr", "0.1"], ["--method", "sam"], ["--seed", "3"]):
        rc, _, err = run_cli(capsys, ["train", "--resume", run, *flag, "--no-progress"])
        assert rc == 2 and len(err.strip().splitlines()) == 1 and flag[0] in err, err
        assert files_under(run) == before
    rc, _, err = run_cli(capsys, ["train", "--resume", run, "--epochs", "4", "--no-progress"])
    assert rc == 0, err
    assert list(read_metrics(run)["epoch"]) == [1, 2, 3, 4]
    assert json.loads((run / "run.json").read_text())["config"]["epochs"] == 2  # as it began


def test_optimizer_options_are_applied_and_recorded(tmp_path, capsys):
    argv = ["train", *TINY, "--method", "sgd", "--epochs", "4", "--optimizer", "adamw",
            "--lr", "0.003", "--label-smoothing", "0.1", "--clip-grad", "1.0",
            "--save-every", "3", "--out", tmp_path / "r"]  # fmt: skip
    rc, _, err = run_cli(capsys, argv)
    assert rc == 0, err
    hp = _hp(tmp_path / "r")
    assert hp["optimizer"] == "adamw" and hp["betas"] == [0.9, 0.999]
    assert hp["decay_norm_bias"] is False and hp["momentum"] is None
    assert (hp["label_smoothing"], hp["clip_grad"]) == (0.1, 1.0)
    assert [e for e, _ in list_checkpoints(tmp_path / "r")] == [0, 3, 4]
    groups = safe_torch_load(tmp_path / "r" / "state.pt")["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 5e-4]  # biases: no decay


def test_amp_and_augment_record_what_was_applied(tmp_path, capsys):
    rc, _, err = run_cli(
        capsys, ["train", *TINY, "--epochs", "2", "--amp", "--out", tmp_path / "r"]
    )
    assert rc == 0, err
    hp = _hp(tmp_path / "r")
    assert hp["amp"] == "bf16"  # applied on the CPU too
    assert hp["augment"] is False  # digits has no augmentation


@pytest.mark.parametrize("dev", ["meta", "mps", "cuda:7", "nonsense"])
def test_a_device_that_cannot_run_is_one_line_and_nothing_written(tmp_path, capsys, dev):
    rc, _, err = run_cli(capsys, ["train", *TINY, "--device", dev, "--out", tmp_path / "r"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_own_model_and_data_by_module_path(tmp_path, capsys):
    run = tmp_path / "r"
    own = ["--model", "tests.saf._custom:make_net", "--data", "tests.saf._custom:blobs"]
    argv = ["train", *own, "--batch-size", "32", "--epochs", "3", "--no-progress", "--out", run]
    rc, _, err = run_cli(capsys, argv)
    assert rc == 0, err
    info = json.loads((run / "run.json").read_text())
    assert info["model"]["name"] == "tests.saf._custom:make_net"
    assert (info["data"]["num_classes"], info["data"]["in_shape"]) == (3, [5])
    ce = read_metrics(run)["train_ce"]
    assert ce.iloc[-1] < ce.iloc[0]  # it learns from the blobs
    # run.json names the code but never imports it: resuming needs the command line again
    rc, _, err = run_cli(capsys, ["train", "--resume", run, "--epochs", "4", "--no-progress"])
    assert rc == 2 and "--model tests.saf._custom:make_net" in err, err
    rc, _, err = run_cli(capsys, ["train", "--resume", run, *own, "--epochs", "4", "--no-progress"])
    assert rc == 0, err
    assert len(read_metrics(run)) == 4


def test_asam_scales_the_weights_only_with_the_papers_eta(tmp_path, capsys):
    rc, _, err = run_cli(capsys, ["train", *TINY, "--method", "asam", "--epochs", "1",
                                  "--out", tmp_path / "r"])  # fmt: skip
    assert rc == 0, err
    groups = safe_torch_load(tmp_path / "r" / "state.pt")["optimizer"]["param_groups"]
    flags = sorted((g["adaptive"], g.get("eta", 0.0), g["rho"]) for g in groups)
    assert flags == [(False, 0.0, 0.5), (True, 0.01, 0.5)]


def test_a_batch_too_small_for_the_ranks_and_sync_bn_on_cpu_are_refused(tmp_path, monkeypatch):
    """Under torchrun with 2 ranks, batch 1 once crashed rank 1 (an empty half)."""
    T = importlib.import_module("saf.train")  # the module (saf.train is also the function)
    monkeypatch.setattr(T, "init_from_env", lambda device: (0, 2))
    base = dict(method="sgd", model="mlp", limit=64, epochs=1, progress=False)
    with pytest.raises(ValueError, match="at least 4"):
        T.train(T.TrainConfig(**base, batch_size=3, out=tmp_path / "a"))
    with pytest.raises(ValueError, match="sync-bn needs CUDA"):
        T.train(T.TrainConfig(**base, batch_size=8, sync_bn=True, out=tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_nesterov_is_applied(tmp_path, capsys):
    argv = [
        "train",
        *TINY,
        "--method",
        "sgd",
        "--epochs",
        "1",
        "--nesterov",
        "--out",
        tmp_path / "r",
    ]
    assert run_cli(capsys, argv)[0] == 0
    groups = safe_torch_load(tmp_path / "r" / "state.pt")["optimizer"]["param_groups"]
    assert all(g["nesterov"] for g in groups) and _hp(tmp_path / "r")["nesterov"] is True
