"""Where a training stage's scalars go besides metrics.jsonl: TensorBoard by default (RUN/<stage>/tensorboard/).
A plugin can add another logger (W&B, MLflow, ...) by registering a ScalarLogger class by name, in this registry or
through the `groundgan.loggers` entry-point group, and naming it under `run.loggers`."""

from __future__ import annotations

from pathlib import Path

from pipeline.registry import Registry


class ScalarLogger:
    """One stage's scalars: built on the main process when the stage logs its first figures after `first_step`'s
    predecessor (so a resumed stage drops what a killed attempt logged past its checkpoint)."""

    def __init__(self, stage_dir: Path, stage: str, first_step: int):
        self.stage_dir, self.stage, self.first_step = stage_dir, stage, first_step

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


logger_registry: Registry = Registry("scalar logger", "groundgan.loggers")


@logger_registry.register("tensorboard")
class TensorBoardLogger(ScalarLogger):
    """Event files under RUN/<stage>/tensorboard/ (`tensorboard --logdir RUN`), one tag per figure."""

    def __init__(self, stage_dir: Path, stage: str, first_step: int):
        super().__init__(stage_dir, stage, first_step)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(stage_dir / "tensorboard"), purge_step=first_step)

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()
