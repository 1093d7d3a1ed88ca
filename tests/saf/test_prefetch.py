"""SAF's chunked store traffic (saf._prefetch): same losses, gradients and store as the
step-by-step path, in float64."""

import pytest
import torch

from saf import OutputStore, Stepper
from saf._prefetch import TargetPrefetch

N, C = 11, 3


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, C)
    ).double()


def _run(planned: bool, epochs=4, chunk=2, lr=0.1):
    """Per step: (traj, grads); and the final store. Ragged batches, a skipped sample (so
    masked rows appear ``lag`` epochs later) and chunks that split an epoch unevenly."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 5, dtype=torch.float64, generator=gen), torch.arange(N) % C
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    store = OutputStore(N, C, lag=2, dtype=torch.float64)
    step = Stepper("saf", model, opt, lam=0.3, tau=5.0, start_epoch=1, store=store)
    step.prefetch.chunk = chunk
    out = []
    for epoch in range(epochs):
        perm = torch.randperm(N, generator=gen)
        batches = list(perm[: N - (epoch == 1)].split(3))  # epoch 1 skips one sample
        if planned:
            step.begin_epoch(epoch, batches)
        for idx in batches:
            masked = int((~store.read(idx, epoch)[1]).sum())
            _, traj, _ = step(x[idx], y[idx], idx, epoch)
            out.append((traj, [p.grad.clone() for p in model.parameters()], masked))
        if planned:
            step.end_epoch()  # the announced steps' losses are filled in by now
    return [(float(t), g, m) for t, g, m in out], store


def test_planned_equals_step_by_step_float64():
    ref, ref_store = _run(planned=False)
    got, got_store = _run(planned=True)
    assert sum(t > 0 for t, _, _ in ref) >= 8  # the trajectory loss was active
    # epoch 3 reads epoch 1, which skipped a sample: one step has a masked row among valid ones
    assert [m for _, _, m in ref[-4:]].count(1) == 1
    for (t_ref, g_ref, _), (t_got, g_got, _) in zip(ref, got, strict=True):
        assert t_got == pytest.approx(t_ref, rel=1e-12, abs=1e-15)
        for a, b in zip(g_ref, g_got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)
    assert torch.equal(got_store.epoch_of, ref_store.epoch_of)
    torch.testing.assert_close(got_store.logits, ref_store.logits, rtol=1e-10, atol=1e-12)
    assert (got_store.epoch_of[1] == 3).all() and (got_store.epoch_of[0] == 2).all()


def test_store_traffic_once_per_chunk_and_gather_per_flush():
    store = OutputStore(20, C, lag=1, dtype=torch.float64)
    calls = []

    def gather(idx, z):
        calls.append(idx.clone())
        return idx, z

    pre = TargetPrefetch(store, 5.0, 0.3, chunk=2, gather=gather)
    batches = list(torch.randperm(20).split(4))  # 5 batches: chunks of 2, 2, 1
    for epoch, read in ((0, False), (1, True)):
        calls.clear()
        pre.begin_epoch(epoch, batches, read)
        for idx in batches:
            if read:
                pre.next_target()
            pre.record(idx, torch.full((len(idx), C), float(epoch), dtype=torch.float64))
        pre.flush()
        assert [len(c) for c in calls] == [8, 8, 4]  # one scatter (and gather) per chunk
        assert torch.equal(torch.cat(calls), torch.cat(batches))
        assert (store.epoch_of[0] == epoch).all() and (store.logits[0] == epoch).all()


def test_unannounced_batch_is_refused():
    store = OutputStore(6, C, lag=1, dtype=torch.float64)
    model = _model()
    step = Stepper("saf", model, torch.optim.SGD(model.parameters(), lr=0.1), store=store)
    batches = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])]
    step.begin_epoch(0, batches)
    x, y = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="announced"):
        step(x, y, torch.tensor([0, 1, 2]), 0)  # equal values, but not the announced tensor
    with pytest.raises(ValueError, match="announced"):
        step(x, y, batches[0], 1)  # another epoch
    step(x, y, batches[0], 0)


def test_masked_row_holding_inf_gives_finite_loss_and_zero_gradient():
    """A stale row that overflowed fp16 (inf) is masked: no NaN reaches the step."""
    from saf import trajectory_loss_and_grad
    from saf._prefetch import kl_grad

    store = OutputStore(4, C, lag=1)  # fp16, like the trainer's
    store.write(torch.tensor([0, 1, 2]), torch.randn(3, C), epoch=0)
    store.logits[0, 3] = float("inf")  # row 3 was never written at epoch 0
    pre = TargetPrefetch(store, 5.0, 0.3)
    idx = torch.tensor([3, 0, 2, 1])
    past, mask = store.read(idx, 1)  # before this epoch's writes replace the slot
    assert mask.tolist() == [False, True, True, True] and torch.isinf(past[0]).all()
    pre.begin_epoch(1, [idx], read=True)
    target, loss = pre.next_target()
    z = torch.randn(4, C)
    grad = kl_grad(z, target, 5.0)
    pre.record(idx, z)
    pre.flush()
    want_loss, want_grad = trajectory_loss_and_grad(z, past.float(), 5.0, 0.3, mask)
    assert torch.isfinite(grad).all() and (grad[0] == 0).all()
    torch.testing.assert_close(grad, want_grad)
    torch.testing.assert_close(loss, want_loss)
