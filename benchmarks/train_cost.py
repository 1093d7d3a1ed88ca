"""Step cost of sgd, saf, mesa and sam relative to sgd, measured side by side in one process.

``saf`` runs as the trainer runs it, with each epoch's batches announced (store traffic and
loss values once per chunk of steps, :mod:`saf._prefetch`); ``saf-per-step`` reads and
writes the store and computes the loss every step; ``saf-autograd`` is SAF with its KL term
through autograd instead of the closed-form gradient (:func:`saf.trajectory_loss_and_grad`),
to show what that saves. ``mesa-plain`` is MESA with the teacher's plain forward (no BatchNorm
folding: :mod:`saf._teacher`).
``sgd-copy`` is sgd a second time: an A/A control whose ratio shows what this benchmark
resolves (it should read 1.00 within its interval). All methods step one shared model
(see :func:`make_steppers`).

Each round takes one batch and runs one step of every method on it, in a fresh random
order, so slow phases of a shared machine hit every method alike and no method always
follows the same one (a step right after a SAM step is slower: with a fixed rotation the
A/A control read 0.96-0.99). The per-round ratio ``t_method / t_sgd`` is summarised by its
median with a bootstrap 95% confidence interval (resampling rounds). Whole-run timings on a
shared machine swing by +-20%; this design resolves about one per cent.

    python benchmarks/train_cost.py                 # default model/data, 300 steps each
    python benchmarks/train_cost.py --steps 500 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from saf import (
    EMA,
    SAM,
    OutputStore,
    Stepper,
    build_model,
    load_dataset,
    scaled_ema_decay,
    trajectory_loss,
)
from saf.train import _batches

METHODS = ("sgd", "saf", "mesa", "sam", "saf-per-step", "saf-autograd", "mesa-plain", "sgd-copy")


class PerStep:
    """A Stepper used step by step, without :meth:`~saf.Stepper.begin_epoch`: SAF then
    reads and writes its store every step instead of once per chunk of steps."""

    def __init__(self, stepper: Stepper):
        self.s = stepper

    def __call__(self, x, y, idx, epoch):
        return self.s(x, y, idx, epoch)

    def begin_epoch(self, epoch, batches):
        pass

    def end_epoch(self):
        pass


class AutogradKL(PerStep):
    """SAF with the KL term through autograd (``CE + trajectory_loss``, one backward):
    the plain formulation the trainer's closed-form gradient replaces, for comparison."""

    def __call__(self, x, y, idx, epoch):
        s = self.s
        past, mask = s.store.read(idx, epoch)
        logits = s.model(x)
        loss = F.cross_entropy(logits, y) + trajectory_loss(logits, past, s.tau, s.lam, mask)
        s.store.write(idx, logits, epoch)
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        s.opt.step()


def make_steppers(ds, model_name, device, lag=3, seed=0):
    """One Stepper per method, all stepping one shared model.

    Step time does not depend on the weights' values, but separately built copies of the
    model differ by about 1% from memory placement alone (an A/A copy read 0.990, 95% CI
    0.987-0.996), which is the size of the effect measured here; so every method steps
    the same parameters. sgd, saf, mesa and the controls share one SGD optimizer (their
    updates interleave); sam has its own SAM optimizer over the same parameters.
    """
    torch.manual_seed(seed)
    net = build_model(model_name, ds.num_classes, ds.in_shape).to(device).train()
    kw = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)  # as saf.train
    sgd = torch.optim.SGD(net.parameters(), **kw)
    steppers = {}
    for name in METHODS:
        m = name.split("-")[0]
        opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, **kw) if m == "sam" else sgd
        store = OutputStore(len(ds), ds.num_classes, lag, device=device) if m == "saf" else None
        ema = EMA(net, scaled_ema_decay(12, 40)) if m == "mesa" else None
        if name == "mesa-plain":
            ema._folded = None  # the plain forward
        lam = {"saf": 0.3, "mesa": 0.8}.get(m, 0.0)
        step = Stepper(m, net, opt, lam, 5.0, 0, store, ema)
        wrap = {"saf-autograd": AutogradKL, "saf-per-step": PerStep}.get(name)
        steppers[name] = wrap(step) if wrap else step
    return steppers


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(steppers, ds, steps, batch_size, device, warmup=10, seed=0):
    """Per-round step times ``{method: [seconds, ...]}`` (interleaved, random order).

    Epochs are announced to every stepper as the trainer does (``begin_epoch`` /
    ``end_epoch``); their time counts too, added to the epoch's first and last step.
    """
    gen, times = torch.Generator().manual_seed(seed), {m: [] for m in steppers}
    order_gen = torch.Generator().manual_seed(seed + 1)
    names, r, epoch = list(steppers), 0, 2  # epoch >= 3: trajectory loss active

    def timed(fn, *args):
        _sync(device)
        t0 = time.perf_counter()
        fn(*args)
        _sync(device)
        return time.perf_counter() - t0

    while r < steps + warmup:
        epoch += 1  # the store's slots rotate as in training
        batches = [b.to(device) for b in _batches(len(ds), batch_size, gen)]
        carry = {m: timed(steppers[m].begin_epoch, epoch, batches) for m in names}
        for idx in batches:
            x, y, _ = (t.to(device) for t in ds.get_batch(idx))
            for m in (names[k] for k in torch.randperm(len(names), generator=order_gen)):
                dt = timed(steppers[m], x, y, idx, epoch) + carry.pop(m, 0.0)
                if r >= warmup:
                    times[m].append(dt)
            r += 1
        for m in names:
            dt = timed(steppers[m].end_epoch)
            if times[m]:
                times[m][-1] += dt
    return {m: t[:steps] for m, t in times.items()}


@torch.no_grad()
def forward_fraction(forward, ds, batch_size, device, sgd_times, reps=50):
    """Median time of ``forward(x)`` (a no-grad eval-mode forward) over the median sgd
    step time."""
    x = ds.get_batch(torch.arange(batch_size))[0].to(device)
    t = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        forward(x)
        _sync(device)
        t.append(time.perf_counter() - t0)
    return statistics.median(t) / statistics.median(sgd_times)


def saf_extra_ms(store, ds, batch_size, device, between, epochs=6):
    """SAF's extra work per step alone, ms, each step right after ``between()`` (an sgd
    step, untimed), so it meets the caches a training step leaves behind:
    ``(per_step, planned)``. ``per_step``: store read, KL loss and closed-form gradient,
    the add autograd does at the logits, store write; ``planned``: the same work as the
    trainer does it (:class:`saf._prefetch.TargetPrefetch`), with the chunked reads and
    writes counted (median over epochs of the mean per step)."""
    from saf import trajectory_loss_and_grad
    from saf._prefetch import TargetPrefetch, kl_grad

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch_size, ds.num_classes, device=device)
    per_step, planned, pre = [], [], TargetPrefetch(store, 5.0, 0.3)
    for epoch in range(3, 3 + epochs):
        batches = [b.to(device) for b in _batches(len(ds), batch_size, gen)]
        batches = [b for b in batches if len(b) == batch_size]
        for idx in batches:
            between()
            _sync(device)
            t0 = time.perf_counter()
            past, mask = store.read(idx, epoch)
            _, grad = trajectory_loss_and_grad(z, past, 5.0, 0.3, mask)
            z + grad  # noqa: B018  (what autograd adds at the logits)
            store.write(idx, z, epoch)
            _sync(device)
            per_step.append(time.perf_counter() - t0)
        total = 0.0
        for k, idx in enumerate(batches):
            between()
            _sync(device)
            t0 = time.perf_counter()
            if k == 0:
                pre.begin_epoch(epoch, batches, read=True)
            grad = kl_grad(z, pre.next_target()[0], 5.0)
            z + grad  # noqa: B018
            pre.record(idx, z)
            if k == len(batches) - 1:
                pre.flush()
            _sync(device)
            total += time.perf_counter() - t0
        planned.append(total / len(batches))
    return 1e3 * statistics.median(per_step), 1e3 * statistics.median(planned)


def ratio_summary(t, t_ref, n_boot=2000, seed=0):
    """Median of per-round ratios and its bootstrap 95% CI."""
    ratios = np.asarray(t) / np.asarray(t_ref)
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(ratios, (n_boot, len(ratios))), axis=1)
    return (
        float(np.median(ratios)),
        float(np.quantile(boot, 0.025)),
        float(np.quantile(boot, 0.975)),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="resnet_small")
    p.add_argument("--data", default="digits")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=300, help="measured steps per method (>= 200)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    ds = load_dataset(a.data)
    steppers = make_steppers(ds, a.model, a.device)
    times = measure(steppers, ds, a.steps, a.batch_size, a.device)
    store = steppers["saf"].store
    ema_bytes = sum(
        t.numel() * t.element_size() for t in steppers["mesa"].ema.module.state_dict().values()
    )
    res = {"model": a.model, "data": a.data, "batch_size": a.batch_size, "steps": a.steps,
           "threads": torch.get_num_threads(), "device": a.device,
           "sgd_ms_median": 1e3 * statistics.median(times["sgd"]), "ratio_to_sgd": {},
           "store_bytes_per_sample_per_class": store.nbytes_per_sample_per_class,
           "reference_code_bytes_per_sample_per_class": 16,
           "store_logits_MB": store.logits.numel() * store.logits.element_size() / 2**20,
           "store_total_MB": store.nbytes / 2**20, "mesa_ema_MB": ema_bytes / 2**20}  # fmt: skip
    ema, net = steppers["mesa"].ema, steppers["sgd"].model
    net.eval()
    fwd = forward_fraction(net, ds, a.batch_size, a.device, times["sgd"])
    teacher = forward_fraction(ema, ds, a.batch_size, a.device, times["sgd"])
    net.train()
    res["eval_forward_over_sgd_step"] = fwd
    res["mesa_teacher_forward_over_sgd_step"] = teacher
    print(
        f"{a.model} on {a.data}, batch {a.batch_size}, {a.steps} interleaved steps each, "
        f"{res['threads']} thread(s), {a.device}; sgd step {res['sgd_ms_median']:.2f} ms "
        f"(median); a no-grad eval forward costs {fwd:.3f} of it, MESA's teacher forward "
        f"as it runs (BatchNorm folded where it pays, refold included) {teacher:.3f} "
        f"(MESA's floor: {1 + teacher:.3f})"
    )
    for m in METHODS[1:]:
        med, lo, hi = ratio_summary(times[m], times["sgd"])
        res["ratio_to_sgd"][m] = {"median": med, "ci95": [lo, hi]}
        print(f"  {m:12s} / sgd = {med:.3f}  (95% CI {lo:.3f} - {hi:.3f})")
    x, y, idx = (t.to(a.device) for t in ds.get_batch(torch.arange(a.batch_size)))
    per_step, planned = saf_extra_ms(
        store, ds, a.batch_size, a.device, lambda: steppers["sgd-copy"](x, y, idx, 0)
    )
    res["saf_extra_ms"] = {"per_step": per_step, "planned": planned}
    print(
        f"  SAF's extra work alone, per step, right after an sgd step: {per_step:.3f} ms "
        f"step by step, {planned:.3f} ms as the trainer does it (store traffic per chunk) "
        f"= {planned / res['sgd_ms_median']:.2%} of an sgd step"
    )
    print(
        f"  SAF store: {res['store_bytes_per_sample_per_class']} B/sample/class (fp16, "
        f"{store.lag} slots; reference code: 16), logits {res['store_logits_MB']:.3f} MB, "
        f"with epoch tags {res['store_total_MB']:.3f} MB; "
        f"MESA EMA copy {res['mesa_ema_MB']:.3f} MB"
    )
    if a.json:
        from analysis import atomic_write_json

        atomic_write_json(a.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
