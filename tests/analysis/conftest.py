"""Analysis tests: one intra-op thread (tiny float64 ops are 10x slower with contended threads)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
