"""The trainer and what it is made of: config, optimizers, checkpoints, hooks, loggers, distillation."""

from simplified_slm.training.config import ExperimentConfig, TrainConfig, load_experiment_config
from simplified_slm.training.distill import DistillLoss, Distiller, Teacher, check_same_tokenizer, distillation_loss
from simplified_slm.training.trainer import Trainer, TrainResult

__all__ = ["ExperimentConfig", "TrainConfig", "load_experiment_config", "Trainer", "TrainResult",
           "Distiller", "DistillLoss", "Teacher", "check_same_tokenizer", "distillation_loss"]
