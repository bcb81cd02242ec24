"""Experiment trackers beside metrics.jsonl (which the Trainer always writes):
TensorBoard event files (`--loggers tensorboard`, needs the `tensorboard`
package) and Weights & Biases (`--loggers wandb`, offline unless WANDB_MODE says
otherwise: the run is written under the run directory and can be synced later).
Each evaluation record, value-memory diagnostics included, is mirrored to them."""

import os
from pathlib import Path

from move.config import parse_loggers
from move.errors import ConfigError


class Trackers:
    def __init__(self, spec: str, run_dir: Path, config: dict):
        self.writers = []
        for name in parse_loggers(spec):
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ConfigError("--loggers tensorboard needs `pip install tensorboard`") from None
                self.writers.append(("tensorboard", SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
            else:
                try:
                    import wandb
                except ImportError:
                    raise ConfigError("--loggers wandb needs `pip install wandb`") from None
                os.environ.setdefault("WANDB_MODE", "offline")
                os.environ.setdefault("WANDB_SILENT", "true")
                run = wandb.init(
                    project="move",
                    name=run_dir.name,
                    dir=str(run_dir),
                    config=config,
                    id=f"{run_dir.name}-{abs(hash(str(run_dir.resolve()))) % 10**8}",
                    resume="allow",
                )
                self.writers.append(("wandb", run))

    def log(self, record: dict, step: int) -> None:
        scalars = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        for kind, writer in self.writers:
            if kind == "tensorboard":
                for key, value in scalars.items():
                    writer.add_scalar(key, value, step)
                writer.flush()
            else:
                writer.log(scalars, step=step)

    def close(self) -> None:
        for kind, writer in self.writers:
            if kind == "tensorboard":
                writer.close()
            else:
                writer.finish()
        self.writers = []
