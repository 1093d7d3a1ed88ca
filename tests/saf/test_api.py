"""The drop-in API in a loop of one's own: SAFLoss, MESALoss, WithIndex, SAM in both forms,
GradScaler, gradient accumulation, and torch.distributed with an uneven batch."""

import copy
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis import safe_torch_load
from saf import (
    SAM,
    MESALoss,
    SAFLoss,
    TrainConfig,
    WithIndex,
    build_model,
    epoch_batches,
    list_checkpoints,
    load_dataset,
    train,
)
from saf.data import balanced_subset


def test_own_loop_saf_equals_saf_train_bitwise(tmp_path):
    """The trainer steps with the same classes: a plain loop over them gives its bits."""
    cfg = TrainConfig(method="saf", limit=256, batch_size=64, epochs=3, lag=1, start_epoch=1,
                      progress=False, out=tmp_path / "run")  # fmt: skip
    run = train(cfg)
    ds = load_dataset("digits")
    ds = ds.subset(balanced_subset(ds.y, ds.num_classes, 256))
    order = torch.Generator().manual_seed(0)  # the trainer's sampler seed is the run's seed
    torch.manual_seed(0)
    model = build_model("resnet_small", 10, ds.in_shape)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                          foreach=True)  # fmt: skip
    steps = 4 * 3
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps))
    )
    saf_loss = SAFLoss(len(ds), 10, lag=1, start_epoch=1)
    for epoch in range(3):
        for idx in epoch_batches(len(ds), 64, order):
            x, y, i = ds.get_batch(idx)
            logits = model(x)
            loss = F.cross_entropy(logits, y) + saf_loss(logits, i, epoch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    final = safe_torch_load(list_checkpoints(run)[-1][1])
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k]), k


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("form", ["closure", "davda54", "two_steps"])
def test_sam_freezes_batchnorm_on_the_second_pass_and_runs_two_passes(form):
    model, x, y = _bn_model(), torch.randn(16, 4), torch.randint(0, 3, (16,))
    ref = copy.deepcopy(model)
    ref(x)  # one training forward: the statistics a SAM step may leave
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model)
    passes = []
    model.register_forward_hook(lambda *_: passes.append(1))

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if form == "closure":
        opt.step(closure)
    elif form == "davda54":  # their loop: the first backward is the caller's
        F.cross_entropy(model(x), y).backward()
        opt.step(closure)
    else:
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    assert len(passes) == 2
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(ref[1], name)), name
    assert model[1].track_running_stats
    assert not torch.equal(model[0].weight, ref[0].weight)  # a step was taken


def test_sam_with_a_grad_scaler_equals_plain_and_skips_an_inf_step():
    scale = 2.0**10
    plain, scaled = _bn_model(), _bn_model()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opts = [
        SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=m) for m in (plain, scaled)
    ]
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    F.cross_entropy(plain(x), y).backward()
    opts[0].first_step(zero_grad=True)
    F.cross_entropy(plain(x), y).backward()
    opts[0].second_step(zero_grad=True)
    scaler.scale(F.cross_entropy(scaled(x), y)).backward()
    opts[1].first_step(zero_grad=True, scaler=scaler)
    scaler.scale(F.cross_entropy(scaled(x), y)).backward()
    opts[1].second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    before = copy.deepcopy(scaled.state_dict())
    scaler.scale(F.cross_entropy(scaled(x), y) * float("inf")).backward()
    opts[1].first_step(zero_grad=True, scaler=scaler)
    scaler.scale(F.cross_entropy(scaled(x), y)).backward()
    opts[1].second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    for k, v in scaled.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[k]), k  # the step with inf gradients was skipped
    assert scaler.get_scale() < scale


def test_saf_under_bf16_autocast_and_a_grad_scaler():
    """The trajectory loss is an ordinary loss: on autocast (bf16) logits, a power-of-two
    scaled backward gives the unscaled gradient times the scale."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    x, y, idx = torch.randn(8, 6), torch.randint(0, 4, (8,)), torch.arange(8)
    losses, stored = [SAFLoss(8, 4, lag=1, start_epoch=0) for _ in range(2)], torch.randn(8, 4)
    for t in losses:
        t.store.write(idx, stored, epoch=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for m, t, s in ((model, losses[0], scaler), (twin, losses[1], None)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(x)
        traj = t(logits, idx, 1)
        assert logits.dtype == torch.bfloat16 and traj.dtype == torch.float32 and traj > 0
        loss = F.cross_entropy(logits.float(), y) + traj
        (s.scale(loss) if s else loss).backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad / 256.0, q.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["sgd", "saf"])
def test_gradient_accumulation_equals_one_larger_batch_float64(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    twin = copy.deepcopy(model)
    x, y, idx = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,)), torch.arange(8)
    stored = torch.randn(8, 3, dtype=torch.float64)
    trajs = []
    for _ in range(2):
        t = SAFLoss(8, 3, lag=1, start_epoch=0, dtype=torch.float64)
        t.store.write(idx, stored, epoch=0)
        trajs.append(t)

    def loss(m, t, b):
        logits = m(x[b])
        extra = t(logits, idx[b], 1) if method == "saf" else 0.0
        return F.cross_entropy(logits, y[b]) + extra

    loss(model, trajs[0], slice(0, 8)).backward()
    for b in (slice(0, 4), slice(4, 8)):  # two micro-batches, each loss / 2
        (loss(twin, trajs[1], b) / 2).backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(trajs[0].store.logits, trajs[1].store.logits)


def test_mesa_loss_targets_the_teacher_and_updates_after_the_step():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    mesa = MESALoss(model, decay=0.5, start_epoch=1)
    x = torch.randn(4, 3)
    assert mesa.target(x, 0) is None and float(mesa(model(x), None)) == 0.0
    target = mesa.target(x, 1)
    torch.testing.assert_close(target, model(x).detach())  # the teacher starts as the student
    with torch.no_grad():
        model.weight.add_(1.0)
    mesa.update(model)
    torch.testing.assert_close(mesa.ema.module.weight, model.weight - 0.5)


def test_with_index_carries_each_item_its_index_through_a_shuffled_loader():
    data = torch.utils.data.TensorDataset(torch.arange(10.0)[:, None], torch.arange(10))
    loader = torch.utils.data.DataLoader(WithIndex(data), batch_size=3, shuffle=True)
    for x, y, i in loader:
        assert torch.equal(x[:, 0].long(), i) and torch.equal(y, i)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_UNEVEN = dict(method="saf", model="mlp", limit=251, batch_size=64, epochs=2, lag=1,
               start_epoch=1, progress=False, threads=1)  # fmt: skip


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    train(TrainConfig(**_UNEVEN, out=out))
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_gloo_ranks_with_an_uneven_last_batch_match_one_process(tmp_path):
    """251 samples in batches of 64: the last batch of 59 splits 30 / 29. Each rank's loss is
    weighted by its share, so the update is the global mean's (the MLP has no BatchNorm)."""
    port = _free_port()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp")), nprocs=2)
    one = train(TrainConfig(**_UNEVEN, out=tmp_path / "one"))
    a = safe_torch_load(list_checkpoints(tmp_path / "ddp")[-1][1])
    b = safe_torch_load(list_checkpoints(one)[-1][1])
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
