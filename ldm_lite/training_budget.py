"""The training budget: train.max_minutes on the clock train.budget_clock names, with evaluations left out, and
the cosine learning-rate horizon a budgeted run fixes from its measured speed.

"cpu" counts this process's CPU time (time.process_time), which on one thread equals the wall time of a quiet
machine, and does not grow while other work holds the cores: runs compared side by side on a busy machine get the
same compute. max_minutes is the run's whole budget: training time accumulates across resumes (the checkpoint's
train_seconds), so an interrupted run resumed with the same command trains only what is left, toward the same
cosine horizon; a larger max_minutes extends it.
"""
import contextlib
import dataclasses
import math
import time

from ldm_lite.config import Config

HORIZON_PROBE = (5, 25)   # steps between which a budgeted cosine run measures its speed (the first are slow)


class Budget:
    """Training time on the budget's clock, evaluations excluded: `already` seconds from earlier invocations of
    the run plus what this one spends; `limit` is what this invocation may spend."""

    def __init__(self, config: Config, already: float = 0.0):
        t = config.train
        self.clock = time.process_time if t.budget_clock == "cpu" else time.monotonic
        self.already = already
        self.limit = 60 * t.max_minutes - already if t.max_minutes else math.inf
        self.started, self.excluded = self.clock(), 0.0

    def spent(self) -> float:
        """Seconds of training this invocation."""
        return self.clock() - self.started - self.excluded

    def total(self) -> float:
        """Seconds of training of the run, all invocations."""
        return self.already + self.spent()

    def exhausted(self) -> bool:
        return self.spent() > self.limit

    @contextlib.contextmanager
    def excluding(self):
        """Time spent inside the block (an evaluation) is not charged to the budget."""
        started = self.clock()
        try:
            yield
        finally:
            self.excluded += self.clock() - started


def needs_horizon(config: Config) -> bool:
    """A cosine schedule under a time budget, whose horizon is not fixed yet."""
    t = config.train
    return t.lr_schedule == "cosine" and not t.lr_horizon_steps and t.max_minutes > 0


def fixed_horizon(config: Config, step: int, seconds_per_step: float, budget: Budget) -> Config:
    """`config` with train.lr_horizon_steps = the step the budget will end at, at the measured speed (capped at
    train.steps). Stored with the run, so a resumed run (and other runs given it) decays on the same horizon."""
    remaining = max(budget.limit - budget.spent(), 0.0)
    horizon = min(config.train.steps, step + max(int(remaining / max(seconds_per_step, 1e-9)), 1))
    return dataclasses.replace(config, train=dataclasses.replace(config.train, lr_horizon_steps=horizon))


def with_stored_horizon(config: Config, stored: dict) -> Config:
    """Resuming: a cosine run whose command leaves lr_horizon_steps at 0 takes the horizon the run stored."""
    horizon = int(stored.get("train", {}).get("lr_horizon_steps", 0) or 0)
    if config.train.lr_schedule != "cosine" or config.train.lr_horizon_steps or not horizon:
        return config
    return dataclasses.replace(config, train=dataclasses.replace(config.train, lr_horizon_steps=horizon))
