r"""SAM and ASAM as a real ``torch.optim.Optimizer`` (Foret et al. 2021; Kwon et al. 2021).

One SAM step climbs to the worst point of a :math:`\rho`-ball, takes the gradient there and
applies it at the original weights:

.. math::
    \hat\epsilon = \rho\,\frac{T_w^2\,g}{\|T_w\,g\|_2},\qquad
    w \leftarrow \mathrm{base\_step}\big(w,\ \nabla L(w+\hat\epsilon)\big)

with :math:`T_w = I` for SAM and :math:`T_w = \mathrm{diag}(|w|)` for ASAM (``adaptive``).

Differences from the widely used public implementation (davda54/sam): ``state_dict`` holds
the base optimizer's state (momentum survives a resume), the weights are restored exactly
(copied back, not re-subtracted), and :func:`disable_running_stats` keeps BatchNorm running
statistics untouched on the second pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


class SAM(torch.optim.Optimizer):
    r"""Sharpness-Aware Minimization wrapping a base optimizer class.

    Args:
        params: parameters or parameter groups.
        base_optimizer: an optimizer *class*, e.g. ``torch.optim.SGD``; it is built on this
            optimizer's own ``param_groups``, so LR schedulers on SAM drive it.
        rho: radius :math:`\rho \ge 0` (0.05 for SAM; ~0.5 for ASAM on CIFAR).
        adaptive: ASAM (scale-invariant) perturbation.
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ...).

    Reference: Foret et al., "Sharpness-Aware Minimization", ICLR 2021; Kwon et al., "ASAM",
    ICML 2021.

    >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    >>> opt = SAM([w], torch.optim.SGD, rho=0.5, lr=0.1)
    >>> def closure():  # L = |w|^2 / 2, gradient w
    ...     opt.zero_grad(); loss = 0.5 * (w ** 2).sum(); loss.backward(); return loss
    >>> _ = opt.step(closure)  # eps = 0.5 * w/|w| = (0.3, 0.4); w -= 0.1 * (w + eps)
    >>> [round(v, 4) for v in w.tolist()]
    [2.67, 3.56]
    """

    def __init__(
        self, params, base_optimizer: type, rho: float = 0.05, adaptive=False, **base_kwargs
    ):
        if rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to :math:`w + \\hat\\epsilon` (remembering :math:`w`).

        The norm :math:`\\|T_w g\\|` is taken over all parameter groups together.
        """
        groups = []  # (group, params, T_w g) for groups with gradients
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                grads = [p.grad for p in ps]
                scaled = (
                    torch._foreach_mul(grads, torch._foreach_abs(ps))
                    if group["adaptive"]
                    else grads
                )
                groups.append((group, ps, scaled))
        norms = [n for _, _, scaled in groups for n in torch._foreach_norm(scaled)]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else None
        for group, ps, scaled in groups:
            for p in ps:
                self.state[p]["old_p"] = p.detach().clone()
            eps = (
                torch._foreach_mul(scaled, torch._foreach_abs(ps)) if group["adaptive"] else scaled
            )
            torch._foreach_add_(ps, torch._foreach_mul(eps, group["rho"] / (norm + 1e-12)))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore :math:`w` exactly, then take the base step with the perturbed gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.copy_(self.state[p].pop("old_p"))
        self.base_optimizer.step()
        self._opt_called = True  # tells an LR scheduler on SAM that a step was taken
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor] | None = None):  # type: ignore[override]
        """Full SAM step; ``closure`` must zero the grads, compute the loss and backward it.

        The closure is called twice: at :math:`w` and at :math:`w+\\hat\\epsilon`.
        Returns the loss at :math:`w`.
        """
        if closure is None:
            raise ValueError("SAM.step needs a closure (or call first_step/second_step)")
        closure = torch.enable_grad()(closure)
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict:
        """The base optimizer's state dict (momentum buffers, param groups incl. rho)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load into the base optimizer and share its (new) param groups again."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


@contextlib.contextmanager
def disable_running_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics but do not update running ones.

    Used around SAM's second (perturbed) forward pass. Sets ``track_running_stats=False``
    on every BatchNorm layer in training mode for the duration (running mean, variance and
    ``num_batches_tracked`` stay bitwise unchanged), then restores it.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in bns]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, s in zip(bns, saved, strict=True):
            m.track_running_stats = s
