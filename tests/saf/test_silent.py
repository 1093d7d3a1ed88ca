"""The drop-in API's silent failures, each now correct or refused, checked against an oracle.

* SAM under a GradScaler (with clipping) takes the same steps as SAM without one.
* SAM with gradient accumulation over the same micro-batches equals SAM on the full batch;
  mismatched accumulation is refused with the weights restored.
* SAFLoss: evaluation never touches the store; a resume that forgot the store, or
  ``start_epoch < lag``, warns; a restored store gives an uninterrupted run's loss.
* MESALoss: a teacher that was never updated warns after epoch 0.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import saf


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _data(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _sam(model):
    return saf.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


def _sam_steps(model, opt, x, y, scaler=None, clip=None, micro=1, steps=3):
    """SAM steps, each pass accumulating ``micro`` equal micro-batches (loss / micro)."""
    scale = scaler.scale if scaler is not None else (lambda t: t)
    parts = list(zip(x.chunk(micro), y.chunk(micro), strict=True))
    for _ in range(steps):
        for xb, yb in parts:
            scale(F.cross_entropy(model(xb), yb) / micro).backward()
        opt.first_step(zero_grad=True, scaler=scaler)
        for xb, yb in parts:
            scale(F.cross_entropy(model(xb), yb) / micro).backward()
        if clip is not None:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.second_step(zero_grad=True, scaler=scaler)
        if scaler is not None:
            scaler.update()


@pytest.mark.parametrize("clip", [None, 0.05])
def test_sam_with_a_grad_scaler_and_clipping_equals_sam_without(clip):
    x, y = _data()
    ref, amp = _net(), _net()
    _sam_steps(ref, _sam(ref), x, y, clip=clip)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _sam_steps(amp, _sam(amp), x, y, scaler=scaler, clip=clip)
    torch.testing.assert_close(_flat(amp), _flat(ref), rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == 2.0**12  # no overflow: the scale was never lowered


@pytest.mark.parametrize("bad_pass", [1, 2])
def test_sam_under_a_scaler_skips_a_step_with_an_overflow(bad_pass):
    x, y = _data()
    model = _net()
    opt, before = _sam(model), _flat(_net())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for p in (1, 2):
        loss = F.cross_entropy(model(x), y) * (float("inf") if p == bad_pass else 1.0)
        scaler.scale(loss).backward()
        if p == 1:
            opt.first_step(zero_grad=True, scaler=scaler)
    opt.second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    assert torch.equal(_flat(model), before)  # w restored, no step
    assert scaler.get_scale() == 2.0**11


def test_sam_accumulating_the_same_micro_batches_equals_sam_on_the_full_batch():
    x, y = _data()
    full, acc = _net(), _net()
    _sam_steps(full, _sam(full), x, y)
    _sam_steps(acc, _sam(acc), x, y, micro=4)
    torch.testing.assert_close(_flat(acc), _flat(full), rtol=1e-5, atol=1e-6)


def test_sam_refuses_mismatched_accumulation_and_restores_the_weights():
    x, y = _data()
    model = _net()
    opt, before = _sam(model), _flat(model)
    for xb, yb in zip(x.chunk(2), y.chunk(2), strict=True):
        F.cross_entropy(model(xb), yb).backward()

    def closure():  # one micro-batch only: the step would mix data
        loss = F.cross_entropy(model(x[:8]), y[:8])
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="2 backward passes .* from 1"):
        opt.step(closure)
    assert torch.equal(_flat(model), before)


def test_saf_loss_ignores_evaluation_and_keeps_the_store():
    x, y = _data()
    model, loss = _net(), saf.SAFLoss(16, 3, lag=1, start_epoch=1)
    idx = torch.arange(16)
    loss(model(x), idx, 0)
    stored = loss.store.logits.clone()
    with torch.no_grad():
        assert float(loss(model(x) + 5.0, idx, 1)) == 0.0  # eval logits, even different ones
    assert torch.equal(loss.store.logits, stored)
    assert (loss.store.epoch_of == 0).all()


def _run_saf(model, opt, loss, x, y, epochs):
    idx, out = torch.arange(len(x)), []
    for e in epochs:
        for b in idx.chunk(4):
            z = model(x[b])
            term = loss(z, b, e)
            opt.zero_grad()
            (F.cross_entropy(z, y[b]) + term).backward()
            opt.step()
            out.append(float(term))
    return out


def test_saf_term_after_a_restored_resume_equals_the_uninterrupted_run():
    x, y = _data()
    m1 = _net()
    o1, l1 = torch.optim.SGD(m1.parameters(), lr=0.1), saf.SAFLoss(16, 3, lag=1, start_epoch=1)
    whole = _run_saf(m1, o1, l1, x, y, range(4))
    m2 = _net()
    o2, l2 = torch.optim.SGD(m2.parameters(), lr=0.1), saf.SAFLoss(16, 3, lag=1, start_epoch=1)
    first = _run_saf(m2, o2, l2, x, y, range(2))
    saved = copy.deepcopy((m2.state_dict(), o2.state_dict(), l2.state_dict()))
    m3 = _net()
    o3, l3 = torch.optim.SGD(m3.parameters(), lr=0.1), saf.SAFLoss(16, 3, lag=1, start_epoch=1)
    m3.load_state_dict(saved[0]), o3.load_state_dict(saved[1]), l3.load_state_dict(saved[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # restored: no warning
        rest = _run_saf(m3, o3, l3, x, y, range(2, 4))
    assert first + rest == whole and whole[-1] > 0


def test_saf_loss_warns_when_a_resume_forgot_the_store():
    x, y = _data()
    model = _net()
    fresh = saf.SAFLoss(16, 3, lag=1, start_epoch=1)
    with pytest.warns(UserWarning, match="restore it with SAFLoss.load_state_dict"):
        terms = _run_saf(model, torch.optim.SGD(model.parameters(), lr=0.1), fresh, x, y, [2])
    assert terms == [0.0] * 4


def test_saf_loss_warns_when_start_epoch_is_below_the_lag():
    with pytest.warns(UserWarning, match="start_epoch >= lag"):
        saf.SAFLoss(16, 3, lag=3, start_epoch=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        saf.SAFLoss(16, 3, lag=3, start_epoch=5)  # the paper's defaults


def test_mesa_warns_when_a_resume_forgot_the_teacher():
    x, _ = _data()
    model = _net()
    fresh = saf.MESALoss(model, decay=0.9, start_epoch=1)
    with pytest.warns(UserWarning, match="never updated"):
        fresh.target(x, 3)
    trained = saf.MESALoss(model, decay=0.9, start_epoch=1)
    trained.update(model)
    restored = saf.MESALoss(model, decay=0.9, start_epoch=1)
    restored.load_state_dict(trained.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored.target(x, 3)


def test_ema_follows_the_students_buffers_after_the_teacher_is_moved():
    """.to() replaces buffers: the teacher's BatchNorm statistics must keep following."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).train()
    ema = saf.EMA(model, decay=0.5)
    ema.update(model)
    ema.module.to(torch.float64)  # a move that replaces every tensor, as .to(device) does
    model.to(torch.float64)
    model(torch.randn(16, 4, dtype=torch.float64))  # new running statistics
    ema.update(model)
    assert int(ema.module[1].num_batches_tracked) == 1
    torch.testing.assert_close(ema.module[1].running_mean, 0.5 * model[1].running_mean)
