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
import torch.nn.functional as F
from torch import Tensor


def trajectory_loss(
    logits: Tensor,
    past_logits: Tensor,
    temperature: float,
    lam: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    r"""SAF trajectory loss :math:`\lambda\tau^2\,\frac1B\sum_i \mathrm{KL}(p_i^{past}\|p_i)`.

    .. math::
        p^{past}_i = \mathrm{softmax}(z^{past}_i/\tau),\quad p_i = \mathrm{softmax}(z_i/\tau)

    Args:
        logits: current logits ``z``, shape ``(B, C)`` (gradient flows into them).
        past_logits: logits of the same samples :math:`\tilde E` epochs ago, ``(B, C)``, any
            float dtype (detached and upcast to ``logits.dtype``).
        temperature: :math:`\tau > 0`.
        lam: :math:`\lambda` (0.3 for SAF, 0.8 for MESA in the paper).
        mask: optional bool ``(B,)``; rows with ``False`` contribute exactly 0. The mean is
            still over all ``B`` rows, so a valid sample's weight does not depend on how
            many of its batch-mates are masked.

    Returns:
        A scalar tensor.

    Reference: Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022, Eq. 8.

    >>> z = torch.tensor([[0.0, 0.0]])
    >>> float(trajectory_loss(z, z, temperature=5.0))  # same outputs: zero
    0.0
    >>> p = torch.tensor([[0.0, 5.0 * torch.log(torch.tensor(3.0))]])  # softmax(p/5)=(1/4,3/4)
    >>> round(float(trajectory_loss(z, p, temperature=5.0)), 4)  # 25*(3/4 ln3 - ln2)
    3.2703
    """
    t = float(temperature)
    past = past_logits.detach()
    if mask is not None:  # a masked row may hold anything (inf: an fp16 overflow); not NaN
        past = torch.where(mask.unsqueeze(1), past, 0.0)
    log_q = F.log_softmax(logits / t, dim=1)
    log_p = F.log_softmax(past.to(logits.dtype) / t, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    if mask is not None:
        kl = torch.where(mask, kl, 0.0)
    return kl.mean() * (lam * t * t)


@torch.no_grad()
def trajectory_loss_and_grad(
    logits: Tensor,
    past_logits: Tensor,
    temperature: float,
    lam: float = 1.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r""":func:`trajectory_loss` and its gradient with respect to ``logits``, in closed form.

    .. math::
        \frac{\partial L_{tra}}{\partial z_i} = \frac{\lambda\tau}{B}\,
        \big(\mathrm{softmax}(z_i/\tau) - \mathrm{softmax}(z^{past}_i/\tau)\big)

    (zero for masked rows). No autograd graph is built: the trainer passes the gradient to
    the backward pass as a second root (``torch.autograd.backward((ce, z), (None, grad))``).

    A masked row's target is replaced by the row itself, so its KL and gradient are exactly
    zero whatever the store held there. Both sides go through one ``log_softmax``: inside a
    CPU training step every small kernel costs ~20 us (cold caches after the convolutions),
    so the kernel count, not the arithmetic, is SAF's cost (``benchmarks/train_cost.py``).

    Returns:
        ``(loss, grad)``: the same scalar as :func:`trajectory_loss` and a tensor shaped
        like ``logits``.

    >>> z = torch.tensor([[0.0, 0.0]])
    >>> p = torch.tensor([[0.0, 5.0 * torch.log(torch.tensor(3.0))]])  # softmax(p/5)=(1/4,3/4)
    >>> loss, g = trajectory_loss_and_grad(z, p, temperature=5.0)
    >>> round(float(loss), 4), [round(v, 5) for v in g[0].tolist()]  # 5*((1,1)/2-(1,3)/4)
    (3.2703, [1.25, -1.25])
    """
    t = float(temperature)
    past = past_logits if mask is None else torch.where(mask.unsqueeze(1), past_logits, logits)
    both = torch.cat([logits, past.to(logits.dtype)]).mul_(1.0 / t)
    log_qp = both.log_softmax(1)  # rows are independent: same row, same bits
    qp = log_qp.exp()
    (log_q, log_p), (q, p) = log_qp.chunk(2), qp.chunk(2)
    scale = lam * t / logits.shape[0]
    loss = torch.vdot(p.reshape(-1), (log_p - log_q).reshape(-1)) * (scale * t)
    return loss, (q - p).mul_(scale)


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
