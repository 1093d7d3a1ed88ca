"""The training loop: SGD, SAM, ASAM, SAF and MESA in one loop, on one data order.

Reads top to bottom: configuration, setup (data, model, optimizer, schedule, store/EMA),
resume, then the epoch loop (train, evaluate, checkpoint). See :mod:`saf.runs` for what a
run directory holds.

Determinism. The model is initialised from ``torch.manual_seed(seed)``; the data order
comes from a dedicated generator seeded with ``seed`` (and augmentation from another), so
every method sees the same batches in the same order for a given seed. On CPU a run is
bitwise reproducible, and ``train(cfg, resume=True)`` after an interruption ends bitwise
equal to an uninterrupted run: all RNG states are saved at epoch boundaries.

Hot path. Per-step metrics stay on the device and are synchronised once per epoch.
A non-finite epoch loss stops training (:class:`TrainingDiverged`); the checkpoints of the
epochs before it are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from analysis.batches import batch_mean, loss_and_accuracy, model_mode
from analysis.distributed import local_device
from saf import runs
from saf._distributed import DistInfo
from saf.config import TrainConfig, TrainingDiverged, describe_run
from saf.data import IndexedDataset, _balanced, load_dataset
from saf.ema import EMA
from saf.methods import Stepper
from saf.models import build_model
from saf.sam import SAM
from saf.trajectory import OutputStore

__all__ = ["epoch_batches", "evaluate", "steps_per_epoch", "train"]


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps per epoch: a last global batch of fewer than ``2 * world`` samples
    is dropped (BatchNorm needs two samples on each rank).

    >>> steps_per_epoch(1437, 128), steps_per_epoch(257, 128), steps_per_epoch(100, 128)
    (12, 2, 1)
    """
    steps = -(-n // batch_size)
    return steps - 1 if n - (steps - 1) * batch_size < 2 * world else steps


def epoch_batches(
    n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1
) -> list[torch.Tensor]:
    """This rank's index batches of one shuffled epoch (:func:`steps_per_epoch` of them).
    Ranks split each global batch: ``batch[rank::world]``."""
    chunks = torch.randperm(n, generator=generator).split(batch_size)
    return [c[rank::world] for c in chunks[: steps_per_epoch(n, batch_size, world)]]


def _cosine(total_steps: int, warmup_steps: int):
    def factor(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        return 0.5 * (
            1.0 + math.cos(math.pi * (t - warmup_steps) / max(1, total_steps - warmup_steps))
        )

    return factor


@torch.no_grad()
def evaluate(model, dataset, device, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``dataset`` in eval mode (the model's
    train/eval flags are restored after)."""

    def one(batch):
        x, y = batch
        return loss_and_accuracy(F.cross_entropy, model(x.to(device)).float(), y.to(device))

    chunks = torch.arange(len(dataset)).split(batch_size)
    with model_mode(model, "eval"):
        loss, acc = batch_mean(one, (dataset.get_batch(i)[:2] for i in chunks)).tolist()
    return loss, acc


def _saved_config(run: dict, run_dir: Path) -> dict:
    """``run.json``'s config, exactly this version's fields (a default filled in for a
    missing one would silently resume a different run)."""
    saved, known = run.get("config"), {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(saved, dict) or set(saved) != known:
        have = set(saved) if isinstance(saved, dict) else set()
        raise ValueError(
            f"{run_dir / 'run.json'}: cannot resume: config keys missing "
            f"{sorted(known - have)}, unknown {sorted(have - known)}"
        )
    return saved


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train one run and write its run directory; returns the run directory.

    Args:
        config: the run's configuration. With ``resume=True`` only ``out`` (the run
            directory), ``device`` and ``progress`` are used; the rest comes from its
            ``run.json``.
        resume: continue an interrupted run from its ``state.pt``.

    Raises:
        ValueError: bad configuration, an existing run directory without ``resume``, or
            nothing to resume.
        TrainingDiverged: the loss became NaN/Inf (checkpoints so far are kept).
    """
    cfg, state = _config_and_state(config, resume)
    run_dir = cfg.run_dir
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dist = DistInfo.current(cfg.device)
    device = torch.device(local_device(cfg.device) if dist.world > 1 else cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the RNG state saved for resume is this device's

    # --- data, model, optimizer, schedule ---------------------------------------------------
    train_ds, test_ds = _datasets(cfg, device)
    sampler_gen = torch.Generator().manual_seed(cfg.seed)  # the data order: same for all methods
    augment_gen = torch.Generator().manual_seed(cfg.seed + 1)
    steps = steps_per_epoch(len(train_ds), cfg.batch_size, dist.world)
    hp = cfg.resolved(steps)
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.model, train_ds.num_classes, train_ds.in_shape, **cfg.model_kwargs)
    net = net.to(device)
    model = torch.nn.parallel.DistributedDataParallel(net) if dist.world > 1 else net
    optimizer = _optimizer(cfg, model, hp)
    total, warmup = steps * cfg.epochs, steps * cfg.warmup_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(total, warmup))
    store = ema = None
    if cfg.method == "saf":
        store = OutputStore(len(train_ds), train_ds.num_classes, cfg.lag, device=device)
    if cfg.method == "mesa":
        ema = EMA(net, hp["ema_decay"])
    autocast = contextlib.nullcontext
    if cfg.amp and device.type == "cuda":
        autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    gather = dist.gather if dist.world > 1 else None
    lam = hp["lam"] or 0.0
    stepper = Stepper(
        cfg.method, model, optimizer, lam, cfg.tau, cfg.start_epoch, store, ema, autocast, gather
    )
    parts = (optimizer, scheduler, store, ema, sampler_gen, augment_gen)

    # --- fresh start or resume ------------------------------------------------------------------
    if state is None:
        rows, first_epoch = [], 0
        if dist.rank == 0:
            runs.write_run(run_dir, describe_run(cfg, hp, train_ds))
            runs.save_checkpoint(run_dir, 0, net)
            runs.save_state(run_dir, _state(0, rows, *parts))
    else:
        first_epoch, rows = int(state["epoch"]), list(state["metrics"])
        net.load_state_dict(runs.safe_torch_load(runs.checkpoint_path(run_dir, first_epoch)))
        _restore(state, device, *parts)

    # --- the epoch loop -------------------------------------------------------------------------
    model.train()
    for epoch in range(first_epoch, cfg.epochs):
        t0 = time.perf_counter()
        sums = torch.zeros(3, device=device)  # ce*b, correct, samples
        trajs, sizes = [], []  # per step, summed once at the end of the epoch
        batches = epoch_batches(len(train_ds), cfg.batch_size, sampler_gen, dist.rank, dist.world)
        desc = f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}"
        for idx in tqdm(batches, desc, leave=False, disable=not cfg.progress or dist.rank > 0):
            x, y, idx = train_ds.get_batch(idx, augment_gen)  # ids travel with x
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            ce, traj, logits = stepper(x, y, idx, epoch)
            scheduler.step()
            hits = (logits.argmax(1) == y).sum().to(ce.dtype)
            sums += torch.stack([ce * len(y), hits, ce.new_tensor(len(y))])
            trajs.append(traj)
            sizes.append(len(y))
        traj_sum = (
            torch.dot(torch.stack(trajs).to(sums.dtype), sums.new_tensor(sizes))
            if trajs
            else sums.new_zeros(())
        )
        sums = torch.stack([sums[0], traj_sum, sums[1], sums[2]])  # synced once, below
        sums = dist.all_reduce(sums)  # all ranks' sums
        ce_m, traj_m, acc = (sums[:3] / sums[3]).tolist()  # the one host sync of the epoch
        n = sums[3].item()
        train_s = time.perf_counter() - t0
        test_loss, test_acc = evaluate(net, test_ds, device)
        if not all(map(math.isfinite, (ce_m, traj_m, test_loss))):
            last = runs.checkpoint_path(run_dir, epoch)
            raise TrainingDiverged(
                f"training diverged: non-finite loss in epoch {epoch + 1} (train ce={ce_m}, "
                f"traj={traj_m}, test={test_loss}); last good checkpoint: {last}; "
                "try a smaller --lr"
            )
        seconds = time.perf_counter() - t0
        rows.append(
            dict(epoch=epoch + 1, train_ce=ce_m, traj_loss=traj_m, train_loss=ce_m + traj_m,
                 train_acc=acc, test_loss=test_loss, test_acc=test_acc,
                 lr=scheduler.get_last_lr()[0], seconds=seconds, images_per_s=n / train_s)
        )  # fmt: skip
        if cfg.progress and dist.rank == 0:
            tqdm.write(
                f"{desc}: ce {ce_m:.4f} traj {traj_m:.4f} acc {acc:.3f} "
                f"test {test_acc:.3f} ({seconds:.1f}s)"
            )
        if dist.rank == 0:  # checkpoint first, then metrics, then the resume state
            runs.save_checkpoint(run_dir, epoch + 1, net)
            runs.write_metrics(run_dir, rows)
            runs.save_state(run_dir, _state(epoch + 1, rows, *parts))
    return run_dir


def _config_and_state(config: TrainConfig, resume: bool) -> tuple[TrainConfig, dict | None]:
    """The validated config and the resume state (None: start from epoch 0)."""
    run_dir = config.run_dir
    if not resume:
        if (run_dir / "run.json").exists() or (run_dir / "state.pt").exists():
            raise ValueError(
                f"{run_dir} already holds a run; pass --resume to continue it "
                "or choose another --out"
            )
        return config.validate(), None
    saved = _saved_config(runs.read_run(run_dir), run_dir)
    over = {"out": str(run_dir), "device": config.device, "progress": config.progress}
    # killed after run.json but before the first state.pt: nothing trained, start over
    state = runs.load_state(run_dir) if (run_dir / "state.pt").exists() else None
    return TrainConfig(**{**saved, **over}).validate(), state


def _datasets(cfg: TrainConfig, device) -> tuple[IndexedDataset, IndexedDataset]:
    """Train set (a fixed class-balanced subset when ``cfg.limit``) and test set."""
    train_ds = load_dataset(cfg.data, "train", cfg.data_dir, augment=cfg.augment)
    if cfg.limit is not None:
        keep = _balanced(train_ds.y, train_ds.num_classes, cfg.limit)
        x, y = train_ds.x[keep], train_ds.y[keep]
        train_ds = IndexedDataset(x, y, train_ds.num_classes, train_ds.augment)
    test_ds = load_dataset(cfg.data, "test", cfg.data_dir)
    if torch.device(cfg.device).type == "cuda":  # in-memory sets live on the GPU
        return train_ds.to(device), test_ds.to(device)
    return train_ds, test_ds


def _optimizer(cfg: TrainConfig, model, hp: dict) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay; wrapped by SAM for sam/asam.

    ``foreach=True`` on every device: on CPU PyTorch would pick its slower per-tensor loop.
    """
    kw = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    if cfg.method in ("sam", "asam"):
        adaptive = cfg.method == "asam"
        return SAM(model.parameters(), torch.optim.SGD, rho=hp["rho"], adaptive=adaptive, **kw)
    return torch.optim.SGD(model.parameters(), **kw)


def _restore(state, device, optimizer, scheduler, store, ema, sampler_gen, augment_gen) -> None:
    """Load the resume state written by :func:`_state` (weights are loaded separately)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if store is not None:
        store.load_state_dict(state["store"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    sampler_gen.set_state(state["rng"]["sampler"])
    augment_gen.set_state(state["rng"]["augment"])
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)


def _state(epoch, rows, optimizer, scheduler, store, ema, sampler_gen, augment_gen) -> dict:
    """The resume state: plain tensors, dicts, lists and numbers (weights_only-loadable)."""
    return {
        "epoch": epoch,
        "metrics": rows,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "store": None if store is None else store.state_dict(),
        "ema": None if ema is None else ema.state_dict(),
        "rng": {
            "sampler": sampler_gen.get_state(),
            "augment": augment_gen.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        },
    }
