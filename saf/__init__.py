"""SAF: Sharpness-Aware Training for Free (Du et al., NeurIPS 2022), with SGD, SAM, ASAM, MESA.

The trainer writes self-describing run directories (:mod:`saf.runs`) that the ``analysis``
and ``landscape`` packages read.
"""

from saf.data import DATASETS, IndexedDataset, data_batches, load_dataset
from saf.ema import EMA, scaled_ema_decay
from saf.methods import METHODS, Stepper
from saf.models import MODELS, build_model
from saf.runs import (
    FORMAT,
    METRIC_COLUMNS,
    checkpoint_path,
    is_run_dir,
    list_checkpoints,
    model_from_run,
    read_metrics,
    read_run,
)
from saf.sam import SAM, disable_running_stats
from saf.train import TrainConfig, TrainingDiverged, evaluate, train
from saf.trajectory import OutputStore, trajectory_loss, trajectory_loss_and_grad

__version__ = "0.1.0"

ModelEMA = EMA

__all__ = [
    # the method
    "trajectory_loss",
    "trajectory_loss_and_grad",
    "OutputStore",
    "SAM",
    "disable_running_stats",
    "EMA",
    "ModelEMA",
    "scaled_ema_decay",
    "METHODS",
    "Stepper",
    # training
    "TrainConfig",
    "TrainingDiverged",
    "train",
    "evaluate",
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
    "model_from_run",
    "list_checkpoints",
    "checkpoint_path",
    "read_metrics",
    "is_run_dir",
]
