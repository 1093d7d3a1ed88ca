"""``saf surface``: bad grids exit 2 writing nothing; every direction kind; resume; endpoints."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape as L
from cli import main
from saf.data import data_batches
from saf.runs import model_from_run, save_checkpoint, write_run

RUN = {
    "method": "sgd",
    "model": {"name": "resnet_small", "kwargs": {"width": 4}},
    "data": {"name": "digits", "num_classes": 10, "in_shape": [1, 8, 8]},
    "seed": 0,
    "hparams": {},
}


def _run_dir(path, seed):
    """A run directory with 4 checkpoints along a made-up trajectory (no training)."""
    torch.manual_seed(seed)
    model = model_from_run(RUN)
    write_run(path, RUN)
    for epoch in range(4):
        save_checkpoint(path, epoch, model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
            for name, b in model.named_buffers():
                if "running_var" in name:
                    b.mul_(1.2)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return _run_dir(root / "sgd-s0", 0), _run_dir(root / "saf-s0", 1)


@pytest.mark.parametrize("grid", ["-1:1:0", "a:b:c", "nan:1:3", "1:-1:5", "-1:1", "0:inf:3"])
def test_malformed_grid_exits_2_one_line_nothing_written(tmp_path, runs, capsys, grid):
    out = tmp_path / "out"
    assert main(["surface", str(runs[0]), "--grid", grid, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--grid" in err[0]
    assert not out.exists()


def test_not_a_run_dir_exits_2(tmp_path, capsys):
    assert main(["surface", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a run of `saf train`; give --model" in capsys.readouterr().err


def _surface_cmd(target, out, *extra):
    return ["surface", str(target), "--grid", "-1:1:3", "--n-samples", "40", "--no-progress",
            "--out", str(out), *extra]  # fmt: skip


def test_random_compare_writes_plots_and_resumes(tmp_path, runs, capsys):
    out = tmp_path / "o"
    assert main(_surface_cmd(runs[0], out, "--compare", str(runs[1]), "--log")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"sgd-s0_e3_random_2d", "saf-s0_e3_random_2d"}
    for kind in ("contour", "filled", "heatmap", "3d"):
        assert (out / f"compare_{kind}.png").is_file() and (out / f"compare_{kind}.pdf").is_file()
    assert (out / "compare.html").stat().st_size > 1_000_000
    s = L.Surface.load(out / "sgd-s0_e3_random_2d.npz")
    assert s.complete and s.loss.shape == (3, 3) and s.metadata["directions"] == "random"
    # the same command again evaluates nothing new
    assert main(_surface_cmd(runs[0], out, "--compare", str(runs[1]), "--no-plots")) == 0
    assert L.Surface.load(out / "sgd-s0_e3_random_2d.npz").metadata["evaluated_points"] == 0


def _loss(state, n=40):
    model = model_from_run(RUN)
    model.load_state_dict(state)
    model.eval()
    data = data_batches("digits", "train", 512, n)
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) * len(y) for x, y in data) / n


def test_interpolate_endpoints_are_the_two_runs(tmp_path, runs, capsys):
    out = tmp_path / "o"
    cmd = _surface_cmd(runs[0], out, "--directions", "interpolate", "--dim", "1")
    assert main([*cmd, "--grid", "0:1:3", "--compare", str(runs[1])]) == 0
    s = L.Surface.load(out / "sgd-s0_e3_interpolate_1d.npz")
    last = [torch.load(r / "checkpoints" / "epoch_0003.pt", weights_only=True) for r in runs]
    np.testing.assert_allclose(s.loss[[0, 2]], [_loss(last[0]), _loss(last[1])], rtol=1e-5)
    assert (out / "sgd-s0_e3_interpolate_1d_line.png").is_file()


def test_pca_and_checkpoint_target(tmp_path, runs, capsys):
    out = tmp_path / "o"
    ckpt = runs[0] / "checkpoints" / "epoch_0002.pt"
    assert main(_surface_cmd(ckpt, out, "--directions", "pca")) == 0
    pca = json.loads((out / "sgd-s0_e2_pca_2d_pca.json").read_text())
    assert len(pca["coords"]) == 3 and sum(pca["explained_variance_ratio"]) <= 1 + 1e-9
    assert np.allclose(pca["coords"][-1], 0)  # the checkpoint itself is the origin
    assert (out / "sgd-s0_e2_pca_2d_trajectory.png").is_file()
    s = L.Surface.load(out / "sgd-s0_e2_pca_2d.npz")
    np.testing.assert_allclose(s.loss[1, 1], _loss(torch.load(ckpt, weights_only=True)), rtol=1e-5)


@pytest.mark.slow
def test_torchrun_two_ranks_equals_single_process(tmp_path, runs):
    """``torchrun --nproc_per_node 2 -m cli surface ...`` (gloo) == one process."""
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not found next to the Python executable")
    cmd = _surface_cmd(runs[0], tmp_path / "dist", "--no-plots")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "cli", *cmd],
                       capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_surface_cmd(runs[0], tmp_path / "one", "--no-plots")) == 0
    finally:
        torch.set_num_threads(threads)
    a = L.Surface.load(tmp_path / "dist" / "sgd-s0_e3_random_2d.npz")
    b = L.Surface.load(tmp_path / "one" / "sgd-s0_e3_random_2d.npz")
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-6)
    assert a.complete and not list((tmp_path / "dist").glob("*.rank*"))


@pytest.mark.slow  # Lanczos on a CNN: ~1 min on 2 shared cores; quick variant in test_directions
def test_hessian_directions_1d(tmp_path, runs, capsys):
    out = tmp_path / "o"
    cmd = _surface_cmd(runs[0], out, "--directions", "hessian", "--dim", "1", "--no-plots")
    assert main(cmd) == 0
    assert "top Hessian eigenvalues" in capsys.readouterr().err
    s = L.Surface.load(out / "sgd-s0_e3_hessian_1d.npz")
    last = torch.load(runs[0] / "checkpoints" / "epoch_0003.pt", weights_only=True)
    np.testing.assert_allclose(s.loss[1], _loss(last), rtol=1e-5)
    assert s.metadata["direction_norms"] == pytest.approx([1.0])  # unit eigenvector


def test_target_se_from_the_command_line(tmp_path, runs, capsys):
    out = tmp_path / "o"
    cmd = ["surface", str(runs[0]), "--dim", "1", "--grid", "-1:1:5", "--n-samples", "400",
           "--batch-size", "25", "--target-se", "0.05", "--no-progress", "--no-plots",
           "--out", str(out)]  # fmt: skip
    assert main(cmd) == 0
    summary = json.loads(capsys.readouterr().out)["sgd-s0_e3_random_1d"]
    s = L.Surface.load(out / "sgd-s0_e3_random_1d.npz")
    assert ((s.loss_se <= 0.05) | (s.samples == 400)).all()
    assert summary["mean_samples"] == pytest.approx(float(s.samples.mean()))
    assert summary["centre_loss_se"] == pytest.approx(float(s.loss_se[2]))
    assert s.metadata["target_se"] == 0.05
    assert main([*cmd[:-2], "--target-se", "0", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_trainer_checkpoint_folders_name_their_step(tmp_path, capsys):
    """A Trainer ``checkpoint-N/`` has a step but no epoch: the files carry ``_stepN_``."""
    from tests.reliability._factory import tiny_mlp

    root = tmp_path / "trainer"
    for step in (500, 1000):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        torch.manual_seed(step)
        torch.save(tiny_mlp().state_dict(), root / f"checkpoint-{step}" / "pytorch_model.bin")
    own = ["--model", "tests.reliability._factory:tiny_mlp", "--data", "digits", "--no-plots"]
    assert main(_surface_cmd(root, tmp_path / "o", *own)) == 0  # the last: checkpoint-1000
    assert main(_surface_cmd(root / "checkpoint-500", tmp_path / "o", *own)) == 0
    names = sorted(p.name for p in (tmp_path / "o").glob("*.npz"))
    assert names == ["checkpoint-500_step500_random_2d.npz", "trainer_step1000_random_2d.npz"]
    assert "None" not in capsys.readouterr().out
