"""The trainer and what it is made of: config, optimizers, checkpoints, hooks, loggers."""

from simplified_slm.training.config import ExperimentConfig, TrainConfig, load_experiment_config
from simplified_slm.training.trainer import Trainer, TrainResult

__all__ = ["ExperimentConfig", "TrainConfig", "load_experiment_config", "Trainer", "TrainResult"]
