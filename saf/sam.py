r"""SAM and ASAM as a real ``torch.optim.Optimizer`` (Foret et al. 2021; Kwon et al. 2021).

One SAM step climbs to the worst point of a :math:`\rho`-ball, takes the gradient there and
applies it at the original weights:

.. math::
    \hat\epsilon = \rho\,\frac{T_w^2\,g}{\|T_w\,g\|_2},\qquad
    w \leftarrow \mathrm{base\_step}\big(w,\ \nabla L(w+\hat\epsilon)\big)

with :math:`T_w = I` for SAM and :math:`T_w = \mathrm{diag}(|w| + \eta)` for ASAM
(``adaptive``; the ASAM paper's :math:`\eta = 0.01`, :math:`\rho = 0.5`). Each parameter
group may set its own ``adaptive`` and ``eta``: the trainer scales the weights of
convolutions and linear layers and leaves biases and normalization parameters unscaled,
as the ASAM reference code does for parameters that are not weights.

Differences from the widely used public implementation (davda54/sam): ``state_dict`` holds
the base optimizer's state (momentum survives a resume), the weights are restored exactly
(copied back, not re-subtracted), BatchNorm running statistics stay untouched on the second
pass (``model=``), and a ``GradScaler`` is supported.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn


class SAM(torch.optim.Optimizer):
    r"""Sharpness-Aware Minimization wrapping a base optimizer class.

    Two ways to step, both with BatchNorm running statistics frozen on the second pass when
    ``model`` is given:

    * ``first_step`` / ``second_step`` around your own second forward-backward;
    * ``step(closure)``. If the gradients at :math:`w` are already there (the loop of
      davda54/sam: ``loss.backward(); opt.step(closure)``), the closure runs once, at
      :math:`w+\hat\epsilon`; otherwise it runs at :math:`w` first. Either way a step
      costs two passes.

    Mixed precision: pass the ``GradScaler`` to both steps. :math:`\hat\epsilon` depends on
    the gradient's direction only, so ``first_step`` needs no unscaling; ``second_step``
    restores :math:`w` and calls ``scaler.step(sam)``, so you may ``scaler.unscale_(sam)``
    and clip between the second backward and ``second_step``. A step whose first or second
    gradient is not finite is skipped and the scale lowered at ``scaler.update()``::

        scaler.scale(loss_fn(model(x), y)).backward()
        sam.first_step(zero_grad=True, scaler=scaler)
        scaler.scale(loss_fn(model(x), y)).backward()
        scaler.unscale_(sam)                                 # optional: clipping
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        sam.second_step(zero_grad=True, scaler=scaler)
        scaler.update()

    Gradient accumulation works when both passes see the same micro-batches: accumulate
    them all before ``first_step``, then all again before ``second_step``. SAM counts the
    backward passes into the gradients and refuses (``ValueError``, weights restored, no
    step) a step whose two gradients came from different numbers of passes, e.g.
    ``step(closure)`` after an accumulated gradient, where the closure recomputes one
    micro-batch only.

    Args:
        params: parameters or parameter groups.
        base_optimizer: an optimizer *class*, e.g. ``torch.optim.SGD``; it is built on this
            optimizer's own ``param_groups``, so LR schedulers on SAM drive it.
        rho: radius :math:`\rho \ge 0` (0.05 for SAM; 0.5 for ASAM on CIFAR).
        adaptive: ASAM (scale-invariant) perturbation.
        eta: ASAM's :math:`\eta` in :math:`T_w = |w| + \eta` (0.01 in the ASAM paper).
        model: the module whose BatchNorm statistics the second pass must not update.
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
        self,
        params,
        base_optimizer: type,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        model: nn.Module | None = None,
        **base_kwargs,
    ):
        if rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}")
        if eta < 0:
            raise ValueError(f"ASAM eta must be >= 0, got {eta}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eta=eta, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.model = model
        # Step state lives in one dict mutated in place: wrappers that copy the optimizer's
        # __dict__ (Lightning's LightningOptimizer) then share it with the original.
        self._sam: dict = {"frozen": [], "skip": False, "pending": False, "at_w": 0}
        self._hooks = _count_backward_passes(self)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler=None) -> None:
        r"""Move to :math:`w + \hat\epsilon` (remembering :math:`w`); freeze BatchNorm.

        The norm :math:`\|T_w g\|` is taken over all parameter groups together.
        """
        if self._perturbed():
            raise ValueError("SAM.first_step called twice: call second_step (or step()) between")
        self._sam["at_w"] = self._take_passes()
        groups = []  # (group, params, T_w, T_w g) for groups with gradients
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                grads = [p.grad for p in ps]
                t = None
                if group.get("adaptive"):
                    t = torch._foreach_abs(ps)
                    if group.get("eta"):
                        torch._foreach_add_(t, group["eta"])
                groups.append((group, ps, t, grads if t is None else torch._foreach_mul(grads, t)))
        norms = [n for *_, scaled in groups for n in torch._foreach_norm(scaled)]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else None
        skip = scaler is not None and norm is not None and not bool(norm.isfinite())
        self._sam.update(skip=skip, pending=True)
        for group, ps, t, scaled in groups:
            for p in ps:
                self.state[p]["old_p"] = p.detach().clone()
            if skip:  # inf/NaN gradients under a GradScaler: this step is skipped
                continue
            eps = scaled if t is None else torch._foreach_mul(scaled, t)
            torch._foreach_add_(ps, torch._foreach_mul(eps, group["rho"] / (norm + 1e-12)))
        self._freeze_batchnorm()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler=None) -> None:
        r"""Restore :math:`w` exactly, then take the base step with the perturbed gradient.

        Raises:
            ValueError: the gradients at :math:`w` and at :math:`w+\hat\epsilon` came from
                different numbers of backward passes (weights restored, no step taken).
        """
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.copy_(self.state[p].pop("old_p"))
        self._unfreeze_batchnorm()
        at_w, here = self._sam["at_w"], self._take_passes()
        if at_w and here and at_w != here:
            self._sam["pending"] = False
            raise ValueError(
                f"SAM: the gradient at w came from {at_w} backward passes and the one at "
                f"w + eps from {here}; with gradient accumulation run the same micro-batches "
                f"before first_step and before second_step (or accumulate inside the closure)"
            )
        if scaler is None:
            self.base_optimizer.step()
        else:
            if self._sam["skip"]:  # the first gradient was not finite: the scaler must skip
                _poison(self.param_groups)
            scaler.step(self)  # unscales (unless you did) and calls self.step(): the base step
        self._sam["pending"] = False
        self._opt_called = True  # tells an LR scheduler on SAM that a step was taken
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor] | None = None):  # type: ignore[override]
        r"""Full SAM step: ``closure`` computes the loss and calls ``backward`` on it.

        Returns the loss at :math:`w` (at :math:`w+\hat\epsilon` when the gradients at
        :math:`w` were already computed before the call). The gradients are cleared after.

        After :meth:`first_step` (weights at :math:`w+\hat\epsilon`, their gradient
        computed), ``step()`` or ``step(closure)`` finishes the step instead: the closure, if
        any, runs once, then :meth:`second_step`. This is the step a framework calls after
        its own clipping (the Hugging Face ``Trainer``, Lightning's manual optimization).
        """
        if self._perturbed():
            result = None if closure is None else torch.enable_grad()(closure)()
            self.second_step()
            return result
        if closure is None:
            if self._sam["pending"]:  # second_step's scaler.step(sam): the base step itself
                return self.base_optimizer.step()
            raise ValueError("SAM.step needs a closure (or call first_step/second_step)")
        closure = torch.enable_grad()(closure)
        have = any(
            p.grad is not None and bool(p.grad.any())
            for g in self.param_groups
            for p in g["params"]
        )
        loss = None if have else closure()
        self.first_step(zero_grad=True)
        second = closure()
        self.second_step(zero_grad=True)  # cleared: the next call sees whether you computed them
        return second if loss is None else loss

    def _perturbed(self) -> bool:
        """Whether the weights sit at w + eps (a first_step not yet followed by second_step)."""
        return any("old_p" in s for s in self.state.values())

    def _take_passes(self) -> int:
        """Backward passes into the gradients since the last call (the most any parameter saw)."""
        passes, grads = self._sam["passes"], self._sam["grads"]
        n = max(passes, default=0)
        passes[:], grads[:] = [0] * len(passes), [None] * len(grads)  # in place: shared lists
        return n

    def _freeze_batchnorm(self) -> None:
        frozen = self._sam["frozen"]
        if self.model is not None and not frozen:
            frozen[:] = [(m, m.track_running_stats) for m in _batchnorms(self.model)]
            for m, _ in frozen:
                m.track_running_stats = False

    def _unfreeze_batchnorm(self) -> None:
        frozen = self._sam["frozen"]
        for m, flag in frozen:
            m.track_running_stats = flag
        frozen.clear()

    def state_dict(self) -> dict:
        """The base optimizer's state dict (momentum buffers, param groups incl. rho)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load into the base optimizer and share its (new) param groups again."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


def _count_backward_passes(sam: SAM) -> list:
    """Post-accumulate-grad hooks that count the backward passes accumulated into each
    parameter's current ``.grad`` (a new gradient tensor, after any ``zero_grad`` that sets
    them to None, starts again at 1). ``sam`` is held weakly: a discarded optimizer leaves
    no-op hooks, not a live reference."""
    ref = weakref.ref(sam)
    params = [p for g in sam.param_groups for p in g["params"] if p.requires_grad]
    sam._sam.update(passes=[0] * len(params), grads=[None] * len(params))

    def hook(i):
        def count(p):
            s = ref()
            if s is None:
                return
            passes, grads = s._sam["passes"], s._sam["grads"]
            if grads[i] is not None and grads[i]() is p.grad:
                passes[i] += 1
            else:
                passes[i], grads[i] = 1, weakref.ref(p.grad)

        return count

    return [p.register_post_accumulate_grad_hook(hook(i)) for i, p in enumerate(params)]


def _poison(groups: list) -> None:
    """An inf in one gradient, so that ``GradScaler.step`` skips the step and lowers the
    scale as for any overflow."""
    p = next((p for g in groups for p in g["params"] if p.grad is not None), None)
    if p is not None:
        p.grad.view(-1)[:1].fill_(float("inf"))


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def disable_running_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics but do not update running ones.

    Used around SAM's second (perturbed) forward pass. Sets ``track_running_stats=False``
    on every BatchNorm layer in training mode for the duration (running mean, variance and
    ``num_batches_tracked`` stay bitwise unchanged), then restores it.
    """
    bns = _batchnorms(model)
    saved = [m.track_running_stats for m in bns]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, s in zip(bns, saved, strict=True):
            m.track_running_stats = s
