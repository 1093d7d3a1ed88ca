"""One torch thread for the trainer tests: tiny models on a shared 2-core machine run
several times faster without intra-op thread contention (restored after each test)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
