"""The training loop: SGD, SAM, ASAM, SAF and MESA in one loop, on one data order.

Reads top to bottom: configuration, setup (data, model, optimizer, schedule, trajectory
loss), resume, then the epoch loop (train, evaluate, checkpoint). Each step is a
:class:`saf.Stepper`, built on the same drop-in classes a loop of your own uses
(:class:`saf.SAFLoss`, :class:`saf.MESALoss`, :class:`saf.SAM`). See :mod:`saf.runs` for
what a run directory holds.

Determinism. The model is initialised from ``torch.manual_seed(seed)``; the data order
comes from a dedicated generator seeded with ``seed`` (and augmentation from another), so
every method sees the same batches in the same order for a given seed. On CPU a run is
bitwise reproducible, and ``train(cfg, resume=True)`` after an interruption ends bitwise
equal to an uninterrupted run: all RNG states are saved at epoch boundaries.

Under ``torchrun`` each global batch is split over the ranks and each rank's loss is
weighted by its share of the batch, so an unevenly split batch still gives the global mean
(the same result as one process, to float rounding; BatchNorm statistics stay per rank
unless ``sync_bn``).

Hot path. Per-step metrics stay on the device and are synchronised once per epoch.
A non-finite epoch loss stops training (:class:`TrainingDiverged`); the checkpoints of the
epochs before it are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from analysis.batches import batch_mean, loss_and_accuracy, model_mode
from analysis.distributed import all_reduce_sum, init_from_env, local_device
from analysis.io import exclusive
from analysis.rng import generator
from saf import _setup, runs
from saf.config import TrainConfig, TrainingDiverged, describe_run, is_spec
from saf.methods import Stepper

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


def train(
    config: TrainConfig,
    resume: bool = False,
    epochs: int | None = None,
    *,
    model_factory: Callable[..., nn.Module] | None = None,
    dataset_fn: Callable[[str], Any] | None = None,
) -> Path:
    """Train one run and write its run directory; returns the run directory.

    Args:
        config: the run's configuration. With ``resume=True`` only ``out`` (the run
            directory), ``device``, ``threads`` and ``progress`` are used; the rest comes
            from its ``run.json``.
        resume: continue an interrupted run from its ``state.pt``.
        epochs: with ``resume``, train to this many epochs instead (extends the run; the
            cosine schedule is stretched to the new length from the current step on).
        model_factory: your own model, when ``config.model`` names it (``pkg.mod:fn``):
            called with ``num_classes`` and ``in_shape`` if it takes them, plus
            ``config.model_kwargs``.
        dataset_fn: your own data, when ``config.data`` names it: ``dataset_fn(split)``
            returns a map-style data set of ``(x, y)`` items for ``"train"`` and ``"test"``.

    Raises:
        ValueError: bad configuration, an existing run directory without ``resume``, or
            nothing to resume.
        TrainingDiverged: the loss became NaN/Inf (checkpoints so far are kept).
    """
    if not resume:
        config.validate()  # bad input: one line, nothing written (not even the lock)
    elif not (config.run_dir / "run.json").is_file():
        raise ValueError(f"{config.run_dir}: nothing to resume (no run.json)")
    run_dir, rank0 = config.run_dir, int(os.environ.get("RANK", "0")) == 0
    new = not run_dir.exists()
    lock = exclusive(run_dir / ".lock", run_dir) if rank0 else contextlib.nullcontext()
    try:
        with lock:  # one writer per run directory
            return _train(config, resume, epochs, model_factory, dataset_fn)
    except BaseException:
        if new and rank0 and not (run_dir / "run.json").exists():  # refused before any write
            (run_dir / ".lock").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise


def _train(config, resume, epochs, model_factory, dataset_fn) -> Path:
    cfg, saved = _config_and_state(config, resume, epochs)
    run_dir = cfg.run_dir
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    rank, world = init_from_env(cfg.device)
    if cfg.batch_size < 2 * world:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is split over {world} ranks: give at least "
            f"{2 * world} (BatchNorm needs two samples on each rank)"
        )
    device = torch.device(local_device(cfg.device) if world > 1 else cfg.device)
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices (SyncBatchNorm runs on GPUs only)")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the RNG state saved for resume is this device's

    # --- data, model, optimizer, schedule, trajectory loss -----------------------------------
    if is_spec(cfg.model) != (model_factory is not None) or (
        is_spec(cfg.data) != (dataset_fn is not None)
    ):
        raise ValueError(
            "a model or data set named as code (pkg.mod:fn) needs its callable: pass "
            "model_factory / dataset_fn (on the command line: --model / --data)"
        )
    train_ds, test_ds = _setup.datasets(cfg, device, dataset_fn)
    sampler_gen = torch.Generator().manual_seed(cfg.seed)  # the data order: same for all methods
    augment_gen = generator(cfg.seed, "augment")  # not seed + 1: that is the next seed's order
    steps = steps_per_epoch(len(train_ds), cfg.batch_size, world)
    hp = cfg.resolved(steps, device)
    torch.manual_seed(cfg.seed)
    net = _setup.model(cfg, train_ds, model_factory)
    if cfg.sync_bn and world > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(device)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    optimizer = _setup.optimizer(cfg, net, hp)
    total, warmup = steps * cfg.epochs, steps * cfg.warmup_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _setup.cosine(total, warmup))
    traj = _setup.trajectory(cfg, hp, net, train_ds, device, world)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    stepper = Stepper(cfg.method, model, optimizer, traj, criterion=criterion,
                      autocast=_setup.autocast(hp, device), clip_grad=cfg.clip_grad,
                      sam_local_eps=cfg.sam_local_eps)  # fmt: skip
    monitor = (
        _setup.monitor(cfg, net, train_ds, criterion, optimizer, device) if rank == 0 else None
    )
    parts = (net, optimizer, scheduler, traj, sampler_gen, augment_gen, monitor)

    # --- fresh start or resume ------------------------------------------------------------------
    if saved is None:
        rows, first_epoch = [], 0
        if rank == 0:
            runs.write_run(run_dir, describe_run(cfg, hp, train_ds))
            runs.save_checkpoint(run_dir, 0, net)
            runs.save_state(run_dir, _setup.state(0, rows, *parts))
    else:
        first_epoch, rows = int(saved["epoch"]), list(saved["metrics"])
        if "model" not in saved:  # written before the weights moved into state.pt
            saved["model"] = runs.safe_torch_load(runs.checkpoint_path(run_dir, first_epoch))
        try:
            _setup.restore(saved, device, *parts)
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(f"{run_dir / 'state.pt'}: cannot resume from it ({why})") from None
        if not all(t.isfinite().all() for t in net.state_dict().values() if t.is_floating_point()):
            raise ValueError(f"{run_dir / 'state.pt'}: its weights are NaN/Inf; nothing to resume")

    # --- the epoch loop -------------------------------------------------------------------------
    # each rank's loss weight: its share of the global batch (1 when the batch splits evenly)
    sizes = [min(cfg.batch_size, len(train_ds) - k * cfg.batch_size) for k in range(steps)]
    model.train()
    for epoch in range(first_epoch, cfg.epochs):
        t0 = time.perf_counter()
        sums = torch.zeros(3, device=device)  # ce*b, correct, samples
        trajs, lens = [], []  # per step, summed once at the end of the epoch
        batches = epoch_batches(len(train_ds), cfg.batch_size, sampler_gen, rank, world)
        desc = f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}"
        bar = tqdm(batches, desc, leave=False, disable=not cfg.progress or rank > 0)
        for k, idx in enumerate(bar):
            x, y, idx = train_ds.get_batch(idx, augment_gen)  # ids travel with x
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            ce, tl, logits = stepper(x, y, idx, epoch, world * len(y) / sizes[k])
            scheduler.step()
            if monitor is not None:  # RUN_DIR/sharpness.csv; the run's bits are unchanged
                monitor.step(epoch * steps + k + 1, epoch)
            hits = (logits.argmax(1) == y).sum().to(ce.dtype)
            sums += torch.stack([ce * len(y), hits, ce.new_tensor(len(y))])
            trajs.append(tl)
            lens.append(len(y))
        traj_sum = (
            torch.dot(torch.stack(trajs).to(sums.dtype), sums.new_tensor(lens))
            if trajs
            else sums.new_zeros(())
        )
        sums = torch.stack([sums[0], traj_sum, sums[1], sums[2]])  # synced once, below
        sums = all_reduce_sum(sums, world > 1)  # all ranks' sums
        ce_m, traj_m, acc = (sums[:3] / sums[3]).tolist()  # the one host sync of the epoch
        n = sums[3].item()
        train_s = time.perf_counter() - t0
        test_loss, test_acc = evaluate(net, test_ds, device)
        if not all(map(math.isfinite, (ce_m, traj_m, test_loss))):
            raise TrainingDiverged(
                f"training diverged: non-finite loss in epoch {epoch + 1} (train ce={ce_m}, "
                f"traj={traj_m}, test={test_loss}); last good checkpoint: "
                f"{runs.list_checkpoints(run_dir)[-1][1]}; try a smaller --lr"
            )
        seconds = time.perf_counter() - t0
        rows.append(
            dict(epoch=epoch + 1, train_ce=ce_m, traj_loss=traj_m, train_loss=ce_m + traj_m,
                 train_acc=acc, test_loss=test_loss, test_acc=test_acc,
                 lr=scheduler.get_last_lr()[0], seconds=seconds, images_per_s=n / train_s)
        )  # fmt: skip
        if cfg.progress and rank == 0:
            tqdm.write(
                f"{desc}: ce {ce_m:.4f} traj {traj_m:.4f} acc {acc:.3f} "
                f"test {test_acc:.3f} ({seconds:.1f}s)"
            )
        if rank == 0:  # checkpoint first, then metrics, then the resume state
            if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
                runs.save_checkpoint(run_dir, epoch + 1, net)
            runs.write_metrics(run_dir, rows)
            runs.save_state(run_dir, _setup.state(epoch + 1, rows, *parts))
    return run_dir


def _config_and_state(
    config: TrainConfig, resume: bool, epochs: int | None
) -> tuple[TrainConfig, dict | None]:
    """The validated config and the resume state (None: start from epoch 0)."""
    run_dir = config.run_dir
    if not resume:
        if (run_dir / "run.json").exists() or (run_dir / "state.pt").exists():
            raise ValueError(
                f"{run_dir} already holds a run; pass --resume to continue it "
                "or choose another --out"
            )
        return config.validate(), None
    run = runs.read_run(run_dir, custom_ok=True)
    saved = _saved_config(run, run_dir)
    # the schedule of the trajectory loss and the EMA stay as they were applied
    hp = run["hparams"]
    frozen = {k: hp[k] for k in ("lag", "start_epoch", "ema_decay") if hp.get(k) is not None}
    over = {"out": str(run_dir), "device": config.device, "progress": config.progress,
            **frozen}  # fmt: skip
    if config.threads is not None:  # else the run's own (another count changes the bits)
        over["threads"] = config.threads
    # killed after run.json but before the first state.pt: nothing trained, start over
    state = runs.load_state(run_dir) if (run_dir / "state.pt").exists() else None
    need = {"epoch", "metrics", "optimizer", "scheduler", "rng"}
    if state is not None and not (
        isinstance(state, dict) and need <= set(state) and type(state["epoch"]) is int
        and 0 <= state["epoch"] <= saved["epochs"] and isinstance(state["metrics"], list)
    ):  # fmt: skip
        raise ValueError(
            f"{run_dir / 'state.pt'}: not a resume state of `saf train` (it needs {sorted(need)})"
        )
    if epochs is not None:
        done = int(state["epoch"]) if state else 0
        if epochs < max(done, 1):
            raise ValueError(f"{run_dir} has trained {done} epochs; --epochs {epochs} is fewer")
        over["epochs"] = epochs
    return TrainConfig(**{**saved, **over}).validate(), state


ADDED_LATER = {"track_sharpness": None, "probe_samples": 256}
"""Config fields newer than some run.json files, at defaults that leave training unchanged."""


def _saved_config(run: dict, run_dir: Path) -> dict:
    """``run.json``'s config, exactly this version's fields (a default filled in for a
    missing one would silently resume a different run)."""
    saved, known = run.get("config"), {f.name for f in dataclasses.fields(TrainConfig)}
    if isinstance(saved, dict):  # fields added later that do not change the training
        saved = {**ADDED_LATER, **saved}
    if not isinstance(saved, dict) or set(saved) != known:
        have = set(saved) if isinstance(saved, dict) else set()
        raise ValueError(
            f"{run_dir / 'run.json'}: cannot resume: config keys missing "
            f"{sorted(known - have)}, unknown {sorted(have - known)}"
        )
    return saved
