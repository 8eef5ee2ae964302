"""The training log: per-step losses checked for NaN / inf and written to metrics.jsonl once per log interval."""
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ldm_lite import runs
from ldm_lite.config import TrainConfig
from ldm_lite.distributed import World


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint was kept."""


def expected_steps(step: int, steps: int, train_seconds: float, max_minutes: float) -> int:
    """The step a run will end at, a progress bar's total: train.steps, or for a run with a time budget the step at
    which the budget runs out if the run keeps its speed so far (`step` steps in `train_seconds`, resumes included)."""
    if max_minutes <= 0 or step <= 0 or train_seconds <= 0:
        return steps
    return min(steps, max(step, round(step * 60 * max_minutes / train_seconds)))


class Logger:
    """Collects per-step losses as tensors (no host sync) and, every log interval, checks them for
    NaN/inf, writes one metrics.jsonl line (with the budget's training minutes so far) and updates the progress
    bar, whose total becomes the step a time-budgeted run is expected to end at."""

    def __init__(self, run_dir: Path, world: World, bar, train: TrainConfig):
        self.path, self.world, self.bar, self.train = run_dir / runs.METRICS_FILE, world, bar, train
        self.losses, self.first_step, self.started = [], 0, time.perf_counter()

    def add(self, step: int, loss: torch.Tensor) -> None:
        if not self.losses:
            self.first_step = step
        self.losses.append(loss.detach())

    def flush(self, step: int, lr: float, grad_norm, train_seconds: float) -> dict | None:
        """Write the interval ending at `step` (1-based count of finished steps), `train_seconds` into the run on
        its budget's clock; raise on a non-finite loss."""
        if not self.losses:
            return None
        losses = torch.stack(self.losses).float()
        if self.world.size > 1:
            dist.all_reduce(losses)
            losses /= self.world.size
        values = losses.tolist()
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise TrainingDiverged(f"loss became {value} at step {self.first_step + i + 1}; stopped without "
                                       f"saving; the last good checkpoint is kept in {self.path.parent}")
        elapsed = time.perf_counter() - self.started
        record = {"step": step, "loss": sum(values) / len(values), "lr": lr,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "images_per_s": len(values) * self.train.batch_size / max(elapsed, 1e-9),
                  "train_minutes": train_seconds / 60, "time": time.time()}
        if self.world.is_main:
            with open(self.path, "a") as file:
                file.write(json.dumps(record) + "\n")
            self.bar.total = expected_steps(step, self.train.steps, train_seconds, self.train.max_minutes)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}", refresh=False)
        self.losses, self.started = [], time.perf_counter()
        return record
