"""Metric loggers behind one interface; a run writes to several at once.

CSV is always on and stays append-only in long form (`step,name,value`), so a run that adds
metrics midway (an eval, a hook) never has to rewrite a header, and a killed run leaves a
readable file. Text (generation samples) goes to `samples.jsonl` and to the other loggers.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any, Callable

from simplified_slm import metric_names as M
from simplified_slm.errors import SLMError

LOGGERS = ("csv", "console", "tensorboard", "wandb")  # see build_loggers


class Logger:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def log_text(self, step: int, tag: str, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class CSVLogger(Logger):
    def __init__(self, directory: Path) -> None:
        self.path = directory / "metrics.csv"
        new = not self.path.exists()
        self._fh = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._fh)
        if new:
            self._writer.writerow(["step", "name", "value", "time"])
        self._samples = open(directory / "samples.jsonl", "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = round(time.time(), 3)
        for name, value in metrics.items():
            self._writer.writerow([step, name, repr(float(value)), now])
        self._fh.flush()

    def log_text(self, step: int, tag: str, text: str) -> None:
        self._samples.write(json.dumps({"step": step, "tag": tag, "text": text}) + "\n")
        self._samples.flush()

    def close(self) -> None:
        self._fh.close()
        self._samples.close()


class ConsoleLogger(Logger):
    """One line per logged step: training loss, lr and throughput, then validation metrics
    when they are logged, and the samples. Whole lines, because a long run's output is
    often a log file or a pipe, where a progress bar's redraws are unreadable."""

    # (metric, label, format) of the training numbers a person watches
    TRAIN_SHOWN = ((M.TRAIN_LOSS, "loss", "{:.4f}"), (M.TRAIN_LR, "lr", "{:.2e}"),
                   (M.TRAIN_TOKENS_PER_S, "tok/s", "{:,.0f}"))

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write

    def log(self, step: int, metrics: dict[str, float]) -> None:
        shown = [f"{label} {fmt.format(metrics[name])}" for name, label, fmt in self.TRAIN_SHOWN if name in metrics]
        shown += [f"{name} {value:.4f}" for name, value in metrics.items() if name.startswith(M.VAL_PREFIX)]
        if shown:
            self.write(f"step {step}: " + "  ".join(shown))

    def log_text(self, step: int, tag: str, text: str) -> None:
        self.write(f"--- {tag} at step {step} ---\n{text}\n---")


class TensorBoardLogger(Logger):
    def __init__(self, directory: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SLMError("the tensorboard logger needs `pip install tensorboard`; "
                           "or remove 'tensorboard' from train.loggers") from None
        self._writer = SummaryWriter(log_dir=str(directory / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def log_text(self, step: int, tag: str, text: str) -> None:
        self._writer.add_text(tag, text, step)

    def close(self) -> None:
        self._writer.close()


class WandbLogger(Logger):
    """Weights & Biases; set WANDB_MODE=offline to log without a network."""

    def __init__(self, directory: Path, run_name: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise SLMError("the wandb logger needs `pip install wandb`; or remove 'wandb' from train.loggers") from None
        self._run = wandb.init(project="simplified-slm", name=run_name, dir=str(directory), config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        self._run.log({tag: text}, step=step)

    def close(self) -> None:
        self._run.finish()


class MultiLogger(Logger):
    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def log_text(self, step: int, tag: str, text: str) -> None:
        for logger in self.loggers:
            logger.log_text(step, tag, text)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_loggers(names: list[str], directory: Path, run_name: str, config: dict[str, Any],
                  write: Callable[[str], None]) -> MultiLogger:
    loggers: list[Logger] = [CSVLogger(directory)]  # always on: the analysis reads it
    for name in names:
        if name == "console":
            loggers.append(ConsoleLogger(write))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(directory))
        elif name == "wandb":
            loggers.append(WandbLogger(directory, run_name, config))
    return MultiLogger(loggers)
