r"""The paper's methods and hyperparameters (Du et al., NeurIPS 2022, §4.1), and their
scaling to a shorter schedule."""

from __future__ import annotations

from saf.ema import scaled_ema_decay

METHODS = ("sgd", "sam", "asam", "saf", "mesa")

# The paper's hyperparameters (Du et al. 2022, §4.1) for its 200-epoch CIFAR schedule.
DEFAULT_LAM = {"saf": 0.3, "mesa": 0.8}
DEFAULT_TAU = 5.0
DEFAULT_LAG = 3
DEFAULT_START_EPOCH = 5
PAPER_EPOCHS = 200
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5}  # SAM paper; ASAM paper (CIFAR)
ASAM_ETA = 0.01  # ASAM paper: T_w = |w| + eta on the weights


def scaled_hparams(epochs: int, steps_per_epoch: int) -> dict:
    r"""The paper's SAF/MESA defaults scaled to a schedule of ``epochs`` epochs.

    The paper trains CIFAR for 200 epochs with :math:`E_{start}=5` and lag
    :math:`\tilde E=3`, and MESA's EMA uses :math:`\beta=0.9998` (horizon
    :math:`1/(1-\beta)=5000` steps, 6.4% of 200 epochs x 391 steps). We keep the same
    *fractions of the run*, rounded, with a floor of one epoch:

    .. math:: E_{start} = \max(1, \mathrm{round}(0.025\,E)),\quad
              \tilde E = \max(1, \mathrm{round}(0.015\,E)),\quad
              1/(1-\beta) = 0.064\,E\cdot\text{steps/epoch}

    (:func:`saf.ema.scaled_ema_decay`, capped at 0.9998). :math:`\lambda` (0.3 SAF, 0.8
    MESA), :math:`\tau=5` and SAM's :math:`\rho=0.05` are the paper's, unscaled.

    >>> h = scaled_hparams(200, 391)
    >>> h["start_epoch"], h["lag"], round(h["ema_beta"], 4)
    (5, 3, 0.9998)
    """
    return {
        "start_epoch": max(1, round(DEFAULT_START_EPOCH / PAPER_EPOCHS * epochs)),
        "lag": max(1, round(DEFAULT_LAG / PAPER_EPOCHS * epochs)),
        "ema_beta": scaled_ema_decay(steps_per_epoch, epochs),
        "saf_lambda": DEFAULT_LAM["saf"],
        "mesa_lambda": DEFAULT_LAM["mesa"],
        "tau": DEFAULT_TAU,
        "rho": DEFAULT_RHO["sam"],
    }
