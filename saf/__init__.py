"""SAF: Sharpness-Aware Training for Free (Du et al., NeurIPS 2022), with SGD, SAM, ASAM, MESA.

The method (trajectory loss, output store, SAM, EMA teacher) and a compact trainer that
writes self-describing run directories (:mod:`saf.runs`). Imports ``analysis`` only.
"""

from saf.api import MESALoss, SAFLoss, WithIndex
from saf.config import VERSION, TrainConfig, TrainingDiverged
from saf.data import DATASETS, IndexedDataset, data_batches, load_dataset
from saf.ema import EMA, scaled_ema_decay
from saf.methods import Stepper
from saf.models import MODELS, build_model
from saf.paper import DEFAULT_LAM, DEFAULT_RHO, METHODS, scaled_hparams
from saf.runs import (
    FORMAT,
    METRIC_COLUMNS,
    checkpoint_path,
    is_run_dir,
    list_checkpoints,
    model_from_run,
    read_metrics,
    read_run,
    read_run_lenient,
)
from saf.sam import SAM, disable_running_stats
from saf.train import epoch_batches, evaluate, steps_per_epoch, train
from saf.trajectory import OutputStore, trajectory_loss

__version__ = VERSION

__all__ = [
    # in your own loop
    "SAFLoss",
    "MESALoss",
    "WithIndex",
    # the method
    "trajectory_loss",
    "OutputStore",
    "SAM",
    "disable_running_stats",
    "EMA",
    "scaled_ema_decay",
    "METHODS",
    "Stepper",
    # hyperparameters
    "DEFAULT_LAM",
    "DEFAULT_RHO",
    "scaled_hparams",
    # training
    "TrainConfig",
    "TrainingDiverged",
    "epoch_batches",
    "evaluate",
    "steps_per_epoch",
    "train",
    # models and data
    "MODELS",
    "build_model",
    "DATASETS",
    "IndexedDataset",
    "load_dataset",
    "data_batches",
    # run directories
    "FORMAT",
    "METRIC_COLUMNS",
    "read_run",
    "read_run_lenient",
    "model_from_run",
    "list_checkpoints",
    "checkpoint_path",
    "read_metrics",
    "is_run_dir",
]
