"""Samplers with diffusers' class names and keywords, one file each, and the single factory that builds them.

`from_config(config_or_path, name=None, **overrides)` is the one way the library and the command lines build a
scheduler: from a diffusers `scheduler_config.json` (file, folder or dict, dispatched on `_class_name`) or from
a run's training config (anything with a `scheduler_config()` method, e.g. `ldm_lite.config.Config`).
"""
import warnings
from pathlib import Path

from .base import (PREDICTION_TYPES, SCHEDULE_KEYS, Scheduler, SchedulerOutput, _read_scheduler_config,
                   predict_x0_and_eps, randn_tensor, refuse_dropped_schedule_keys)
from .ddim import DDIMScheduler
from .ddim_inverse import DDIMInverseScheduler
from .ddpm import VARIANCE_TYPES, DDPMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .pndm import PNDMScheduler
from .unipc import UniPCMultistepScheduler

SCHEDULER_CLASSES = {cls.__name__: cls for cls in (
    DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler,
    DPMSolverMultistepScheduler, UniPCMultistepScheduler, PNDMScheduler, DDIMInverseScheduler)}

# Short names for the command line: (class name, keywords that define the variant), as the web UIs name them.
ALIASES = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}
# Schedulers that run x0 -> x_T (inversion) rather than sampling.
INVERSE_SCHEDULERS = ("DDIMInverseScheduler",)


def scheduler_class(name: str):
    """The class for a diffusers class name or a short alias (see ALIASES); ValueError listing the choices."""
    class_name = ALIASES[name][0] if name in ALIASES else name
    if class_name not in SCHEDULER_CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; supported: {', '.join(SCHEDULER_CLASSES)} "
                         f"(aliases: {', '.join(ALIASES)})")
    return SCHEDULER_CLASSES[class_name]


def from_config(config_or_path, name: str | None = None, **overrides) -> Scheduler:
    """Build a scheduler from a diffusers config or a training config.

    config_or_path: a dict, a scheduler_config.json path, a folder holding one (or a model folder with a
      scheduler/ subfolder), or an object with a `scheduler_config()` method (a run's `ldm_lite.config.Config`).
    name: a class name or alias that replaces the config's `_class_name` (e.g. sample a DDPM-trained model with
      "dpmpp_2m"); an alias also sets its variant keywords. overrides: keywords that win over the config.
    A schedule key (SCHEDULE_KEYS: betas, zero-SNR rescale, prediction_type, spacing, ...) the chosen class does
    not take raises a one-line ValueError unless its value is neutral (rescale_betas_zero_snr=False). Other keys
    the class does not take are dropped: silently when another scheduler class takes them (a DDPM config's
    variance_type for DDIM; `x0_clipping_dropped` reports a dropped clip_sample or thresholding), with one
    warning otherwise.
    """
    config = _read_config(config_or_path)
    class_name = name or config.get("_class_name")
    if class_name is None:
        raise ValueError(f"scheduler config has no _class_name; pass name= (one of {', '.join(SCHEDULER_CLASSES)})")
    cls = scheduler_class(class_name)
    variant = ALIASES[class_name][1] if class_name in ALIASES else {}
    config = {**config, **variant, **overrides}
    refuse_dropped_schedule_keys(cls, config, SCHEDULER_CLASSES.values())
    known_to_any = {key for other in SCHEDULER_CLASSES.values() for key in other._config_keys()}
    unknown = sorted(k for k in config if k not in known_to_any and not k.startswith("_"))
    if unknown:
        warnings.warn(f"scheduler config keys ignored: {', '.join(unknown)}", stacklevel=2)
    keys = set(cls._config_keys())
    return cls(**{k: v for k, v in config.items() if k in keys})


def x0_clipping(scheduler) -> str:
    """How `scheduler` limits its x0 estimates: "thresholding" (dynamic, Imagen), "clip_sample" (to
    +-clip_sample_range) or "off"."""
    config = scheduler.config
    if config.get("thresholding"):
        return "thresholding"
    return "clip_sample" if config.get("clip_sample") else "off"


def x0_clipping_dropped(config_or_path, scheduler) -> list:
    """The x0 limits (clip_sample, thresholding) that `config_or_path` asks for and `scheduler` does not apply,
    e.g. ["clip_sample"] for a DDIM pixel-model config sampled with Euler, which has no clipping."""
    config = _read_config(config_or_path)
    return [key for key in ("clip_sample", "thresholding") if config.get(key) and not scheduler.config.get(key)]


def _read_config(source) -> dict:
    if hasattr(source, "scheduler_config"):
        return source.scheduler_config()
    return dict(source) if isinstance(source, dict) else _read_scheduler_config(Path(source))


__all__ = ["Scheduler", "SchedulerOutput", "DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
           "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
           "UniPCMultistepScheduler", "PNDMScheduler", "DDIMInverseScheduler", "SCHEDULER_CLASSES", "ALIASES",
           "INVERSE_SCHEDULERS", "SCHEDULE_KEYS", "x0_clipping", "x0_clipping_dropped",
           "PREDICTION_TYPES", "VARIANCE_TYPES", "from_config", "scheduler_class", "predict_x0_and_eps",
           "randn_tensor"]
