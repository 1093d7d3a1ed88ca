"""trajectory_loss vs the formula in float64; OutputStore ring, masking and id alignment."""

import torch
import torch.nn.functional as F

from saf import OutputStore, SAFLoss, Stepper, epoch_batches, load_dataset, trajectory_loss
from saf.data import IndexedDataset


def _oracle(z, zp, tau, lam):
    p, q = torch.softmax(zp / tau, 1), torch.softmax(z / tau, 1)
    return lam * tau**2 * (p * (p.log() - q.log())).sum(1).mean()


def test_trajectory_loss_matches_formula_float64():
    z, zp = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    got = trajectory_loss(z, zp, 3.0, lam=0.3)
    torch.testing.assert_close(got, _oracle(z, zp, 3.0, 0.3), rtol=1e-12, atol=1e-12)


def test_trajectory_gradient_closed_form_and_no_grad_to_target():
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    zp = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    tau, lam = 5.0, 0.8
    trajectory_loss(z, zp, tau, lam).backward()
    # d/dz of lam tau^2 KL(p||softmax(z/tau)) / B = lam tau (softmax(z/tau) - p) / B
    expect = lam * tau * (torch.softmax(z / tau, 1) - torch.softmax(zp / tau, 1)) / 6
    torch.testing.assert_close(z.grad, expect, rtol=1e-10, atol=1e-12)
    assert zp.grad is None


def test_mask_rows_contribute_exactly_zero():
    z, zp = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    mask = torch.tensor([True, False, True, False])
    got = trajectory_loss(z, zp, 2.0, mask=mask)
    expect = _oracle(z[mask], zp[mask], 2.0, 1.0) * 2 / 4  # mean over all 4 rows
    torch.testing.assert_close(got, expect)


def test_closed_form_gradient_equals_autograd_of_the_formula_float64():
    """The oracle: autograd through the plain formula, masked rows left out of the mean."""
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    zp = torch.randn(6, 4, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False, True])
    for m in (None, mask):
        keep = torch.ones(6, dtype=torch.bool) if m is None else m
        p, log_q = torch.softmax(zp / 5.0, 1), torch.log_softmax(z / 5.0, 1)
        kl = (p * (p.log() - log_q)).sum(1)
        ref = 0.8 * 25.0 * torch.where(keep, kl, 0.0).mean()
        (ref_grad,) = torch.autograd.grad(ref, z)
        loss = trajectory_loss(z, zp, 5.0, 0.8, m)
        (grad,) = torch.autograd.grad(loss, z)
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    # A masked row may hold anything (an fp16 overflow, say): it stays out of both.
    zp[1] = float("inf")
    loss_inf = trajectory_loss(z, zp, 5.0, 0.8, mask)
    (grad_inf,) = torch.autograd.grad(loss_inf, z)
    torch.testing.assert_close(loss_inf, loss)
    torch.testing.assert_close(grad_inf, grad)
    assert grad_inf[~mask].eq(0).all()


def test_gradient_follows_the_upstream_scale_and_the_logits_dtype():
    """A GradScaler multiplies the loss: the closed form must scale with it; fp16 logits
    (autocast) get a gradient in their own dtype, computed in float32."""
    z = torch.randn(5, 3, requires_grad=True)
    zp = torch.randn(5, 3)
    (g1,) = torch.autograd.grad(trajectory_loss(z, zp, 5.0, 0.3), z)
    (g8,) = torch.autograd.grad(8.0 * trajectory_loss(z, zp, 5.0, 0.3), z)
    torch.testing.assert_close(g8, 8.0 * g1)
    zh = z.detach().half().requires_grad_(True)
    loss = trajectory_loss(zh, zp.half(), 5.0, 0.3)
    (gh,) = torch.autograd.grad(loss, zh)
    assert loss.dtype == torch.float32 and gh.dtype == torch.float16
    torch.testing.assert_close(gh.float(), g1, rtol=1e-2, atol=1e-4)


def test_stepper_gradient_equals_autograd_of_ce_plus_trajectory_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = model.double()
    x, y, idx = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 2]), torch.arange(4)
    traj = SAFLoss(4, 3, lam=0.3, tau=5.0, lag=1, start_epoch=0, dtype=torch.float64)
    traj.store.write(idx[:3], torch.randn(3, 3, dtype=torch.float64), epoch=0)  # row 3: never
    past, mask = traj.store.read(idx, epoch=1)
    out = model(x)
    ref = F.cross_entropy(out, y) + trajectory_loss(out, past, 5.0, 0.3, mask)
    expect = torch.autograd.grad(ref, list(model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the step leaves the weights alone
    Stepper("saf", model, opt, traj)(x, y, idx, 1)
    for p, e in zip(model.parameters(), expect, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


def test_store_is_lag_slots_fp16_and_reads_epoch_minus_lag():
    n, c, lag = 10, 4, 3
    s = OutputStore(n, c, lag)
    assert s.logits.shape == (lag, n, c) and s.logits.dtype == torch.float16
    assert s.nbytes_per_sample_per_class == 2 * lag == 6
    idx = torch.arange(n)
    for e in range(7):
        past, valid = s.read(idx, e)
        if e < lag:
            assert not valid.any()
        else:  # epoch e - lag wrote value (e - lag) + row id
            assert valid.all()
            torch.testing.assert_close(past[:, 0].float(), (e - lag + idx).float())
        s.write(idx, (e + idx).float()[:, None].expand(n, c), e)


def test_never_written_row_is_masked_not_a_uniform_target():
    s = OutputStore(3, 4, lag=1)
    s.write(torch.tensor([0, 2]), torch.randn(2, 4), epoch=0)  # sample 1 skipped
    z = torch.randn(3, 4, dtype=torch.float64)
    past, valid = s.read(torch.arange(3), epoch=1)
    assert valid.tolist() == [True, False, True]
    got = trajectory_loss(z, past, 5.0, mask=valid)
    # the zero row would be a uniform target and add a positive KL; masked, it adds nothing
    expect = trajectory_loss(z[[0, 2]], past[[0, 2]], 5.0) * 2 / 3
    torch.testing.assert_close(got, expect)
    assert trajectory_loss(z[[1]], torch.zeros(1, 4), 5.0) > 0  # what it would have added


def test_stale_row_from_an_older_epoch_is_masked():
    s = OutputStore(2, 2, lag=2)
    s.write(torch.arange(2), torch.ones(2, 2), epoch=0)
    s.write(torch.tensor([0]), torch.ones(1, 2), epoch=2)  # sample 1 not seen in epoch 2
    _, valid = s.read(torch.arange(2), epoch=4)
    assert valid.tolist() == [True, False]


def test_sample_ids_stay_aligned_under_shuffling():
    """A data set whose input encodes its index, loaded shuffled through the real step:
    every stored row must be the logits of its own sample."""
    n, c = 203, 5
    ds = IndexedDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n) % c, c)
    model = torch.nn.Linear(1, c)
    with torch.no_grad():
        model.weight.copy_(torch.arange(1, c + 1, dtype=torch.float32)[:, None] / 64)
        model.bias.zero_()
    traj = SAFLoss(n, c, lam=0.3, tau=5.0, lag=1, start_epoch=0, dtype=torch.float32)
    store = traj.store
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = Stepper("saf", model, opt, traj)
    gen = torch.Generator().manual_seed(0)
    batches = epoch_batches(n, 16, gen)
    assert not torch.equal(torch.cat(batches), torch.arange(len(torch.cat(batches))))  # shuffled
    for idx in batches:
        x, y, i = ds.get_batch(idx)
        assert torch.equal(y, i % c)  # target is a function of the index it came with
        step(x, y, i, epoch=0)
    seen = torch.cat(batches)
    with torch.no_grad():
        expect = model(ds.x[seen])
    torch.testing.assert_close(store.logits[0][seen], expect)
    assert (store.epoch_of[0][seen] == 0).all()


def test_digits_dataset_yields_its_index():
    ds = load_dataset("digits")
    x, y, i = ds[17]
    assert i == 17 and torch.equal(x, ds.x[17]) and int(y) == int(ds.y[17])
    counts = F.one_hot(load_dataset("digits", "test").y).sum(0)
    assert len(ds) == 1437 and counts.sum() == 360
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 174-183 per class x 0.2
