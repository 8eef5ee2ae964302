"""Samplers sharing one base: DDPM (ancestral) and DDIM (deterministic or stochastic with eta)."""
from .base import PREDICTION_TYPES, Scheduler, SchedulerOutput, predict_x0_and_eps
from .ddim import DDIMScheduler
from .ddpm import VARIANCE_TYPES, DDPMScheduler

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}

__all__ = ["Scheduler", "SchedulerOutput", "DDPMScheduler", "DDIMScheduler", "SCHEDULERS", "PREDICTION_TYPES",
           "VARIANCE_TYPES", "predict_x0_and_eps"]
