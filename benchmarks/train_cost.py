"""Step cost of sgd, saf, mesa and sam relative to sgd, measured side by side in one process.

``saf-autograd`` is SAF with its KL term through autograd instead of the trainer's
closed-form gradient (:func:`saf.trajectory_loss_and_grad`), to show what that saves.
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

METHODS = ("sgd", "saf", "mesa", "sam", "saf-autograd", "sgd-copy")


class AutogradKL:
    """SAF with the KL term through autograd (``CE + trajectory_loss``, one backward):
    the plain formulation the trainer's closed-form gradient hook replaces, for comparison."""

    def __init__(self, stepper: Stepper):
        self.s = stepper

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
        m = name.removesuffix("-autograd").removesuffix("-copy")
        opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, **kw) if m == "sam" else sgd
        store = OutputStore(len(ds), ds.num_classes, lag, device=device) if m == "saf" else None
        ema = EMA(net, scaled_ema_decay(12, 40)) if m == "mesa" else None
        lam = {"saf": 0.3, "mesa": 0.8}.get(m, 0.0)
        step = Stepper(m, net, opt, lam, 5.0, 0, store, ema)
        steppers[name] = AutogradKL(step) if name == "saf-autograd" else step
    return steppers


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(steppers, ds, steps, batch_size, device, warmup=10, seed=0):
    """Per-round step times ``{method: [seconds, ...]}`` (interleaved, random order)."""
    gen, times = torch.Generator().manual_seed(seed), {m: [] for m in steppers}
    order_gen = torch.Generator().manual_seed(seed + 1)
    names, r, batches = list(steppers), 0, []
    while r < steps + warmup:
        if not batches:
            batches = _batches(len(ds), batch_size, gen)
        x, y, idx = (t.to(device) for t in ds.get_batch(batches.pop(0)))
        epoch = 3 + r // 12  # trajectory loss active, store slots rotate like in training
        for m in (names[k] for k in torch.randperm(len(names), generator=order_gen)):
            _sync(device)
            t0 = time.perf_counter()
            steppers[m](x, y, idx, epoch)
            _sync(device)
            if r >= warmup:
                times[m].append(time.perf_counter() - t0)
        r += 1
    return times


@torch.no_grad()
def forward_fraction(model, ds, batch_size, device, sgd_times, reps=50):
    """Median time of a no-grad eval-mode forward over the median sgd step time."""
    x = ds.get_batch(torch.arange(batch_size))[0].to(device)
    model.eval()
    t = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        model(x)
        _sync(device)
        t.append(time.perf_counter() - t0)
    model.train()
    return statistics.median(t) / statistics.median(sgd_times)


def saf_extra_ms(store, ds, batch_size, device, reps=200, between=None):
    """Median time of SAF's extra work alone (store read, KL loss and closed-form
    gradient, the add autograd does at the logits, store write), ms.

    With ``between`` (a callable, e.g. one sgd step) it runs untimed before every
    repetition, so the extra work meets the caches a training step leaves behind.
    """
    from saf import trajectory_loss_and_grad

    idx = torch.arange(batch_size, device=device)
    z = torch.randn(batch_size, ds.num_classes, device=device)
    t = []
    for _ in range(reps):
        if between is not None:
            between()
        _sync(device)
        t0 = time.perf_counter()
        past, mask = store.read(idx, 3)
        _, grad = trajectory_loss_and_grad(z, past, 5.0, 0.3, mask)
        z + grad  # noqa: B018  (what autograd adds at the logits)
        store.write(idx, z, 3)
        _sync(device)
        t.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(t)


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
    fwd = forward_fraction(steppers["sgd"].model, ds, a.batch_size, a.device, times["sgd"])
    res["eval_forward_over_sgd_step"] = fwd
    print(
        f"{a.model} on {a.data}, batch {a.batch_size}, {a.steps} interleaved steps each, "
        f"{res['threads']} thread(s), {a.device}; sgd step {res['sgd_ms_median']:.2f} ms "
        f"(median); a no-grad eval forward costs {fwd:.3f} of it (MESA's floor: {1 + fwd:.3f})"
    )
    for m in METHODS[1:]:
        med, lo, hi = ratio_summary(times[m], times["sgd"])
        res["ratio_to_sgd"][m] = {"median": med, "ci95": [lo, hi]}
        print(f"  {m:12s} / sgd = {med:.3f}  (95% CI {lo:.3f} - {hi:.3f})")
    hot = saf_extra_ms(store, ds, a.batch_size, a.device)
    x, y, idx = (t.to(a.device) for t in ds.get_batch(torch.arange(a.batch_size)))
    cold = saf_extra_ms(
        store, ds, a.batch_size, a.device, reps=50,
        between=lambda: steppers["sgd-copy"](x, y, idx, 0),
    )  # fmt: skip
    res["saf_extra_ms"] = {"back_to_back": hot, "after_an_sgd_step": cold}
    print(
        f"  SAF's extra work alone (store read/write, KL and its gradient): {hot:.3f} ms "
        f"back to back, {cold:.3f} ms right after an sgd step "
        f"= {cold / res['sgd_ms_median']:.2%} of one"
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
