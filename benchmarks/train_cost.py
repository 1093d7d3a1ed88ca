"""Step cost of saf, mesa and sam relative to sgd, measured side by side in one process.

Rows: ``saf``, ``mesa``, ``sam`` as the trainer runs them (:class:`saf.Stepper`);
``saf-autograd`` is SAF with the KL term written as a plain autograd expression (what the
closed-form gradient of :func:`saf.trajectory_loss` replaces); ``sgd-copy`` is sgd a
second time, an A/A control whose ratio shows what this benchmark resolves (it should
read 1.00 within its interval). All methods step one shared model
(see :func:`make_steppers`).

Each round takes one batch and runs one step of every method on it, in a fresh random
order, so slow phases of a shared machine hit every method alike and no method always
follows the same one. The per-round ratio ``t_method / t_sgd`` is summarised by its
median with a bootstrap 95% confidence interval (resampling rounds).

    python benchmarks/train_cost.py                 # resnet_small on digits, 300 steps each
    python benchmarks/train_cost.py --model resnet18 --data cifar-shaped --steps 60
    python benchmarks/train_cost.py --steps 500 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from analysis import atomic_write_json
from saf import (
    SAM,
    IndexedDataset,
    MESALoss,
    SAFLoss,
    Stepper,
    build_model,
    epoch_batches,
    load_dataset,
    scaled_ema_decay,
)

METHODS = ("sgd", "saf", "mesa", "sam", "saf-autograd", "sgd-copy")


class AutogradKL:
    """SAF with the KL term through autograd (``CE + KL``, one backward): the plain
    formulation that the closed-form gradient replaces, for comparison."""

    def __init__(self, stepper: Stepper):
        self.s = stepper

    def __call__(self, x, y, idx, epoch):
        s = self.s
        t = s.traj
        past, mask = t.store.read(idx, epoch)
        logits = s.model(x)
        log_p = F.log_softmax(past.float() / t.tau, 1)
        kl = (log_p.exp() * (log_p - F.log_softmax(logits / t.tau, 1))).sum(1)
        loss = F.cross_entropy(logits, y) + t.lam * t.tau**2 * torch.where(mask, kl, 0).mean()
        t.store.write(idx, logits, epoch)
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        s.opt.step()


def make_steppers(ds, model_name, device, methods=METHODS, lag=3, seed=0):
    """One Stepper per method, all stepping one shared model.

    Step time does not depend on the weights' values, but separately built copies of the
    model differ by about 1% from memory placement alone, which is the size of the effect
    measured here; so every method steps the same parameters. sgd, saf, mesa and the
    controls share one SGD optimizer (their updates interleave); sam has its own SAM
    optimizer over the same parameters.
    """
    # the store and the teacher start empty here: the step's cost does not depend on it
    warnings.filterwarnings("ignore", message="(SAFLoss|MESALoss)", category=UserWarning)
    torch.manual_seed(seed)
    net = build_model(model_name, ds.num_classes, ds.in_shape).to(device).train()
    kw = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)  # as saf.train
    sgd = torch.optim.SGD(net.parameters(), **kw)
    steppers = {}
    for name in methods:
        m = name.split("-")[0]
        opt = (
            SAM(net.parameters(), torch.optim.SGD, rho=0.05, model=net, **kw) if m == "sam" else sgd
        )
        traj = None
        if m == "saf":
            traj = SAFLoss(len(ds), ds.num_classes, lag=lag, start_epoch=0, device=device)
        if m == "mesa":
            traj = MESALoss(net, scaled_ema_decay(12, 40), start_epoch=0)
        step = Stepper(m, net, opt, traj)
        steppers[name] = AutogradKL(step) if name == "saf-autograd" else step
    return steppers


def cifar_shaped(n=50_000, seed=0) -> IndexedDataset:
    """Random CIFAR-shaped data (3x32x32 images, 10 classes): step time does not depend
    on the pixel values, and no CIFAR files are needed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    return IndexedDataset(x, torch.randint(0, 10, (n,), generator=g), 10)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(steppers, ds, steps, batch_size, device, warmup=10, seed=0):
    """Per-round step times ``{method: [seconds, ...]}`` (interleaved, random order)."""
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
        for idx in epoch_batches(len(ds), batch_size, gen):
            if r >= steps + warmup:
                break
            x, y, idx = (t.to(device) for t in ds.get_batch(idx))
            for m in (names[k] for k in torch.randperm(len(names), generator=order_gen)):
                dt = timed(steppers[m], x, y, idx, epoch)
                if r >= warmup:
                    times[m].append(dt)
            r += 1
    return times


@torch.no_grad()
def forward_fraction(forward, ds, batch_size, device, sgd_times, reps=20):
    """Median time of ``forward(x)`` (a no-grad eval-mode forward) over the median sgd
    step time: the floor of MESA's extra cost (its teacher's forward)."""
    x = ds.get_batch(torch.arange(batch_size))[0].to(device)
    t = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        forward(x)
        _sync(device)
        t.append(time.perf_counter() - t0)
    return statistics.median(t) / statistics.median(sgd_times)


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
    p.add_argument(
        "--data",
        default="digits",
        help="a data set name, or cifar-shaped (random 3x32x32 images, 10 classes)",
    )
    p.add_argument("--methods", default=",".join(METHODS), help="rows to run (sgd always runs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=300, help="measured steps per method")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)  # fmt: skip
    if a.threads:
        torch.set_num_threads(a.threads)
    ds = cifar_shaped() if a.data == "cifar-shaped" else load_dataset(a.data)
    methods = ["sgd", *[m for m in a.methods.split(",") if m in METHODS and m != "sgd"]]
    steppers = make_steppers(ds, a.model, a.device, methods)
    times = measure(steppers, ds, a.steps, a.batch_size, a.device)
    net = steppers["sgd"].model
    net.eval()
    fwd = forward_fraction(net, ds, a.batch_size, a.device, times["sgd"])
    net.train()
    res = {"model": a.model, "data": a.data, "batch_size": a.batch_size, "steps": a.steps,
           "threads": torch.get_num_threads(), "device": a.device,
           "sgd_ms_median": 1e3 * statistics.median(times["sgd"]),
           "eval_forward_over_sgd_step": fwd, "ratio_to_sgd": {},
           "images_per_s": {m: a.batch_size / statistics.median(times[m])
                            for m in methods}}  # fmt: skip
    print(
        f"{a.model} on {a.data}, batch {a.batch_size}, {a.steps} interleaved steps each, "
        f"{res['threads']} thread(s), {a.device}; sgd step {res['sgd_ms_median']:.2f} ms "
        f"(median, {res['images_per_s']['sgd']:.0f} images/s); a no-grad eval forward "
        f"costs {fwd:.3f} of it (MESA's floor: {1 + fwd:.3f})"
    )
    for m in methods[1:]:
        med, lo, hi = ratio_summary(times[m], times["sgd"])
        res["ratio_to_sgd"][m] = {"median": med, "ci95": [lo, hi]}
        print(f"  {m:12s} / sgd = {med:.3f}  (95% CI {lo:.3f} - {hi:.3f}), "
              f"{res['images_per_s'][m]:.0f} images/s")  # fmt: skip
    if "saf" in steppers:
        store = steppers["saf"].traj.store
        res["store_bytes_per_sample_per_class"] = store.nbytes_per_sample_per_class
        res["store_total_MB"] = store.nbytes / 2**20
        print(f"  SAF store: {store.nbytes_per_sample_per_class} B/sample/class (fp16, "
              f"{store.lag} slots; reference code: 16), {res['store_total_MB']:.3f} MB with "
              "epoch tags")  # fmt: skip
    if "mesa" in steppers:
        sd = steppers["mesa"].traj.ema.module.state_dict().values()
        res["mesa_ema_MB"] = sum(t.numel() * t.element_size() for t in sd) / 2**20
        print(f"  MESA EMA copy: {res['mesa_ema_MB']:.3f} MB")
    if a.json:
        atomic_write_json(a.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
