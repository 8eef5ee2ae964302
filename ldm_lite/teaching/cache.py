"""The lessons' tiny models, trained once into a cache (runs/lessons/cache, or $LDM_LITE_LESSON_CACHE) keyed by
a hash of the resolved training config: `lesson_config`, `cached_runs`, `load_cached`, `training_log`.

Several missing models train in child processes (`ldm_lite.processes`) that never import the lesson: a lesson
script has no `if __name__ == "__main__"` guard, so a spawn-based pool, which re-runs `__main__`, cannot be used.
"""
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_lite.config_io import config_from_dict, config_to_dict
from ldm_lite.processes import process_seconds, train_in_processes
from ldm_lite.runs import METRICS_FILE, load_model, read_metrics
from ldm_lite.teaching.lesson import CACHE_ENV, output_root
from ldm_lite.training import train

CACHE_RECORD = "cache.json"


def cache_root() -> Path:
    """The trained-model cache: $LDM_LITE_LESSON_CACHE, else <output root>/cache."""
    return Path(os.environ.get(CACHE_ENV) or output_root() / "cache")


# The lessons' models: tiny UNets on the embedded synthetic images, Stable Diffusion's leaky scaled_linear
# schedule unless the kind fixes it. {kind: (diffusion overrides, noise overrides)}.
MODEL_KINDS = {
    "eps": ({"prediction_type": "epsilon"}, {}),
    "v": ({"prediction_type": "v_prediction"}, {}),
    "x0": ({"prediction_type": "sample"}, {}),
    "offset": ({"prediction_type": "epsilon"}, {"offset_noise": True}),
    "zero_snr": ({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}, {}),
}
FULL_STEPS = 500  # optimiser steps of a full-mode lesson model (batch 32)


def lesson_config(kind: str, steps: int = FULL_STEPS, batch_size: int = 32, synthetic_size: int = 2048,
                  resolution: int = 16, grids: int = 4):
    """The training `Config` of a lesson model of `kind` (MODEL_KINDS), with `grids` sample grids over training.

    Unconditional tiny UNet, scaled_linear betas (0.00085 .. 0.012), AdamW 1e-3 with 50 warm-up steps, EMA
    0.995, seed 0. run.out is set by `cached_runs`.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {tuple(MODEL_KINDS)}, got {kind!r}")
    diffusion, noise = MODEL_KINDS[kind]
    return config_from_dict({
        "data": {"source": "synthetic", "resolution": resolution, "synthetic_size": synthetic_size},
        "model": {"preset": "tiny"},
        "diffusion": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, **diffusion},
        "noise": noise,
        "train": {"steps": steps, "batch_size": batch_size, "lr": 1e-3, "warmup_steps": min(50, steps // 5),
                  "ema_decay": 0.995, "seed": 0},
        "run": {"log_every": max(1, min(25, steps // 8)), "checkpoint_every": 0,
                "sample_every": max(1, steps // grids) if grids else 0, "sample_steps": 20, "samples_per_class": 8,
                "progress": False},
    })


def config_key(config) -> str:
    """16 hex digits of SHA-256 over the resolved training config, without what cannot change the model:
    the [run] section (folder, logging, grids) and train.num_threads / keep_freed_memory / compile."""
    tree = config_to_dict(config)
    tree.pop("run")
    for key in ("num_threads", "keep_freed_memory", "compile"):
        tree["train"].pop(key, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class CachedRun:
    """A lesson model in the cache: name, config key, run folder, whether this call trained it, training time."""
    name: str
    key: str
    run_dir: Path
    trained: bool
    seconds: float


def cached_runs(configs: dict, cache=None, processes: int = 2) -> dict:
    """{name: Config} -> {name: CachedRun}: each model trained once into <cache>/<name>-<key>/ and reused.

    A folder counts as finished when its cache.json records the key; an interrupted run resumes from its
    checkpoint. Missing models train in child processes (`ldm_lite.processes`), up to `processes` at a time,
    sharing torch's thread count between them (a single missing model trains in this process).
    """
    cache = Path(cache) if cache is not None else cache_root()
    found, missing = {}, {}
    for name, config in configs.items():
        key = config_key(config)
        run_dir = cache / f"{name}-{key}"
        if _cache_record(run_dir).get("key") == key:
            found[name] = CachedRun(name, key, run_dir, False, _cache_record(run_dir).get("seconds", 0.0))
        else:
            missing[name] = dataclasses.replace(config, run=dataclasses.replace(config.run, out=str(run_dir)))
    found.update(_train_missing(missing, processes))
    return {name: found[name] for name in configs}


def _cache_record(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / CACHE_RECORD).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _train_missing(configs: dict, processes: int) -> dict:
    """Train {name: Config (run.out set)} in child processes that never import the lesson (a lesson script has
    no __main__ guard), writing each folder's cache.json once all are done; {name: CachedRun}."""
    if not configs:
        return {}
    print(f"  training {', '.join(configs)} into the lesson cache (once; reused afterwards)")
    started = time.monotonic()
    at_once = max(1, min(processes, len(configs)))
    if len(configs) == 1:  # in this process: nothing to run in parallel
        (name, config), = configs.items()
        train(config)
        seconds = {name: time.monotonic() - started}
    else:
        run_dirs = train_in_processes(configs, progress=True, threads=max(1, torch.get_num_threads() // at_once),
                                      processes=at_once)
        seconds = {name: process_seconds(run_dirs[name]) or 0.0 for name in configs}
    print(f"  trained in {time.monotonic() - started:.0f} s")
    return {name: _finished(name, configs[name], seconds[name]) for name in configs}


def _finished(name: str, config, seconds: float) -> CachedRun:
    """Write cache.json (the key marks the folder finished) and describe the run."""
    run_dir, key = Path(config.run.out), config_key(config)
    record = {"key": key, "name": name, "seconds": round(seconds, 2), "steps": config.train.steps}
    (run_dir / CACHE_RECORD).write_text(json.dumps(record, indent=2))
    return CachedRun(name, key, run_dir, True, seconds)


def load_cached(run: CachedRun):
    """The EMA model of a cached run: `ldm_lite.runs.LoadedModel` (unet in eval mode, scheduler_config)."""
    return load_model(run.run_dir)


def training_log(run: CachedRun) -> list[dict]:
    """The run's metrics.jsonl lines (step, loss, ...)."""
    return read_metrics(run.run_dir / METRICS_FILE)
