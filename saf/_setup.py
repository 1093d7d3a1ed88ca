"""The trainer's parts: data sets, optimizer, schedule, mixed precision, resume state."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math

import torch
from torch import nn

from analysis import params_without_norm_and_bias
from analysis.monitor import SharpnessMonitor
from saf.api import MESALoss, SAFLoss
from saf.config import TrainConfig
from saf.data import MapDataset, balanced_subset, load_dataset
from saf.models import build_model
from saf.paper import ASAM_ETA
from saf.sam import SAM


def datasets(cfg: TrainConfig, device, dataset_fn=None):
    """Train set (a fixed class-balanced subset when ``cfg.limit``) and test set: ours by
    name, or ``dataset_fn(split)``'s map-style data sets (:class:`saf.data.MapDataset`)."""
    if dataset_fn is not None:
        train_ds = MapDataset(dataset_fn("train"))
        test_ds = MapDataset(dataset_fn("test"), train_ds.num_classes)
    else:
        train_ds = load_dataset(cfg.data, "train", cfg.data_dir, augment=cfg.augment)
        test_ds = load_dataset(cfg.data, "test", cfg.data_dir)
    if cfg.limit is not None:
        train_ds = train_ds.subset(balanced_subset(train_ds.y, train_ds.num_classes, cfg.limit))
    if torch.device(device).type == "cuda":  # in-memory sets live on the GPU
        return train_ds.to(device), test_ds.to(device)
    return train_ds, test_ds


def model(cfg: TrainConfig, train_ds, factory=None) -> nn.Module:
    """The run's model: ours by name, or ``factory`` (given ``num_classes`` and ``in_shape``
    when it takes them, and ``cfg.model_kwargs``)."""
    if factory is None:
        return build_model(cfg.model, train_ds.num_classes, train_ds.in_shape, **cfg.model_kwargs)
    params = inspect.signature(factory).parameters
    shape = {"num_classes": train_ds.num_classes, "in_shape": train_ds.in_shape}
    kwargs = {k: v for k, v in shape.items() if k in params} | dict(cfg.model_kwargs)
    net = factory(**kwargs)
    if not isinstance(net, nn.Module):
        raise ValueError(f"the model factory returned a {type(net).__name__}, not an nn.Module")
    return net


def param_groups(
    model: nn.Module, weight_decay: float, decay_norm_bias: bool, asam: bool = False
) -> list[dict]:
    r"""One group, or two: the weights of convolutions and linear layers, and the rest
    (biases, normalization). The rest gets no weight decay unless ``decay_norm_bias``, and
    for ASAM only the weights are scaled by :math:`|w| + \eta` (the ASAM paper's
    convention, :math:`\eta = 0.01`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if (decay_norm_bias or weight_decay == 0) and not asam:
        return [{"params": params, "weight_decay": weight_decay}]
    weights = {
        id(p) for n, p in model.named_parameters() if n in params_without_norm_and_bias(model)
    }
    rest_decay = weight_decay if decay_norm_bias else 0.0
    return [
        {"params": [p for p in params if id(p) in weights], "weight_decay": weight_decay,
         **({"adaptive": True, "eta": ASAM_ETA} if asam else {})},
        {"params": [p for p in params if id(p) not in weights], "weight_decay": rest_decay,
         **({"adaptive": False} if asam else {})},
    ]  # fmt: skip


def optimizer(cfg: TrainConfig, model: nn.Module, hp: dict) -> torch.optim.Optimizer:
    """SGD (momentum, optionally Nesterov) or AdamW; wrapped by SAM for sam/asam.

    ``foreach=True`` on every device: on CPU PyTorch would pick its slower per-tensor loop.
    """
    groups = param_groups(model, cfg.weight_decay, hp["decay_norm_bias"], cfg.method == "asam")
    if cfg.optimizer == "sgd":
        base, kw = torch.optim.SGD, dict(momentum=cfg.momentum, nesterov=cfg.nesterov)
    else:
        base, kw = torch.optim.AdamW, dict(betas=tuple(cfg.betas))
    kw.update(lr=cfg.lr, foreach=True)
    if cfg.method in ("sam", "asam"):
        return SAM(groups, base, rho=hp["rho"], model=model, **kw)
    return base(groups, **kw)


def cosine(total_steps: int, warmup_steps: int):
    """The LR factor at step ``t``: linear warm-up, then a cosine decay to zero."""

    def factor(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        return 0.5 * (
            1.0 + math.cos(math.pi * (t - warmup_steps) / max(1, total_steps - warmup_steps))
        )

    return factor


def autocast(hp: dict, device: torch.device):
    """A context-manager factory: bf16 autocast when ``amp`` applies, else a no-op."""
    if hp["amp"]:
        return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def trajectory(cfg: TrainConfig, hp: dict, net: nn.Module, train_ds, device, world: int):
    """The method's trajectory loss (:class:`SAFLoss` or :class:`MESALoss`), or None."""
    if cfg.method == "saf":
        return SAFLoss(len(train_ds), train_ds.num_classes, hp["lam"], hp["tau"], hp["lag"],
                       hp["start_epoch"], device=device, distributed=world > 1)  # fmt: skip
    if cfg.method == "mesa":
        return MESALoss(net, hp["ema_decay"], hp["lam"], hp["tau"], hp["start_epoch"])
    return None


def monitor(cfg: TrainConfig, net: nn.Module, train_ds, criterion, optimizer, device):
    """``RUN_DIR/sharpness.csv``: :class:`analysis.SharpnessMonitor` every
    ``cfg.track_sharpness`` steps on the first ``cfg.probe_samples`` training samples (not
    augmented), beside the optimizer's threshold; None when off."""
    if not cfg.track_sharpness:
        return None
    x, y, _ = train_ds.get_batch(torch.arange(min(cfg.probe_samples, len(train_ds))))
    return SharpnessMonitor(
        net, criterion, [(x.to(device), y.to(device))], cfg.track_sharpness,
        optimizer=optimizer, csv=cfg.run_dir / "sharpness.csv",
    )  # fmt: skip


def state(epoch, rows, net, optimizer, scheduler, traj, sampler_gen, augment_gen, monitor=None):
    """The resume state: plain tensors, dicts, lists and numbers (weights_only-loadable)."""
    return {
        "epoch": epoch,
        "metrics": rows,
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "store": traj.state_dict() if isinstance(traj, SAFLoss) else None,
        "ema": traj.state_dict() if isinstance(traj, MESALoss) else None,
        "sharpness": list(monitor.rows) if monitor is not None else None,
        "rng": {
            "sampler": sampler_gen.get_state(),
            "augment": augment_gen.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        },
    }


def restore(
    saved, device, net, optimizer, scheduler, traj, sampler_gen, augment_gen, monitor=None
) -> None:
    """Load the resume state written by :func:`state`."""
    if monitor is not None:  # the rows so far; Lanczos starts cold once after a resume
        monitor.rows = list(saved.get("sharpness") or [])
    net.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if traj is not None:
        traj.load_state_dict(saved["store" if isinstance(traj, SAFLoss) else "ema"])
    sampler_gen.set_state(saved["rng"]["sampler"])
    augment_gen.set_state(saved["rng"]["augment"])
    torch.set_rng_state(saved["rng"]["torch"])
    if device.type == "cuda" and saved["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
