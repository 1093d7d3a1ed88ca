"""DDP under torchrun with 2 CPU processes (gloo): the SAF store is correct across ranks and
the result matches a single-process run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis import safe_torch_load
from saf import TrainConfig, list_checkpoints, read_metrics, train

ARGS = dict(method="saf", model="mlp", limit=256, batch_size=64, epochs=3, lag=1, start_epoch=1)


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _gather_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from saf import SAFLoss, epoch_batches

    n, c = 50, 3
    traj = SAFLoss(n, c, lag=2, start_epoch=0, dtype=torch.float32)  # distributed: auto
    for epoch in range(2):  # same permutation on every rank, each takes batch[rank::world]
        for idx in epoch_batches(n, 8, torch.Generator().manual_seed(epoch), rank, world):
            own = (idx * 10 + epoch).float()[:, None].expand(-1, c).requires_grad_()  # "logits"
            traj(own, idx, epoch)
    torch.save(traj.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_store_gather_two_gloo_processes(tmp_path):
    """Quick: 2 spawned processes; every rank's store ends with every sample's own row."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2)
    for r in range(2):
        s = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        seen = s["epoch_of"][1] == 1  # all but a dropped tail batch (< 2*world samples)
        assert seen.sum() >= 50 - 3
        expect = (torch.arange(50) * 10 + 1).float()
        assert torch.equal(s["logits"][1][seen, 0], expect[seen])


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
@pytest.mark.parametrize("method", ["saf", "mesa"])
def test_ddp_two_cpu_ranks_match_single_process(tmp_path, method):
    """SAF: the store is correct across ranks. MESA: the EMA teacher of the wrapped model
    (eval-mode targets, no BatchNorm in the MLP) matches too."""
    # (an explicit decay: this 12-step run's scaled one is 0, a teacher equal to the student)
    args = {**ARGS, "method": method, **({"ema_decay": 0.5} if method == "mesa" else {})}
    flags = []
    for k, v in args.items():
        flags += [
            f"--{ {'lag': 'saf-lag', 'start_epoch': 'saf-start'}.get(k, k).replace('_', '-') }",
            str(v),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "cli", "train"]
    out = subprocess.run(
        [*cmd, *flags, "--out", str(tmp_path / "ddp"), "--no-progress", "--threads", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    single = train(TrainConfig(**args, out=tmp_path / "one", progress=False, threads=1))

    # Same global batches, gradients averaged over the two halves: equal up to float rounding
    # (tolerance: 1e-5 relative, the sum-order difference of a 64-sample mean in float32).
    for (_, p), (_, q) in zip(
        list_checkpoints(tmp_path / "ddp"), list_checkpoints(single), strict=True
    ):
        a, b = safe_torch_load(p), safe_torch_load(q)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    m_ddp, m_one = read_metrics(tmp_path / "ddp"), read_metrics(single)
    torch.testing.assert_close(
        torch.tensor(m_ddp[["train_ce", "traj_loss", "test_loss"]].values),
        torch.tensor(m_one[["train_ce", "traj_loss", "test_loss"]].values),
        rtol=1e-4, atol=1e-6,
    )  # fmt: skip
    assert m_ddp["traj_loss"].iloc[1:].gt(0).all()
    if method == "mesa":
        e_ddp = safe_torch_load(tmp_path / "ddp" / "state.pt")["ema"]["module"]
        e_one = safe_torch_load(single / "state.pt")["ema"]["module"]
        for k in e_one:
            torch.testing.assert_close(e_ddp[k], e_one[k], rtol=1e-5, atol=1e-6)
        return

    # Rank 0's store holds every sample's own logits of the last epoch, whichever rank saw it.
    s_ddp = safe_torch_load(tmp_path / "ddp" / "state.pt")["store"]
    s_one = safe_torch_load(single / "state.pt")["store"]
    assert (s_ddp["epoch_of"] == ARGS["epochs"] - 1).all()
    torch.testing.assert_close(
        s_ddp["logits"].float(), s_one["logits"].float(), rtol=2e-3, atol=2e-3
    )
