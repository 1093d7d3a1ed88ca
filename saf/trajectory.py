r"""SAF's trajectory loss and the fp16 ring buffer of past outputs (Du et al., NeurIPS 2022).

The trajectory loss (Eq. 8 of arXiv 2205.14083, as the public code computes it, with the
:math:`\tau^2` factor of knowledge distillation) penalises the change of each sample's
softened output over the last :math:`\tilde E` epochs:

.. math::
    L_{tra} = \frac{\lambda\tau^2}{B}\sum_{i=1}^{B} \mathrm{KL}\Big(
        \mathrm{softmax}(z_i^{(e-\tilde E)}/\tau)\,\Big\|\,\mathrm{softmax}(z_i/\tau)\Big)

The target :math:`z_i^{(e-\tilde E)}` carries no gradient. It costs no extra forward pass:
the logits of the ordinary forward pass are stored and read back :math:`\tilde E` epochs
later by :class:`OutputStore`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from analysis.memory import fits


def trajectory_loss(
    logits: Tensor,
    past_logits: Tensor,
    temperature: float,
    lam: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    r"""SAF trajectory loss :math:`\lambda\tau^2\,\frac1B\sum_i \mathrm{KL}(p_i^{past}\|p_i)`,
    with its gradient in closed form.

    .. math::
        p^{past}_i = \mathrm{softmax}(z^{past}_i/\tau),\quad p_i = \mathrm{softmax}(z_i/\tau),
        \qquad \frac{\partial L_{tra}}{\partial z_i} = \frac{\lambda\tau}{B}\,
        \big(p_i - p^{past}_i\big)

    The loss is an ordinary autograd scalar: add it to the cross-entropy and call
    ``backward`` (a ``GradScaler``'s scale reaches it like any loss). Its backward is the
    closed form above, computed once in the forward: no autograd graph is built for the
    softmaxes. The target carries no gradient.

    Args:
        logits: current logits ``z``, shape ``(B, C)``; fp16/bf16 (autocast) is computed
            in float32.
        past_logits: logits of the same samples :math:`\tilde E` epochs ago, ``(B, C)``, any
            float dtype (detached).
        temperature: :math:`\tau > 0`.
        lam: :math:`\lambda` (0.3 for SAF, 0.8 for MESA in the paper).
        mask: optional bool ``(B,)``; rows with ``False`` contribute exactly 0 to the loss
            and its gradient, whatever their target holds (even inf). The mean is still
            over all ``B`` rows, so a valid sample's weight does not depend on how many of
            its batch-mates are masked.

    Returns:
        A 0-d tensor (float32, or the logits' dtype when wider).

    Reference: Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022, Eq. 8.

    >>> z = torch.tensor([[0.0, 0.0]], requires_grad=True)
    >>> trajectory_loss(z, z, temperature=5.0).item()  # same outputs: zero
    0.0
    >>> p = torch.tensor([[0.0, 5.0 * torch.log(torch.tensor(3.0))]])  # softmax(p/5)=(1/4,3/4)
    >>> loss = trajectory_loss(z, p, temperature=5.0)
    >>> loss.backward()
    >>> round(loss.item(), 4), [round(v, 5) for v in z.grad[0].tolist()]  # 25(3/4 ln3 - ln2)
    (3.2703, [1.25, -1.25])
    """
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _TrajectoryLoss.apply(logits, past_logits.detach(), t, float(lam), mask)


class _TrajectoryLoss(torch.autograd.Function):
    """Loss value and closed-form gradient of :func:`trajectory_loss`, both in the forward."""

    @staticmethod
    def forward(ctx, logits, past, t, lam, mask):
        z = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
        past = past.to(z.dtype)
        if mask is not None:  # a masked row's target is the row itself: zero loss and gradient
            past = torch.where(mask.unsqueeze(1), past, z)
        log_qp = torch.cat([z, past]).mul_(1.0 / t).log_softmax(1)  # rows are independent
        (log_q, log_p), (q, p) = log_qp.chunk(2), log_qp.exp().chunk(2)
        scale = lam * t / z.shape[0]
        ctx.save_for_backward((q - p).mul_(scale))
        ctx.logits_dtype = logits.dtype
        return torch.vdot(p.reshape(-1), (log_p - log_q).reshape(-1)) * (scale * t)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.logits_dtype), None, None, None, None


class OutputStore:
    r"""Ring buffer of each sample's logits for the last ``lag`` epochs (fp16 by default).

    Slot ``e % lag`` holds the logits of epoch ``e - lag`` until epoch ``e`` reads it and
    then overwrites it (:meth:`read`, then :meth:`write`), so exactly ``lag`` slots suffice:
    ``2 * lag`` bytes per sample per class in fp16 (6 at :math:`\tilde E=3`; the reference
    code keeps 4 fp32 slots, 16 bytes).

    **Never-written rows.** Besides the logits, each slot keeps the epoch that wrote each
    row (int32, 4 bytes per sample per slot, initialised to INT32_MIN). :meth:`read` returns a
    mask that is ``True`` only where the row was written exactly at epoch ``e - lag``; a
    row never written (or stale, e.g. a sample skipped in that epoch) is masked out and
    contributes zero loss, instead of acting as a uniform target (zeros) or as another
    epoch's output.

    Args:
        num_samples: data set size (row ``i`` belongs to sample ``i``).
        num_classes: logits per sample.
        lag: :math:`\tilde E \ge 1`.
        dtype: storage dtype (``torch.float16`` by default).
        device: where the buffer lives (the training device: no host round trip).

    >>> s = OutputStore(4, 2, lag=1)
    >>> s.nbytes_per_sample_per_class
    2
    >>> z, m = s.read(torch.tensor([0, 1]), epoch=1)
    >>> m.tolist()  # nothing written yet
    [False, False]
    >>> s.write(torch.tensor([1]), torch.tensor([[1.0, 2.0]]), epoch=1)
    >>> z, m = s.read(torch.tensor([0, 1]), epoch=2)
    >>> m.tolist(), z[1].tolist()
    ([False, True], [1.0, 2.0])
    """

    def __init__(self, num_samples, num_classes, lag, dtype=torch.float16, device="cpu"):
        if lag < 1 or num_samples < 1 or num_classes < 1:
            raise ValueError(
                f"OutputStore needs lag, num_samples, num_classes >= 1; got "
                f"{lag}, {num_samples}, {num_classes}"
            )
        self.lag = int(lag)
        itemsize = torch.empty((), dtype=dtype).element_size()
        fits(
            lag * num_samples * (num_classes * itemsize + 4),
            f"the SAF store ({num_samples} samples x {num_classes} classes x lag {lag})",
            device,
            hint="lower the lag (--saf-lag)",
        )
        self.logits = torch.zeros(lag, num_samples, num_classes, dtype=dtype, device=device)
        never = torch.iinfo(torch.int32).min  # never equals epoch - lag for epoch >= 0
        self.epoch_of = torch.full((lag, num_samples), never, dtype=torch.int32, device=device)
        # one view per slot, made once (load_state_dict copies in place, so they stay valid)
        self._slots = list(zip(self.logits.unbind(0), self.epoch_of.unbind(0), strict=True))

    @property
    def nbytes_per_sample_per_class(self) -> int:
        """Bytes of logits storage per sample per class (``lag * itemsize``)."""
        return self.lag * self.logits.element_size()

    @property
    def nbytes(self) -> int:
        """Total bytes held (logits plus the int32 epoch tags)."""
        return sum(t.numel() * t.element_size() for t in (self.logits, self.epoch_of))

    def read(self, idx: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        """Logits of samples ``idx`` from epoch ``epoch - lag``, and their validity mask."""
        logits, epoch_of = self._slots[epoch % self.lag]
        return logits.index_select(0, idx), epoch_of.index_select(0, idx) == (epoch - self.lag)

    def write(self, idx: Tensor, logits: Tensor, epoch: int) -> None:
        """Store epoch ``epoch``'s logits of samples ``idx`` (detached, cast to the dtype)."""
        slot_logits, slot_epoch = self._slots[epoch % self.lag]
        slot_logits.index_copy_(0, idx, logits.detach().to(slot_logits.dtype))
        slot_epoch.index_fill_(0, idx, epoch)

    def state_dict(self) -> dict:
        """Plain tensors (``weights_only``-loadable)."""
        return {"logits": self.logits, "epoch_of": self.epoch_of, "lag": self.lag}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (shapes must match)."""
        if state["logits"].shape != self.logits.shape:
            raise ValueError(
                f"store shape {tuple(state['logits'].shape)} does not match "
                f"{tuple(self.logits.shape)} (different data set, classes or lag?)"
            )
        self.logits.copy_(state["logits"])
        self.epoch_of.copy_(state["epoch_of"])
