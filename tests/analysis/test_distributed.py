"""Two gloo processes give the single-process HVP and m-sharpness."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from analysis import HessianOperator, m_sharpness
from tests.analysis._models import batches, mlp

CE = nn.CrossEntropyLoss()
SIZES = (7, 5, 8, 6, 3)


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, data = mlp(bn=True), batches(SIZES)
        H = HessianOperator(model, CE, data, distributed=True)
        v = torch.linspace(-1, 1, H.n_params, dtype=torch.float64)
        hv = H.matvec(v)
        s = m_sharpness(model, CE, data, rho=0.05, m=4, steps=2, distributed=True)
        torch.save(
            {"hv": hv, "n": H.n_samples, "s": (s.value, s.stderr, s.n_batches)},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.start_processes(
        _worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    model, data = mlp(bn=True), batches(SIZES)
    H = HessianOperator(model, CE, data)
    ref = H.matvec(torch.linspace(-1, 1, H.n_params, dtype=torch.float64))
    s = m_sharpness(model, CE, data, rho=0.05, m=4, steps=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["hv"], ref, rtol=1e-12, atol=1e-14)
        assert got["n"] == 29
        assert got["s"][2] == s.n_batches == 7
        assert got["s"][0] == pytest.approx(s.value, rel=1e-12)
        assert got["s"][1] == pytest.approx(s.stderr, rel=1e-12)


def test_distributed_flag_without_process_group_is_a_clear_error():
    with pytest.raises(ValueError, match="init_process_group"):
        HessianOperator(mlp(), CE, batches(), distributed=True)
