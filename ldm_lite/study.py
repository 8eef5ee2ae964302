"""The bias study: `python -m analysis demo` (make demo, minutes, synthetic data) and its big sibling
`python -m analysis study` (real images, FID/KID), one pipeline of models, findings and report.

The demo tests each claim where its paper makes it, on one dataset, in minutes:
1. Frequency view: how the forward process destroys each DCT band of the data (theory and measurement),
   for the linear, scaled_linear and zero-terminal-SNR schedules.
2. Offset noise (Guttenberg / Crosslabs 2023): a class-conditional model asked for a dark or bright image
   still returns one near mid-grey when trained with the leaky scaled_linear schedule; offset noise lets it
   reach the extremes. Two `tiny` models, identical but for the noise, same seed and steps.
3. Signal leak (Everaert et al. 2024, arXiv:2309.15842): the standard model sampled unconditionally from
   plain noise and from signal-leak initial noise ("dct+pixel" statistics of the training images).
4. Optional: zero terminal SNR with v-prediction and trailing spacing (Lin et al. 2023, arXiv:2305.08891),
   the schedule-side fix, when the time budget allows a third model.

The study (`QualityStudyConfig`, `run_quality_study`) trains the standard recipe (linear schedule, epsilon, Ho et
al. 2020) and its fixes (offset noise; input perturbation, DDPM-IP, Ning et al. 2023, arXiv:2301.11706; zero
terminal SNR) on real images and puts FID / KID (Heusel et al. 2017; Binkowski et al. 2018) beside the bias
metrics: samplers against the number of model calls (NFE), epsilon scaling (Ning et al. 2023,
arXiv:2308.15321) picked by FID and by the eps-norm, the signal leak, and the fixes. A plan fitted to
`--minutes` drops the most expensive evaluations first and says so.

Everything lands in `<out>/report.html` (plots, sample grids, the results tables with settings, seeds and run
times); no number in the report is written by hand, and every stated finding is chosen by the numbers.
"""
import dataclasses
import datetime
import html
import json
import math
import hashlib
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ldm_lite import metrics, plots
from ldm_lite.checks import comma_list
from ldm_lite.config import PRECISIONS, config_from_dict, config_to_dict, option
from ldm_lite.distributed import World, init_world, leave_torchrun, share
from ldm_lite.data import brightness_terciles, load_dataset, save_image_grid, to_float, to_uint8
from ldm_lite.leak import LeakStats
from ldm_lite.models import UNet, load_unet, unet_preset
from ldm_lite.models.inception import FEATURE_DIM, load_fid_inception
from ldm_lite.quality import PROTOCOL_VERSION, WEIGHTS_SHA1, FidStatistics, inception_features, quality_report
from ldm_lite.run_safety import FolderLock
from ldm_lite.runs import CHECKPOINT_NAME, load_checkpoint
from ldm_lite.sampling import initial_noise, sample, sample_generators
from ldm_lite.schedulers import from_config, scheduler_class
from ldm_lite.schedules import named_alphas_cumprod
from ldm_lite.training import train

CLASS_NAMES = ("dark", "mid", "bright")


@dataclass(frozen=True)
class StudyConfig:
    """Settings of the bias study (`python -m analysis demo` builds its flags from these fields).
    `minutes` is the whole budget; training steps stop early to keep it."""
    out: str = option("runs/demo", "output folder (report.html, results.json, model_*/ runs)")
    data: str = option("synthetic", "'synthetic' (embedded), 'cifar10:ROOT' or an image folder; labels are "
                       "brightness terciles")
    resolution: int = option(16, "image size")
    steps: int = option(1500, "optimiser steps per model (fewer when the budget runs out)")
    batch_size: int = option(64, "training batch size")
    lr: float = option(1e-3, "learning rate")
    minutes: float = option(8.5, "time budget of the whole study (leaves room for the install in make demo)")
    samples_per_class: int = option(48, "class-conditional samples per brightness class")
    unconditional_samples: int = option(192, "unconditional samples per signal-leak setting")
    sample_steps: int = option(50, "DDIM steps")
    offset_noise: float = option(0.1, "offset-noise strength of the offset model")
    zero_snr_model: bool = option(True, "train the zero-SNR model (part 4) when the budget allows it")
    synthetic_size: int = option(4096, "number of embedded synthetic images")
    max_images: int = option(0, "image folders: keep N images (0 = all)")
    seed: int = option(0, "seed of the data, the training and the sampling")
    progress: bool = option(True, "progress bars")
    fresh: bool = option(False, "delete the study's model checkpoints and train from scratch")
    precision: str = option("fp32", "training precision (train.precision)", choices=PRECISIONS)

    # the forward process of every model: (beta_schedule, beta_start, beta_end); the demo's is Stable Diffusion's
    BETAS: ClassVar[tuple] = ("scaled_linear", 0.00085, 0.012)

    def __post_init__(self):
        for name in ("resolution", "steps", "batch_size", "samples_per_class", "unconditional_samples",
                     "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")


FIXES = ("offset", "ip", "zero_snr")
AUTOCAST_CHOICES = ("auto", "bf16", "off")


@dataclass(frozen=True)
class QualityStudyConfig(StudyConfig):
    """Settings of `python -m analysis study` (its flags are these fields): the demo's models on real images,
    the standard recipe (linear schedule, epsilon, as Ho et al.) and its fixes, with FID / KID beside the bias
    metrics. Fields redefined here keep the demo's meaning with the study's defaults."""
    out: str = option("runs/study", "output folder (report.html, results.json, model_*/ runs, eval/ samples)")
    data: str = option("", "an image folder or 'cifar10:ROOT' (labels: brightness terciles)", required=True)
    resolution: int = option(32, "image size")
    steps: int = option(1_000_000, "optimiser steps cap per model; the budget stops the first pair, the second "
                        "pair trains as many steps as the first reached")
    minutes: float = option(150.0, "time budget of the whole study (a resumed study gets it afresh for what is "
                            "left)")
    samples_per_class: int = option(100, "class-conditional samples per brightness tercile (part 4) and per DC "
                                    "steering target (part 3)")
    unconditional_samples: int = option(500, "samples per evaluated setting (FID, KID and bias metrics)")
    sample_steps: int = option(20, "DDIM steps of parts 2-4 (their NFE)")
    samplers: str = option("ddim,dpmpp_2m,unipc,euler,heun", "samplers of part 1 (aliases of python -m sample)")
    nfes: str = option("10,20,50", "numbers of model calls of part 1 (Heun: the nearest 2N - 1 not above)")
    eps_scales: str = option("1.0,1.005,1.01,1.017,1.025", "epsilon-scaling lambdas of part 2 (DDIM)")
    exposure_images: int = option(256, "training images for part 2's eps-norm metric")
    fixes: str = option(",".join(FIXES), "fixed models of part 4, trained like the standard one: offset, ip "
                        "(input perturbation) and zero_snr (zero terminal SNR, v-prediction, trailing spacing)")
    input_perturbation: float = option(0.1, "DDPM-IP gamma of the ip model")
    reference_images: int = option(10_000, "training images of the FID / KID reference, spread evenly over the "
                                   "data; their features are cached")
    cache: str = option("", "reference-feature cache folder ('' = $LDM_LITE_CACHE, else runs/cache)")
    device: str = option("auto", "evaluation and training device: auto (CUDA when available), cpu or cuda",
                         choices=("auto", "cpu", "cuda"))
    autocast: str = option("auto", "bf16 autocast of evaluation sampling: auto (on where measured faster), bf16, "
                           "off", choices=AUTOCAST_CHOICES)
    eval_batch_size: int = option(100, "images per model call when sampling for evaluation")

    BETAS: ClassVar[tuple] = ("linear", 1e-4, 0.02)

    def __post_init__(self):
        super().__post_init__()
        if not self.data:
            raise ValueError("data must name an image folder or 'cifar10:ROOT'")
        for name in ("exposure_images", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("unconditional_samples", "reference_images"):
            if getattr(self, name) < 4:
                raise ValueError(f"{name} must be >= 4 (KID draws two subsets of n // 2), got {getattr(self, name)}")
        for name in self.sampler_names:
            scheduler_class(name)
        unknown = [name for name in self.fix_names if name not in FIXES]
        if unknown:
            raise ValueError(f"fixes must be among {', '.join(FIXES)}, got {', '.join(unknown)}")
        if not self.nfe_levels or min(self.nfe_levels) < 1:
            raise ValueError(f"nfes must be positive integers, got {self.nfes!r}")
        if not self.lambdas or min(self.lambdas) <= 0:
            raise ValueError(f"eps_scales must be positive numbers, got {self.eps_scales!r}")

    @property
    def sampler_names(self) -> list:
        return _items(self.samplers, str, "samplers")

    @property
    def nfe_levels(self) -> list:
        return sorted(set(_items(self.nfes, int, "nfes")))

    @property
    def lambdas(self) -> list:
        return _items(self.eps_scales, float, "eps_scales")

    @property
    def fix_names(self) -> list:
        return _items(self.fixes, str, "fixes")


def _items(text: str, kind, name: str) -> list:
    """A comma-separated flag as a list of `kind`, repeats dropped; ValueError naming the flag."""
    return list(dict.fromkeys(comma_list(text, kind, name)))


class Clock:
    """Wall time of the study's parts, and what is left of the budget."""

    def __init__(self, minutes: float):
        self.start = time.monotonic()
        self.budget = 60 * minutes
        self.parts = {}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def time(self, name: str, function, *args, **kwargs):
        start = time.monotonic()
        result = function(*args, **kwargs)
        self.parts[name] = self.parts.get(name, 0.0) + time.monotonic() - start
        return result


def run_study(config: StudyConfig) -> dict:
    """Run the demo, or the study for a `QualityStudyConfig`; returns the results (also written as results.json
    and report.html in config.out)."""
    if isinstance(config, QualityStudyConfig):
        return run_quality_study(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(config.minutes)
    dataset = clock.time("load data", load_study_data, config)
    data = to_float(dataset.images)
    results = {"config": dataclasses.asdict(config), "tables": {}, "figures": {}, "grids": {}}
    clock.time("bands", study_bands, data, out, results, config.seed)
    # the two compared models train side by side, one core each: small convolutions scale poorly across
    # threads, so two single-threaded runs finish sooner than two runs one after the other
    pair_minutes = (clock.left() - 0.25 * clock.budget) / 60
    models = clock.time("train standard + offset", train_models, config, ["standard", "offset"], pair_minutes)
    if config.zero_snr_model:
        minutes = (clock.left() - 0.15 * clock.budget) / 60
        if minutes < 0.25 * config.minutes:
            results["skipped"] = (f"zero-SNR model (part 4) skipped: {clock.left() / 60:.1f} of {config.minutes} "
                                  "minutes left; a larger --minutes budget includes it")
        else:
            models.update(clock.time("train zero_snr", train_models, config, ["zero_snr"], minutes))
    clock.time("offset noise", study_offset_noise, models, data, dataset.labels, config, out, results)
    leak_reports = clock.time("signal leak", study_signal_leak, models, data, config, out, results)
    study_summary(leak_reports, out, results)
    results["timings"] = clock.parts
    results["total_seconds"] = time.monotonic() - clock.start
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2))
    write_report(results, out / "report.html")
    return results


def load_study_data(config: StudyConfig):
    """The dataset, labelled by brightness tercile (the embedded data already is)."""
    dataset = load_dataset(config.data, config.resolution, synthetic_size=config.synthetic_size,
                           seed=config.seed, max_images=config.max_images, progress=config.progress)
    return dataset if config.data == "synthetic" else brightness_terciles(dataset)


# ----------------------------------------------------------------------------- 1. bands

def study_bands(data, out: Path, results: dict, seed: int) -> None:
    schedules = named_alphas_cumprod(["linear", "scaled_linear", "scaled_linear_zero_snr"])
    analysis = metrics.band_analysis(data[:2048], schedules=schedules, measure_schedule="scaled_linear",
                                     generator=torch.Generator().manual_seed(seed))
    results["figures"]["bands"] = {k: str(p.relative_to(out)) for k, p in plots.plot_bands(analysis, out).items()}
    tables = metrics.band_tables(analysis)
    for name, rows in tables.items():
        plots.write_csv(rows, out / f"bands_{name}.csv")
    results["tables"]["destruction"] = [r for r in tables["destruction"] if r["channel"] == "all"]
    results["tables"]["band_leak"] = [r for r in tables["leak"] if r["channel"] == "all" and r["noise"] == "white"]
    worst = max(abs(r["measured"] - r["theory"]) for r in tables["correlation"])
    results["band_correlation_max_error"] = worst


# ----------------------------------------------------------------------------- training

def train_config(config: StudyConfig, name: str, minutes: float, threads: int = 0, steps: int | None = None):
    """The training config of one of the study's models (tiny, class-conditional, null labels 10%): "standard",
    or a fix: "offset" (offset noise), "ip" (input perturbation), "zero_snr" (v-prediction, trailing spacing)."""
    zero_snr = name == "zero_snr"
    beta_schedule, beta_start, beta_end = config.BETAS
    return config_from_dict({
        "data": {"source": config.data, "resolution": config.resolution, "synthetic_size": config.synthetic_size,
                 "max_images": config.max_images, "labels": "dataset" if config.data == "synthetic" else "brightness"},
        "model": {"preset": "tiny", "class_conditional": True, "null_label_prob": 0.1},
        "diffusion": {"beta_schedule": beta_schedule, "beta_start": beta_start, "beta_end": beta_end,
                      "rescale_betas_zero_snr": zero_snr, "prediction_type": "v_prediction" if zero_snr else "epsilon"},
        "noise": _noise_section(config, name),
        "train": {"steps": steps or config.steps, "batch_size": config.batch_size, "lr": config.lr,
                  "warmup_steps": 100, "ema_decay": 0.999, "seed": config.seed, "max_minutes": max(minutes, 0.1),
                  "num_threads": threads, "precision": config.precision},
        "run": {"out": str(Path(config.out) / f"model_{name}"), "log_every": 25, "checkpoint_every": 250,
                "sample_every": 0, "progress": config.progress and threads == 0, "resume": True,
                "fresh": config.fresh},
    })


def _noise_section(config: StudyConfig, name: str) -> dict:
    if name == "offset":
        return {"offset_noise": True, "offset_noise_strength": config.offset_noise}
    if name == "ip":
        return {"input_perturbation": True, "input_perturbation_gamma": config.input_perturbation}
    return {}


def train_models(config: StudyConfig, names: list, minutes: float) -> dict:
    """Train the named models at once, one process and one thread each, capped at `minutes` of wall time;
    a finished or interrupted run of the same settings is resumed. Returns {name: trained model info}."""
    configs = {name: train_config(config, name, minutes, threads=1 if len(names) > 1 else 0) for name in names}
    if len(names) == 1:
        run_dirs = {names[0]: train(configs[names[0]])}
    else:
        run_dirs = _train_in_processes(configs, config.progress)
    return {name: {"model": load_unet(run_dirs[name]).eval(), "config": configs[name], "run_dir": run_dirs[name],
                   "steps": load_checkpoint(run_dirs[name] / CHECKPOINT_NAME)["step"]} for name in names}


def _train_in_processes(configs: dict, progress: bool, hide_cuda: bool = False) -> dict:
    """{name: Config} -> {name: run_dir}, one spawned process per run, one progress bar for all; hide_cuda keeps
    the processes on the CPU (training otherwise takes CUDA when it is available)."""
    context = multiprocessing.get_context("spawn")
    total = sum(c.train.steps for c in configs.values())
    with ProcessPoolExecutor(max_workers=len(configs), mp_context=context) as pool, \
            tqdm(total=total, desc="training " + " + ".join(configs), unit="step", disable=not progress) as bar:
        futures = {name: pool.submit(_train_worker, config_to_dict(c), hide_cuda) for name, c in configs.items()}
        while not all(f.done() for f in futures.values()):
            time.sleep(1.0)
            bar.update(sum(_logged_step(Path(c.run.out)) for c in configs.values()) - bar.n)
        return {name: Path(future.result()) for name, future in futures.items()}


def _train_worker(config: dict, hide_cuda: bool = False) -> str:
    leave_torchrun()  # spawned by rank 0 of a sharded study: train on its own, not in the study's process group
    if hide_cuda:  # a fresh spawned process: CUDA is not initialised yet
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return str(train(config_from_dict(config)))


def _logged_step(run_dir: Path) -> int:
    """The last step written to a run's metrics log (0 before the first line)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def study_scheduler(trained: dict):
    """DDIM on the model's schedule, with the spacing every command uses for it (`Config.scheduler_config`)."""
    return from_config(trained["config"])


# ----------------------------------------------------------------------------- 2. offset noise

def study_offset_noise(models: dict, data, labels, config: StudyConfig, out: Path, results: dict) -> None:
    """Per class: mean brightness of conditional samples vs the data's class mean, for each model."""
    rows, n = [], config.samples_per_class
    class_labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(n)
    for name, trained in models.items():
        scheduler = study_scheduler(trained)
        images = sample(trained["model"], scheduler, len(class_labels), num_inference_steps=config.sample_steps,
                        class_labels=class_labels, seed=config.seed, progress=config.progress)
        save_class_grid(images, class_labels, out / f"grid_{name}_classes.png", config)
        results["grids"][f"{name}: dark / mid / bright rows"] = f"grid_{name}_classes.png"
        rows += class_rows(name, trained, scheduler, images, class_labels, data, labels, config.seed)
    results["tables"]["offset_noise"] = rows


def save_class_grid(images, class_labels, path: Path, config: StudyConfig) -> None:
    """Up to 16 samples per class, one row per class."""
    shown = torch.cat([images[class_labels == c][:16] for c in range(len(CLASS_NAMES))])
    save_image_grid(shown.clamp(-1, 1), path, nrow=min(config.samples_per_class, 16), scale=_grid_scale(config))


def class_rows(name: str, trained: dict, scheduler, images, class_labels, data, labels, seed: int) -> list:
    """Rows of the class-conditional table: per asked class, the samples' mean brightness (over C, H, W) against
    the data's class mean."""
    brightness, data_brightness = images.clamp(-1, 1).mean(dim=(1, 2, 3)), data.mean(dim=(1, 2, 3))
    rows = []
    for c, class_name in enumerate(CLASS_NAMES):
        target, got = float(data_brightness[labels == c].mean()), brightness[class_labels == c]
        rows.append(dict(model=name, schedule=_schedule_name(trained), spacing=scheduler.config["timestep_spacing"],
                         steps=trained["steps"], seed=seed, asked=class_name, n=len(got), data_mean=target,
                         samples_mean=float(got.mean()), gap=float(got.mean()) - target))
    return rows


# ----------------------------------------------------------------------------- 3. signal leak

def study_signal_leak(models: dict, data, config: StudyConfig, out: Path, results: dict) -> dict:
    """Unconditional samples vs the data's brightness distribution, from plain noise and with a signal leak.
    Returns the brightness report of each setting, keyed "model, initial noise"."""
    stats = LeakStats.fit(data, kind="dct+pixel", n_components=3)
    stats.save(out / "leak_stats.safetensors")
    n, rows, reports = config.unconditional_samples, [], {}
    settings = [("standard", "plain noise", None), ("standard", "signal leak (dct+pixel)", stats),
                ("offset", "plain noise", None), ("offset", "own offset noise", "offset")]
    if "zero_snr" in models:
        settings.append(("zero_snr", "plain noise", None))
    for name, start, leak in settings:
        if name not in models:
            continue
        trained = models[name]
        scheduler = study_scheduler(trained)
        scheduler.set_timesteps(config.sample_steps)
        generator = torch.Generator().manual_seed(config.seed)
        shape = (n, data.shape[1], config.resolution, config.resolution)
        if leak == "offset":  # the noise the offset model was trained on: randn + s * randn(B, C, 1, 1)
            x_T = initial_noise(scheduler, shape, generator=generator)
            x_T = x_T + config.offset_noise * torch.randn(n, shape[1], 1, 1, generator=generator)
        else:
            x_T = initial_noise(scheduler, shape, leak=leak, generator=generator)
        images = sample(trained["model"], scheduler, n, x_T=x_T, class_labels=trained["model"].config.num_classes,
                        seed=config.seed, progress=config.progress).clamp(-1, 1)
        key = f"{name}, {start}"
        save_image_grid(images[:64], out / f"grid_{name}_{_slug(start)}.png", nrow=16, scale=_grid_scale(config))
        results["grids"][f"{key} (unconditional)"] = f"grid_{name}_{_slug(start)}.png"
        report = metrics.brightness_report(images, data)
        reports[key] = report
        luminance = next(r for r in report["rows"] if r["quantity"] == "luminance")
        rows.append(dict(model=name, initial_noise=start, t0=int(scheduler.timesteps[0]),
                         sqrt_alpha_bar_t0=float(scheduler.alphas_cumprod[int(scheduler.timesteps[0])]) ** 0.5,
                         seed=config.seed, n=n, samples_std=luminance["samples_std"],
                         data_std=luminance["data_std"], std_ratio=luminance["std_ratio"],
                         wasserstein=luminance["wasserstein"], ks=luminance["ks"]))
    for key, report in reports.items():
        path = out / f"brightness_{_slug(key)}.png"
        plots.plot_brightness(report, path)
        results["figures"][f"brightness: {key}"] = path.name
    results["tables"]["signal_leak"] = rows
    return reports


def study_summary(leak_reports: dict, out: Path, results: dict) -> None:
    """One figure for parts 2 and 3: class means per model, and the spread of unconditional brightness."""
    shown = [key for key in leak_reports if key.startswith(("standard", "zero_snr")) or "own offset" in key]
    luminance = {"data": leak_reports[shown[0]]["data"]["luminance"]}
    luminance.update({key: leak_reports[key]["samples"]["luminance"] for key in shown})
    plots.plot_study_summary(results["tables"]["offset_noise"], luminance, out / "summary.png")
    results["figures"]["summary"] = "summary.png"


# ----------------------------------------------------------------------------- the study on real images

PLAIN, LEAK, OWN_NOISE = "plain noise", "signal leak (dct+pixel)", "own offset noise"
TRAIN_SHARE = 0.55     # the least share of the budget the plan keeps for training, when models need it
FID_SECONDS = 15.0     # planned seconds of one FID (a 2048 x 2048 eigh) and KID (100 subsets), on the CPU
MIN_SAMPLES = 128      # the plan halves the samples per setting down to this, no lower
BF16_GAIN = 1.1        # autocast auto: bf16 when its model calls run at least this much faster than float32
SPECTRUM_IMAGES = 2048
RESUMABLE_FIELDS = ("out", "minutes", "progress", "fresh", "device", "cache", "eval_batch_size")


@dataclass(frozen=True)
class Setting:
    """One evaluated way of sampling: `model` with `sampler` at `steps` steps (`nfe` model calls) from `start`
    noise with epsilon scale `eps_scale`; `level` is the NFE target of part 1 it stands for."""
    model: str
    sampler: str
    steps: int
    nfe: int
    level: int
    eps_scale: float = 1.0
    start: str = PLAIN

    @property
    def key(self) -> str:
        return _slug(f"{self.model} {self.sampler} {self.steps} eps {self.eps_scale:g} {self.start}")

    @property
    def label(self) -> str:
        scale = f", lambda {self.eps_scale:g}" if self.eps_scale != 1 else ""
        return f"{self.model}, {self.sampler} {self.steps} steps ({self.nfe} calls){scale}, {self.start}"


def study_parts(config: QualityStudyConfig) -> dict:
    """{part: [Setting]} of the four evaluations. Parts 2-4 share the base setting: the standard model, DDIM at
    sample_steps from plain noise with lambda 1 (part 1's DDIM setting at that NFE too)."""
    n = config.sample_steps
    base = Setting("standard", "ddim", n, n, n)
    samplers = {}  # by key: NFE targets that give a sampler the same steps (Heun at 9 and 10) are one setting
    for level in config.nfe_levels:
        for name in config.sampler_names:
            setting = Setting("standard", name, *sampler_steps(name, level), level)
            samplers.setdefault(setting.key, setting)
    return {"samplers": list(samplers.values()),
            "eps": [replace(base, eps_scale=value) for value in config.lambdas],
            "leak": [base, replace(base, start=LEAK)],
            "fixes": [base] + [Setting(fix, "ddim", n, n, n, start=OWN_NOISE if fix == "offset" else PLAIN)
                               for fix in config.fix_names]}


def sampler_steps(name: str, nfe: int) -> tuple:
    """(steps, model calls) of a sampler for a target number of model calls: the most steps whose calls do not
    exceed the target (at least one step). A sampler calls the model once per entry of its timesteps after
    set_timesteps(N): N for the one-step samplers, 2N - 1 for Heun (the nearest 2N - 1 not above the target),
    N + 1 for PNDM's PLMS (the "pndm" alias), N + 9 for PNDM with its Runge-Kutta warm-up."""
    scheduler = from_config({}, name)  # the alias's variant: PNDM as "pndm" skips the Runge-Kutta warm-up
    for steps in range(max(nfe, 1), 0, -1):
        try:
            scheduler.set_timesteps(steps)
        except ValueError:  # too few steps for the sampler (PNDM's Runge-Kutta warm-up needs 4)
            break
        if len(scheduler.timesteps) <= nfe or steps == 1:
            return steps, len(scheduler.timesteps)
    raise ValueError(f"{name} cannot sample in {nfe} model calls or fewer")


def run_order(parts: dict) -> list:
    """Every setting once: the base first, then the fixes, the leak, epsilon scaling and the samplers by NFE."""
    return list(dict.fromkeys([*parts["fixes"], *parts["leak"], *parts["eps"],
                               *sorted(parts["samplers"], key=lambda s: s.level)]))


# ----------------------------------------------------------------------------- speed and plan

def measure_speed(config: QualityStudyConfig, channels: int, network, device: torch.device,
                  processes: int = 1) -> dict:
    """The rates the plan uses: model calls (images through the UNet) per second at the evaluation batch size, in
    float32 and, unless --autocast off, under bf16 autocast; Inception images per second; and the autocast
    choice: bf16 when asked for, or under auto when measured at least BF16_GAIN times faster. Measured in this
    process; `calls_per_second` and `inception_per_second` count all `processes` sharing the work (the rates
    observed while evaluating replace these estimates)."""
    unet = UNet(unet_preset("tiny", in_channels=channels, sample_size=config.resolution,
                            num_classes=len(CLASS_NAMES))).to(device).eval()
    batch = min(config.eval_batch_size, config.unconditional_samples)
    speed = {"device": str(device), "batch": batch, "fp32_calls_per_second": _calls_per_second(unet, batch, None)}
    if config.autocast != "off":
        speed["bf16_calls_per_second"] = _calls_per_second(unet, batch, torch.bfloat16)
    faster = speed.get("bf16_calls_per_second", 0.0) > BF16_GAIN * speed["fp32_calls_per_second"]
    speed["autocast"] = "bf16" if config.autocast == "bf16" or (config.autocast == "auto" and faster) else "off"
    speed["processes"] = processes
    speed["calls_per_second"] = processes * speed["bf16_calls_per_second" if speed["autocast"] == "bf16" else
                                                  "fp32_calls_per_second"]
    speed["inception_per_second"] = processes * _inception_per_second(network, device, config.resolution)
    return speed


@torch.no_grad()
def _calls_per_second(unet, batch: int, dtype) -> float:
    """Images through the UNet per second: two warm-up calls (a process's first calls set up its kernels and
    memory), then 3 to 10 calls for about two seconds."""
    device, size = next(unet.parameters()).device, unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size, device=device)
    t, y = torch.full((batch,), 500, device=device), torch.full((batch,), unet.config.num_classes, device=device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        unet(x, t, y)
        unet(x, t, y)
        _synchronize(device)
        calls, start = 0, time.perf_counter()
        while calls < 3 or (calls < 10 and time.perf_counter() - start < 2.0):
            unet(x, t, y)
            _synchronize(device)
            calls += 1
    return calls * batch / (time.perf_counter() - start)


def _inception_per_second(network, device: torch.device, resolution: int) -> float:
    count = 32 if device.type == "cuda" else 4
    images = torch.zeros(count, 3, resolution, resolution, dtype=torch.uint8)
    inception_features(images, batch_size=count, device=device, progress=False, network=network)  # warm-up
    start = time.perf_counter()
    inception_features(images, batch_size=count, device=device, progress=False, network=network)
    return count / (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Plan:
    """What the budget holds: the settings to evaluate (in run order), images per setting, the estimated seconds
    of each part, and sentences saying what was dropped and why."""
    settings: list
    samples: int
    estimates: dict
    dropped: list


def plan_study(config: QualityStudyConfig, parts: dict, speed: dict, reference_seconds: float,
               train_needed: bool, seconds_left: float, samples: int | None = None) -> Plan:
    """Fit the evaluations into what the budget leaves after the reference features (0 once computed), training
    (at least TRAIN_SHARE of the budget while models still need it) and a margin, cutting the most expensive first:
    part 1's NFE levels above sample_steps (largest first), then the samples per setting (halved, down to
    MIN_SAMPLES). All settings keep one sample count, so their FIDs stay comparable: a resumed study passes its
    first evaluations' `samples` (see `first_choices`), which then stays as it is."""
    order, fixed = run_order(parts), samples is not None
    samples = samples if fixed else config.unconditional_samples
    floor = min(MIN_SAMPLES, samples)
    margin = 0.03 * 60 * config.minutes + 60
    training = TRAIN_SHARE * 60 * config.minutes if train_needed else 0.0
    allowed = seconds_left - reference_seconds - training - margin
    dropped = []
    if fixed and samples != config.unconditional_samples:
        dropped.append(f"Samples per setting kept at {samples}, the count of the study's first evaluations.")
    while (cost := evaluation_seconds(config, order, samples, speed)) > allowed:
        why = (f"the evaluations were estimated at {cost / 60:.1f} min ({speed['calls_per_second']:.0f} model "
               f"calls/s, {speed['inception_per_second']:.1f} Inception images/s measured) but the budget left "
               f"{max(allowed, 0) / 60:.1f} min for them after the reference features ({reference_seconds / 60:.1f} "
               f"min), training ({training / 60:.1f} min) and a margin ({margin / 60:.1f} min)")
        levels = sorted({s.level for s in order if s.level > config.sample_steps}, reverse=True)
        if levels:
            gone = [s for s in order if s.level == levels[0]]
            order = [s for s in order if s.level != levels[0]]
            dropped.append(f"Part 1 at NFE {levels[0]} ({len(gone)} settings) dropped: {why}.")
        elif not fixed and samples // 2 >= floor:
            dropped.append(f"Samples per setting cut from {samples} to {samples // 2}: {why}.")
            samples //= 2
        else:
            dropped.append(f"Nothing left to cut: {why}; settings that do not fit when their turn comes are "
                           "skipped.")
            break
    estimates = {"reference features": reference_seconds, "evaluations": cost, "training (least)": training,
                 "margin": margin}
    return Plan(order, samples, estimates, dropped)


def evaluation_seconds(config: QualityStudyConfig, settings: list, samples: int, speed: dict) -> float:
    """Planned seconds of the evaluations: the settings' (see `setting_seconds`) and the model calls of the extras
    (see `extra_seconds`)."""
    extras = sum(extra_seconds(config, speed).values())
    return sum(setting_seconds(setting, samples, speed) for setting in settings) + extras


def setting_seconds(setting: Setting, samples: int, speed: dict) -> float:
    """Seconds of one setting: its model calls at the measured rate, then its Inception features and FID / KID
    (speed["seconds_after_sampling"] once a setting has been measured)."""
    after = speed.get("seconds_after_sampling", samples / speed["inception_per_second"] + FID_SECONDS)
    return samples * setting.nfe / speed["calls_per_second"] + after


def extra_seconds(config: QualityStudyConfig, speed: dict) -> dict:
    """Seconds of each extra: its model calls at the measured rate, the scan's at one process's share of it (the
    scan is not split over torchrun processes)."""
    one_process = speed["calls_per_second"] / speed.get("processes", 1)
    return {name: calls / (one_process if name == "scan" else speed["calls_per_second"])
            for name, calls in extra_calls(config).items()}


def extra_calls(config: QualityStudyConfig) -> dict:
    """Model calls of the evaluations that are not settings: the tercile samples of every model (part 4), DC
    steering to two targets (part 3) and the eps-norm scan (forward pass and one chain per lambda, part 2)."""
    steps, per_class = config.sample_steps, config.samples_per_class
    return {"terciles": steps * per_class * 3 * (1 + len(config.fix_names)), "steering": steps * per_class * 2,
            "scan": steps * config.exposure_images * (1 + len(config.lambdas))}


# ----------------------------------------------------------------------------- reference, settings, models

def reference_images(dataset, count: int) -> torch.Tensor:
    """Up to `count` training images (uint8 (N, C, H, W)) spread evenly over the dataset."""
    if count >= len(dataset):
        return dataset.images
    return dataset.images[torch.linspace(0, len(dataset) - 1, count).round().long()]


def reference_path(config: QualityStudyConfig, images: torch.Tensor) -> Path:
    """The reference features' cache file, named by the images' content (so by the data, resolution and count)
    and by the FID protocol version and network."""
    digest = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:20]
    folder = Path(config.cache or os.environ.get("LDM_LITE_CACHE") or "runs/cache")
    return folder / f"fid_reference_{digest}_{len(images)}_protocol{PROTOCOL_VERSION}_{WEIGHTS_SHA1[:12]}.safetensors"


def reference_statistics(path: Path, images: torch.Tensor, config: QualityStudyConfig, shards: "Shards"):
    """FidStatistics (features kept, for KID) of the reference images, read from the cache or computed once."""
    if path.is_file():
        return FidStatistics.load(path)
    features = shards.features(images)
    stats = FidStatistics.from_features(features, source=f"{config.data}: {len(images)} training images at "
                                        f"{config.resolution} px")
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # renamed: a killed run leaves no half file
    stats.save(partial)
    partial.replace(path)
    return stats


def check_study_settings(config: QualityStudyConfig, out: Path, record: bool = True) -> None:
    """Refuse to continue a study in `out` made with other settings (every field but RESUMABLE_FIELDS) unless
    --fresh, which deletes its records and evaluations first (train() deletes the checkpoints); then record
    this study's settings in study.json. record=False only refuses: the call made before the inputs are
    known good, so a study that fails on them leaves no record to block the corrected command."""
    path = out / "study.json"
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_FIELDS}
    if config.fresh and not record:
        return
    if config.fresh:
        (out / "trained.json").unlink(missing_ok=True)
        (out / "choices.json").unlink(missing_ok=True)
        shutil.rmtree(out / "eval", ignore_errors=True)
    elif path.is_file():
        saved = json.loads(path.read_text())
        differing = sorted(k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k))
        if differing:
            raise ValueError(f"{str(out)!r} holds a study made with other settings ({', '.join(differing)}); pass "
                             "--fresh to start over (deletes its models and evaluations) or choose another --out")
    if record:
        path.write_text(json.dumps(settings, indent=2))


def first_choices(out: Path, speed: dict) -> int | None:
    """The samples per setting of the run that made this study's first evaluations (choices.json), or None when
    there are none yet; its autocast choice replaces the one just measured in `speed`. Both are part of every
    saved evaluation's key, and all settings share one n: a resumed run, with training done, would often plan
    more samples, and a re-measured bf16 gain near BF16_GAIN can flip; either would make every saved evaluation
    stale."""
    path = out / "choices.json"
    evaluated = (out / "eval").is_dir() and any((out / "eval").iterdir())
    if not (evaluated and path.is_file()):
        return None
    saved = json.loads(path.read_text())
    speed["autocast"] = saved["autocast"]
    speed["calls_per_second"] = speed.get("processes", 1) * speed["bf16_calls_per_second" if saved["autocast"] ==
                                                                  "bf16" else "fp32_calls_per_second"]
    return saved["samples"]


def record_choices(out: Path, plan: Plan, speed: dict) -> None:
    (out / "choices.json").write_text(json.dumps({"samples": plan.samples, "autocast": speed["autocast"]}))


def study_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here")
    return torch.device(name)


def _trained_record(out: Path) -> dict:
    path = out / "trained.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def train_study_models(config: QualityStudyConfig, names: list, clock: Clock, plan: Plan, device) -> dict:
    """Train the models two at a time (one process and one thread each) for the same number of steps: the first
    pair for its share of what the planned evaluations leave (at least the plan's training floor), later pairs for
    as many steps as it reached, capped at 1.25 times that share. trained.json records finished models, so a
    resumed study loads them. Returns {name: trained model info}."""
    out, record = Path(config.out), _trained_record(Path(config.out))
    pending = [pair for pair in (names[i:i + 2] for i in range(0, len(names), 2))
               if any(name not in record for name in pair)]
    available = clock.left() - plan.estimates["evaluations"] - plan.estimates["margin"]
    share = max(available, plan.estimates["training (least)"]) / 60 / max(len(pending), 1)
    for pair in pending:
        steps = record.get("steps", config.steps)
        minutes = min(share * (1.25 if "steps" in record else 1.0), (clock.left() - plan.estimates["margin"]) / 60)
        configs = {name: train_config(config, name, minutes, 1 if len(pair) > 1 else 0, steps) for name in pair}
        clock.time(f"train {' + '.join(pair)}", _train_in_processes, configs, config.progress, device.type == "cpu")
        for name in pair:
            record[name] = int(load_checkpoint(Path(configs[name].run.out) / CHECKPOINT_NAME)["step"])
        record.setdefault("steps", min(record[name] for name in pair))
        (out / "trained.json").write_text(json.dumps(record))
    return {name: load_trained(config, name, record.get("steps", config.steps), device) for name in names}


def load_trained(config: StudyConfig, name: str, steps: int, device) -> dict:
    trained_config = train_config(config, name, 0.1, steps=steps)
    run_dir = Path(trained_config.run.out)
    return {"model": load_unet(run_dir).to(device).eval(), "config": trained_config, "run_dir": run_dir,
            "steps": int(load_checkpoint(run_dir / CHECKPOINT_NAME)["step"])}


def offset_training_noise(scheduler, shape, n: int, strength: float, seed: int) -> torch.Tensor:
    """x_T (n, C, H, W) drawn like the offset model's training noise, randn + s randn(C, 1, 1) per image, from
    sample i's own generator: its randn part is the plain x_T of sample i, so the settings stay paired."""
    generators = sample_generators(seed, 0, n)
    x_T = initial_noise(scheduler, (n, *shape), generator=generators)
    offsets = torch.stack([torch.randn(shape[0], 1, 1, generator=g) for g in generators])
    return x_T + strength * float(scheduler.init_noise_sigma) * offsets


# ----------------------------------------------------------------------------- evaluation

PER_SAMPLE = ("x_T", "class_labels", "leak")  # sample() keywords that may hold one row per sample


def _rows(value, rows: range):
    """A sample() keyword's rows for samples `rows`: a list or a tensor with one row per sample is sliced (a leak
    only as (n, C, H, W) images); one value for all (an int label, LeakStats, a (C, H, W) leak) stays whole."""
    if isinstance(value, (list, tuple)):
        value = torch.as_tensor(value)
    if not isinstance(value, torch.Tensor) or value.dim() in (0, 3):
        return value
    return value[rows.start:rows.stop]


class Shards:
    """The study's sampling and Inception features, split over the processes of `torchrun --nproc_per_node N -m
    analysis study` (with one process, everything runs here, unsplit).

    Rank 0 runs the study. Each draw of n samples and each feature computation is a job sent to every rank; a rank
    computes its share (`distributed.share`: a contiguous block; sample i still draws from sample_seed(seed, i),
    so the images do not depend on the number of processes) and all_gather_object collects the shares in rank
    order. The other ranks wait in `serve()` until `close()`. Rank 0's models are the trained ones; the others load
    each from its run folder the first time a job names it."""

    def __init__(self, world: World, device: torch.device, config: QualityStudyConfig, network=None):
        self.world, self.device, self.config, self.network = world, device, config, network
        self.models = {}

    def draw(self, trained: dict, scheduler, n: int, steps: int, autocast_dtype, **kwargs) -> torch.Tensor:
        """n samples (n, C, H, W) in [-1, 1] on the CPU, as `ldm_lite.sampling.sample` draws them (the study's seed
        and evaluation batch), from `trained` (a dict of `load_trained`) with `scheduler`."""
        self.models.setdefault(str(trained["run_dir"]), trained["model"])
        # its config, not the object: a multistep scheduler holds the last batch's outputs (on the device)
        scheduler_config = {"_class_name": type(scheduler).__name__, **scheduler.config}
        return self._run(dict(kind="draw", run_dir=str(trained["run_dir"]), scheduler=scheduler_config, n=n,
                              steps=steps, autocast_dtype=autocast_dtype, kwargs=kwargs))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Inception features (N, 2048) of uint8 images (N, C, H, W) (`ldm_lite.quality.inception_features`)."""
        return self._run(dict(kind="features", n=len(images), images=images))

    def serve(self) -> None:
        """Ranks other than 0: do the jobs rank 0 sends until it closes."""
        while (job := self._broadcast(None)) is not None:
            self._gather(self._share(job))

    def close(self) -> None:
        if self.world.size > 1:
            self._broadcast(None)

    def _run(self, job: dict) -> torch.Tensor:
        if self.world.size == 1:
            return self._share(job)
        self._broadcast(job)
        return self._gather(self._share(job))

    def _broadcast(self, job):
        box = [job]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _gather(self, part: torch.Tensor) -> torch.Tensor:
        parts = [None] * self.world.size
        torch.distributed.all_gather_object(parts, part)
        return torch.cat(parts)

    def _share(self, job: dict) -> torch.Tensor:
        """This rank's block of the job's n rows, on the CPU."""
        mine, c = share(job["n"], self.world), self.config
        progress = c.progress and self.world.is_main
        if job["kind"] == "features":
            if not mine:
                return torch.empty(0, FEATURE_DIM)
            if self.network is None:
                self.network = load_fid_inception(self.device)
            return inception_features(job["images"][mine.start:mine.stop], device=self.device, progress=progress,
                                      network=self.network)
        model = self.models.get(job["run_dir"])
        if model is None:
            model = self.models[job["run_dir"]] = load_unet(job["run_dir"]).to(self.device).eval()
        if not mine:
            size = model.config.sample_size
            return torch.empty(0, model.config.in_channels, size, size)
        kwargs = {name: _rows(value, mine) if name in PER_SAMPLE else value for name, value in job["kwargs"].items()}
        return sample(model, from_config(job["scheduler"]), len(mine), num_inference_steps=job["steps"], seed=c.seed,
                      first_index=mine.start, batch_size=c.eval_batch_size, progress=progress, device=self.device,
                      autocast_dtype=job["autocast_dtype"], **kwargs).clamp(-1, 1).cpu()


@dataclass
class Evaluator:
    """What the evaluated settings share: settings, device and autocast, the shards (sampling and FID network,
    split over the torchrun processes), the FID reference, the
    reference images as float (N, C, H, W) in [-1, 1] for the bias metrics, the leak statistics, the samples per
    setting and the output folder. `images` keeps every setting's uint8 samples."""
    config: QualityStudyConfig
    device: torch.device
    autocast_dtype: torch.dtype | None
    shards: Shards
    reference: FidStatistics
    reference_name: str
    data: torch.Tensor
    leak: LeakStats
    samples: int
    out: Path
    images: dict = dataclasses.field(default_factory=dict)

    def draw(self, trained: dict, scheduler, n: int, steps: int, **kwargs) -> torch.Tensor:
        """n samples (n, C, H, W) in [-1, 1] on the CPU, batched, from the study's seed."""
        return self.shards.draw(trained, scheduler, n, steps, self.autocast_dtype, **kwargs)

    def evaluate(self, setting: Setting, trained: dict) -> dict:
        """The row of one setting: the setting, FID, KID, the bias metrics, seconds. Samples (uint8, as a PNG
        holds them) and features land in eval/<key>.safetensors; a resumed study reuses them (row["reused"])."""
        path = self.out / "eval" / f"{setting.key}.safetensors"
        key = json.dumps({"setting": dataclasses.asdict(setting), "n": self.samples, "seed": self.config.seed,
                          "model_steps": trained["steps"], "autocast": str(self.autocast_dtype),
                          "reference": self.reference_name})
        cached = _read_evaluation(path, key)
        if cached is not None:
            self.images[setting.key] = cached[0]
            return cached[1]
        started = time.monotonic()
        scheduler = from_config(trained["config"], setting.sampler)
        scheduler.set_timesteps(setting.steps)
        start = {"leak": self.leak} if setting.start == LEAK else {}
        if setting.start == OWN_NOISE:
            start["x_T"] = offset_training_noise(scheduler, self.data.shape[1:], self.samples,
                                                 self.config.offset_noise, self.config.seed)
        images = to_uint8(self.draw(trained, scheduler, self.samples, setting.steps,
                                    class_labels=trained["model"].config.num_classes,
                                    eps_scale=setting.eps_scale if setting.eps_scale != 1 else None, **start))
        sampling = time.monotonic() - started
        features = self.shards.features(images)
        row = {**dataclasses.asdict(setting), **self.measure(images, features), "sampling_seconds": sampling,
               "seconds": time.monotonic() - started}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"samples": images.contiguous(), "features": features.contiguous()}, str(path),
                  metadata={"key": key, "row": json.dumps(row)})
        self.images[setting.key] = images
        return row

    def measure(self, images: torch.Tensor, features: torch.Tensor) -> dict:
        """FID, KID (mean, std over 100 subsets of n // 2) against the reference, and the bias metrics of
        uint8 samples (n, C, H, W) against the reference images: luminance W1 (with its bootstrap sd), KS, std
        ratio, mean brightness and the finest octave's spectrum ratio."""
        quality = quality_report(FidStatistics.from_features(features), self.reference, kid=True,
                                 seed=self.config.seed)  # KID: 100 subsets of min(1000, n // 2) images
        samples = to_float(images)
        report = metrics.brightness_report(samples, self.data)
        luminance = next(r for r in report["rows"] if r["quantity"] == "luminance")
        spread = w1_spread(report["samples"]["luminance"], report["data"]["luminance"], self.config.seed)
        every = torch.linspace(0, len(self.data) - 1, min(SPECTRUM_IMAGES, len(self.data))).round().long()
        spectrum = metrics.spectrum_report(samples, self.data[every])
        return dict(kid=quality["kid_mean"], kid_std=quality["kid_std"], fid=quality["fid"], n=quality["n_samples"],
                    w1=luminance["wasserstein"], w1_sd=spread, ks=luminance["ks"], std_ratio=luminance["std_ratio"],
                    mean=float(samples.mean()), hf_log10=finest_octave_ratio(spectrum, samples.shape[-1]))


def _read_evaluation(path: Path, key: str):
    """(uint8 samples, row) of an earlier evaluation of the same setting, or None."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("key") != key:
            return None
        return handle.get_tensor("samples"), {**json.loads(metadata["row"]), "reused": True}


def w1_spread(samples: torch.Tensor, data: torch.Tensor, seed: int, draws: int = 100) -> float:
    """Bootstrap standard deviation of the W1 distance between the samples' and the data's brightness (samples
    (n,) resampled with replacement, data fixed), so that W1 differences are judged like KID's."""
    generator = torch.Generator().manual_seed(seed)
    values = [metrics.wasserstein_1d(samples[torch.randint(len(samples), (len(samples),), generator=generator)],
                                     data) for _ in range(draws)]
    return float(torch.tensor(values).std())


def finest_octave_ratio(spectrum: dict, size: int) -> float:
    """log10 of samples / data power in the finest complete octave of a `metrics.spectrum_report` (radial
    indices up to size - 1): above 0 the samples carry too much fine detail (noise), below 0 too little (blur)."""
    return [row for row in spectrum["rows"] if row["k_max"] < size][-1]["log10_ratio"]


STAGES = (("fixes", "terciles", "part 4 (fixes)"), ("leak", "steering", "part 3 (signal leak)"),
          ("eps", "scan", "part 2 (epsilon scaling)"), ("samplers", None, "part 1 (samplers)"))


def run_evaluations(plan: Plan, parts: dict, models: dict, data, labels, evaluator: Evaluator, clock: Clock,
                    results: dict) -> dict:
    """The evaluations in order of importance: part 4's settings then its tercile samples, part 3's then DC
    steering, part 2's then the eps-norm scan, part 1's by NFE. The base setting always runs; anything else that
    no longer fits in what is left of the budget (and a minute for the report) is skipped, and the report says
    so. The estimates follow the machine: after each setting, the rates are those it ran at.
    Returns {"rows": {setting key: row}, "terciles": rows, "steering": rows, "scan": scan or None}."""
    config, rates = evaluator.config, dict(results["speed"])
    done = {"rows": {}, "terciles": [], "steering": [], "scan": None}
    extras = {"terciles": lambda: tercile_rows(models, data, labels, evaluator, results),
              "steering": lambda: steering_rows(models["standard"], data, labels, evaluator,
                                                done["rows"][plan.settings[0].key]["mean"], results),
              "scan": lambda: exposure_scan(models["standard"], data, evaluator)}
    for part, extra, title in STAGES:
        for setting in [s for s in plan.settings if s in parts[part] and s.key not in done["rows"]]:
            if done["rows"] and not _fits(setting.label, setting_seconds(setting, plan.samples, rates), clock,
                                          results):
                continue
            row = clock.time(f"evaluate {title}", evaluator.evaluate, setting, models[setting.model])
            done["rows"][setting.key] = row
            if not row.get("reused"):  # evaluated now, not read from an earlier run
                rates["calls_per_second"] = plan.samples * setting.nfe / row["sampling_seconds"]
                rates["seconds_after_sampling"] = row["seconds"] - row["sampling_seconds"]
        if extra and _fits(EXTRA_NAMES[extra], extra_seconds(config, rates)[extra], clock, results):
            done[extra] = clock.time(EXTRA_NAMES[extra], saved_extra, extra, extras[extra], models, evaluator,
                                     results)
    results["speed"]["observed_calls_per_second"] = rates["calls_per_second"]
    return done


EXTRA_NAMES = {"terciles": "tercile samples (part 4)", "steering": "DC steering (part 3)",
               "scan": "eps-norm scan (part 2)"}


def saved_extra(name: str, compute, models: dict, evaluator: Evaluator, results: dict):
    """An extra's result (rows, or the scan) from eval/<name>.json when an earlier run of this study computed it
    with the same models and autocast (its sample grids are on disk already), else computed and saved there."""
    path = evaluator.out / "eval" / f"{name}.json"
    key = {"models": {model: trained["steps"] for model, trained in models.items()},
           "autocast": str(evaluator.autocast_dtype)}
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("key") == key and all((evaluator.out / grid).is_file() for grid in saved["grids"].values()):
        results["grids"].update(saved["grids"])
        return _scan_from_json(saved["value"]) if name == "scan" else saved["value"]
    before = set(results["grids"])
    value = compute()
    grids = {caption: grid for caption, grid in results["grids"].items() if caption not in before}
    record = {"key": key, "grids": grids, "value": _scan_to_json(value) if name == "scan" else value}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(record))  # NaN stays a float (Python's json reads its NaN token back)
    partial.replace(path)
    return value


def _scan_to_json(scan: dict) -> dict:
    """What the tables and the scan plot use of `metrics.scan_eps_scale`'s result, as lists."""
    def curve(trace):
        return {"timesteps": trace["timesteps"].tolist(), "eps_norm": trace["eps_norm"].tolist()}
    return {"candidates": list(scan["candidates"]), "gap": [float(g) for g in scan["gap"]], "best": scan["best"],
            "forward": curve(scan["forward"]), "traces": [curve(trace) for trace in scan["traces"]]}


def _scan_from_json(saved: dict) -> dict:
    def curve(trace):
        return {name: torch.tensor(values) for name, values in trace.items()}
    return {**saved, "forward": curve(saved["forward"]), "traces": [curve(trace) for trace in saved["traces"]]}


def _fits(label: str, seconds: float, clock: Clock, results: dict) -> bool:
    """Whether `seconds` of work and a minute for the report fit in what is left; if not, say it was skipped."""
    if clock.left() >= seconds + 60:
        return True
    results["dropped"].append(f"{label} skipped at run time: {max(clock.left(), 0) / 60:.1f} min of the budget were "
                              f"left and it needed about {seconds / 60:.1f} min, plus a minute for the report.")
    return False


def exposure_scan(trained: dict, data: torch.Tensor, evaluator: Evaluator) -> dict:
    """Part 2's exposure metric: `metrics.scan_eps_scale` on `exposure_images` training images (the standard
    model, DDIM at sample_steps, unconditional): per lambda the eps-norm gap between sampling and training."""
    config = evaluator.config
    chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))[:config.exposure_images]
    return metrics.scan_eps_scale(trained["model"], from_config(trained["config"]), data[chosen], config.lambdas,
                                  num_inference_steps=config.sample_steps, seed=config.seed,
                                  batch_size=config.eval_batch_size, class_labels=trained["model"].config.num_classes,
                                  progress=config.progress, autocast_dtype=evaluator.autocast_dtype)


def tercile_rows(models: dict, data, labels, evaluator: Evaluator, results: dict) -> list:
    """Part 4's conditional view: per model and brightness tercile, samples_per_class samples asked for it (DDIM,
    sample_steps; the offset model from its own training noise), their mean brightness vs the tercile's."""
    config, rows = evaluator.config, []
    class_labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(config.samples_per_class)
    for name, trained in models.items():
        scheduler = from_config(trained["config"])
        scheduler.set_timesteps(config.sample_steps)
        x_T = offset_training_noise(scheduler, data.shape[1:], len(class_labels), config.offset_noise,
                                    config.seed) if name == "offset" else None
        images = evaluator.draw(trained, scheduler, len(class_labels), config.sample_steps,
                                class_labels=class_labels, x_T=x_T)
        save_class_grid(images, class_labels, evaluator.out / f"grid_{name}_classes.png", config)
        results["grids"][f"{name}: asked for dark / mid / bright (rows)"] = f"grid_{name}_classes.png"
        rows += class_rows(name, trained, scheduler, images, class_labels, data, labels, config.seed)
    return rows


def steering_rows(trained: dict, data, labels, evaluator: Evaluator, plain_mean: float, results: dict) -> list:
    """Part 3's DC steering (Everaert et al. 2024): the leak's DC coefficient of every channel fixed to the dark,
    then the bright tercile's channel mean; samples' mean brightness against that target and plain noise's."""
    config, rows, (channels, height, width) = evaluator.config, [], data.shape[1:]
    scheduler = from_config(trained["config"])
    scheduler.set_timesteps(config.sample_steps)
    t0 = int(scheduler.timesteps[0])
    for c in (0, len(CLASS_NAMES) - 1):
        means = data[labels == c].mean(dim=(0, 2, 3))  # (C,)
        leak = evaluator.leak.with_components({(k, (0, 0)): float(means[k]) * math.sqrt(height * width)
                                               for k in range(channels)})
        images = evaluator.draw(trained, scheduler, config.samples_per_class, config.sample_steps, leak=leak,
                                class_labels=trained["model"].config.num_classes)
        target, got = float(means.mean()), float(images.mean())
        name = f"grid_steered_{CLASS_NAMES[c]}.png"
        save_image_grid(images[:64], evaluator.out / name, nrow=16, scale=_grid_scale(config))
        results["grids"][f"standard, leak DC steered to the {CLASS_NAMES[c]} tercile"] = name
        rows.append(dict(model="standard", steered_to=CLASS_NAMES[c], t0=t0,
                         sqrt_alpha_bar_t0=float(scheduler.alphas_cumprod[t0]) ** 0.5, n=len(images),
                         target_mean=target, plain_mean=plain_mean, samples_mean=got,
                         share=(got - plain_mean) / (target - plain_mean) if target != plain_mean else math.nan))
    return rows


def run_quality_study(config: QualityStudyConfig) -> dict | None:
    """The study on real images: measure the machine, plan the budget, reference features (cached), train the
    models two at a time, evaluate every planned setting, then the tables, figures, findings and report.
    Under torchrun, rank 0 does all that and hands the sampling and Inception features out in shares (`Shards`);
    the other ranks serve it and return None."""
    device = study_device(config.device)
    # the other ranks wait in a collective while rank 0 trains: a timeout beyond the whole budget
    world = init_world(device.type, timeout=datetime.timedelta(minutes=2 * config.minutes + 30))
    device = world.device if world.size > 1 else device
    shards = Shards(world, device, config)
    if not world.is_main:
        return shards.serve()
    # no collective after an error (the other ranks may be inside a job): rank 0 exits, and torchrun stops them
    with FolderLock(config.out):  # one study per folder
        results = _run_quality_study(config, device, shards)
    shards.close()
    return results


def _run_quality_study(config: QualityStudyConfig, device: torch.device, shards: Shards) -> dict:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    check_study_settings(config, out, record=False)
    clock = Clock(config.minutes)
    dataset = clock.time("load data", load_study_data, config)
    check_study_settings(config, out)  # the data are good: record the settings
    data = to_float(dataset.images)
    network = shards.network = clock.time("load the FID network", load_fid_inception, device)
    speed = clock.time("measure speed", measure_speed, config, data.shape[1], network, device, shards.world.size)
    chosen = reference_images(dataset, config.reference_images)
    ref_path = reference_path(config, chosen)
    names, parts = ["standard", *config.fix_names], study_parts(config)
    cached = ref_path.is_file()
    reference = clock.time("reference features", reference_statistics, ref_path, chosen, config, shards)
    if not cached:  # thousands of images measure the Inception rate better than the start-up run
        speed["inception_per_second"] = len(chosen) / clock.parts["reference features"]
    train_needed = any(name not in _trained_record(out) for name in names)
    kept = first_choices(out, speed)
    plan = plan_study(config, parts, speed, 0.0, train_needed, clock.left(), samples=kept)
    if kept is None:
        record_choices(out, plan, speed)
    models = train_study_models(config, names, clock, plan, device)
    leak = clock.time("leak statistics", LeakStats.fit_batches, data.split(1024), "dct+pixel", 3)
    evaluator = Evaluator(config, device, torch.bfloat16 if speed["autocast"] == "bf16" else None, shards,
                          reference, ref_path.name, to_float(chosen), leak, plan.samples, out)
    results = {"study": "quality", "config": dataclasses.asdict(config), "speed": speed, "dropped": list(plan.dropped),
               "estimates": plan.estimates, "samples": plan.samples, "tables": {}, "figures": {}, "grids": {},
               "reference": {"path": str(ref_path), "images": len(chosen), "source": reference.source},
               "models": [model_row(name, trained) for name, trained in models.items()]}
    done = run_evaluations(plan, parts, models, data, dataset.labels, evaluator, clock, results)
    results["tables"] = quality_tables(parts, done["rows"], done["scan"], done["terciles"], done["steering"])
    clock.time("figures", quality_figures, parts, done["scan"], evaluator, results)
    results["findings"] = quality_findings(results["tables"])
    results["timings"] = clock.parts
    results["total_seconds"] = time.monotonic() - clock.start
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2))
    write_report(results, out / "report.html")
    (out / "report.md").write_text(format_quality_results(results, markdown=True))
    return results


def model_row(name: str, trained: dict) -> dict:
    c = trained["config"]
    noise = "randn"
    if c.noise.offset_noise:
        noise = f"randn + offset noise {c.noise.strength('offset_noise_strength'):g}"
    elif c.noise.input_perturbation:
        noise = f"randn, input perturbation gamma {c.noise.strength('input_perturbation_gamma'):g}"
    return dict(model=name, schedule=_schedule_name(trained), prediction=c.diffusion.prediction_type,
                spacing=c.scheduler_config()["timestep_spacing"], training_noise=noise, steps=trained["steps"],
                batch_size=c.train.batch_size, seed=c.train.seed, precision=c.train.precision)


# ----------------------------------------------------------------------------- tables and figures

IDENTITY = {"samplers": ("sampler", "level", "nfe", "steps"), "eps": ("eps_scale",), "leak": ("start",),
            "fixes": ("model", "start")}
BIAS_COLUMNS = ("w1", "w1_sd", "ks", "std_ratio", "mean", "hf_log10", "n", "seconds")


def quality_tables(parts: dict, rows: dict, scan: dict, terciles: list, steering: list) -> dict:
    """The report's tables, each led by KID (see `comparison_rows`) against its baseline: DDIM at the same NFE
    (part 1), lambda 1 (part 2), plain noise (part 3), the standard model (part 4)."""
    samplers = parts["samplers"]

    def same_level(setting):
        peers = [s for s in samplers if s.level == setting.level and s.key in rows]
        return next((s for s in peers if s.sampler == "ddim"), None)  # without DDIM the rows say "no baseline"

    scanned = [dict(eps_scale=c, eps_norm_gap=g) for c, g in zip(scan["candidates"], scan["gap"])] if scan else []
    gaps = {row["eps_scale"]: row["eps_norm_gap"] for row in scanned}
    eps = comparison_rows(parts["eps"], rows, IDENTITY["eps"], lambda s: replace(s, eps_scale=1.0))
    for row in eps:
        row["eps_norm_gap"] = gaps.get(row["eps_scale"], math.nan)
    return {"samplers": comparison_rows(samplers, rows, IDENTITY["samplers"], same_level), "eps": eps,
            "leak": comparison_rows(parts["leak"], rows, IDENTITY["leak"], lambda s: parts["leak"][0]),
            "scan": scanned, "steering": steering, "terciles": terciles,
            "fixes": comparison_rows(parts["fixes"], rows, IDENTITY["fixes"], lambda s: parts["fixes"][0])}


def comparison_rows(settings: list, rows: dict, identity: tuple, baseline_of) -> list:
    """Rows of the evaluated `settings` led by KID: the identity columns, kid, kid_std, fid, the KID difference to
    the baseline setting (`baseline_of(setting)`) and whether it exceeds two standard deviations
    (sqrt(kid_std^2 + kid_std_baseline^2)), then the bias metrics (BIAS_COLUMNS)."""
    table = []
    for setting in settings:
        if setting.key not in rows:
            continue
        baseline = baseline_of(setting)
        row, base = rows[setting.key], rows.get(baseline.key) if baseline is not None else None
        entry = {name: row[name] for name in identity}
        entry.update(kid=row["kid"], kid_std=row["kid_std"], fid=row["fid"])
        if base is None:
            entry.update(kid_diff=math.nan, beyond_2sd="no baseline")
        else:
            difference, beyond = significant(row, base, "kid", "kid_std")
            entry.update(kid_diff=difference, beyond_2sd="baseline" if base is row else "yes" if beyond else "no")
        entry.update({name: row[name] for name in BIAS_COLUMNS})
        table.append(entry)
    return table


def significant(row: dict, base: dict, value: str, sd: str) -> tuple:
    """(row[value] - base[value], whether it exceeds two standard deviations sqrt(sd_row^2 + sd_base^2))."""
    difference = row[value] - base[value]
    return difference, abs(difference) > 2 * math.hypot(row[sd], base[sd])


def quality_figures(parts: dict, scan: dict | None, evaluator: Evaluator, results: dict) -> None:
    """FID against NFE, the epsilon-scaling plots, the brightness summary and one sample grid per setting (each
    figure whose evaluations ran)."""
    out, tables, figures = evaluator.out, results["tables"], results["figures"]
    if tables["samplers"]:
        figures["fid_nfe"] = plots.plot_fid_nfe(tables["samplers"], out / "fid_nfe.png").name
    if scan is not None:
        figures["eps_quality"] = plots.plot_eps_scale_quality(tables["eps"], out / "eps_scale_quality.png").name
        figures["eps_scan"] = plots.plot_eps_scale_scan(scan, out / "eps_scale_scan.png").name
    if tables["terciles"]:
        shown = [s for s in (*parts["leak"], *parts["fixes"][1:]) if s.key in evaluator.images]
        luminance = {"data": metrics.image_brightness(evaluator.data)["luminance"]}
        luminance.update({f"{s.model}, {s.start}": metrics.image_brightness(evaluator.images[s.key])["luminance"]
                          for s in shown})
        figures["summary"] = plots.plot_study_summary(tables["terciles"], luminance, out / "summary.png").name
    (out / "grids").mkdir(exist_ok=True)
    for setting in dict.fromkeys(s for part in parts.values() for s in part):
        if setting.key in evaluator.images:
            path = out / "grids" / f"{setting.key}.png"
            save_image_grid(to_float(evaluator.images[setting.key][:64]), path, nrow=16,
                            scale=_grid_scale(evaluator.config))
            results["grids"][setting.label] = f"grids/{path.name}"


# ----------------------------------------------------------------------------- findings
# Each sentence of the report that states a result is chosen here by the measured numbers.

def band_findings(destruction: list, band_leak: list, num_train_timesteps: int = 1000) -> list:
    """Sentences on which DCT band is destroyed last, per schedule, and how much SNR the DC band keeps at t0.

    destruction: rows with schedule, noise, band, destruction_timestep (num_train_timesteps when never destroyed);
    band_leak: rows with schedule, spacing, band, t0, snr_at_t0.
    """
    sentences = []
    for schedule, noise in dict.fromkeys((row["schedule"], row.get("noise", "white")) for row in destruction):
        rows = sorted((r for r in destruction if r["schedule"] == schedule and r.get("noise", "white") == noise),
                      key=lambda r: r["band"])
        if noise != "white":
            schedule = f"{schedule} with {noise} noise"
        dc, last = rows[0], max(rows, key=lambda r: (r["destruction_timestep"], -r["band"]))
        never = [r["band"] for r in rows if r["destruction_timestep"] >= num_train_timesteps]
        if dc["band"] in never:
            text = f"under {schedule} the DC band is never destroyed (its SNR stays above 1 up to t = " \
                   f"{num_train_timesteps - 1})"
        elif last is dc:
            text = f"under {schedule} the DC band is the last to fall below SNR 1, at t = {dc['destruction_timestep']}"
        else:
            text = (f"under {schedule} band {last['band']} is the last to fall below SNR 1 (t = "
                    f"{last['destruction_timestep']}), not the DC band (t = {dc['destruction_timestep']})")
        if never and dc["band"] not in never:
            text += f"; bands {never} are never destroyed"
        sentences.append(text[0].upper() + text[1:] + ".")
    for row in (r for r in band_leak if r["band"] == 0):
        kept = "keeps" if row["snr_at_t0"] > 0 else "has lost all"
        sentences.append(f"At the first sampled step of {row['schedule']} ({row['spacing']} spacing, t0 = "
                         f"{row['t0']}) the DC band {kept} signal: SNR {row['snr_at_t0']:.3g}.")
    return sentences


def offset_findings(rows: list) -> list:
    """Per model: the share of the gap between mid-grey (0) and the data's class mean that its dark and bright
    samples close (1 = they reach the data's class mean)."""
    sentences = []
    for model in dict.fromkeys(r["model"] for r in rows):
        extremes = [r for r in rows if r["model"] == model and r["asked"] in ("dark", "bright")]
        shares = [r["samples_mean"] / r["data_mean"] for r in extremes if abs(r["data_mean"]) > 1e-6]
        if shares:
            closed = sum(shares) / len(shares)
            sentences.append(f"{model}: asked for dark or bright, its samples get {closed:.0%} of the way from "
                             f"mid-grey to the data's class mean.")
    return sentences


def leak_findings(rows: list) -> list:
    """Per setting: whether the brightness spread of unconditional samples is squeezed (std ratio < 0.9),
    matches (0.9-1.1) or is wider than the data's, and which initial noise brings the standard model closest."""
    sentences = []
    for r in rows:
        ratio = r["std_ratio"]
        verdict = "squeezed toward mid-grey" if ratio < 0.9 else "wider than the data" if ratio > 1.1 else \
            "about as wide as the data's"
        sentences.append(f"{r['model']} from {r['initial_noise']}: brightness spread {verdict} (std ratio "
                         f"{ratio:.2f}, W1 {r['wasserstein']:.3f}).")
    standard = [r for r in rows if r["model"] == "standard"]
    if len(standard) > 1:
        best = min(standard, key=lambda r: r["wasserstein"])
        sentences.append(f"For the standard model, {best['initial_noise']} gives the brightness distribution "
                         f"closest to the data (lowest W1).")
    return sentences


def _beyond(beyond: bool) -> str:
    return "beyond" if beyond else "within"


def sampler_findings(rows: list) -> list:
    """Part 1. Per NFE level, the sampler with the lowest KID and whether its lead over the runner-up exceeds two
    standard deviations; per sampler, its FID at its fewest and most model calls and whether KID moved."""
    sentences = []
    for level in sorted({r["level"] for r in rows}):
        ranked = sorted((r for r in rows if r["level"] == level), key=lambda r: r["kid"])
        best, text = ranked[0], ""
        if len(ranked) > 1:
            lead = significant(ranked[1], best, "kid", "kid_std")[1]
            text = (f"; its lead over {ranked[1]['sampler']} (KID {ranked[1]['kid']:.4f}) is {_beyond(lead)} two "
                    "standard deviations")
        sentences.append(f"At about {level} model calls, {best['sampler']} has the lowest KID ({best['kid']:.4f} "
                         f"± {best['kid_std']:.4f}, FID {best['fid']:.2f}){text}.")
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["nfe"])
        if len(mine) > 1:
            first, last = mine[0], mine[-1]
            moved = significant(last, first, "kid", "kid_std")[1]
            sentences.append(f"{sampler}: FID {first['fid']:.2f} at {first['nfe']} model calls, {last['fid']:.2f} at "
                             f"{last['nfe']}; the KID change ({last['kid'] - first['kid']:+.4f}) is {_beyond(moved)} "
                             "two standard deviations.")
    return sentences


def eps_findings(rows: list, scan: list = ()) -> list:
    """Part 2. The lambda with the lowest FID (among the evaluated `rows`) against the lambda whose eps-norm along
    sampling is closest to the forward eps-norm (among every lambda of the scan, `metrics.scan_eps_scale`; rows
    {eps_scale, eps_norm_gap}): whether they agree, and whether FID's pick beats lambda = 1 by more than two KID
    standard deviations."""
    if not rows:
        return []
    by_fid = min(rows, key=lambda r: r["fid"])
    picked = f"FID picks lambda = {by_fid['eps_scale']:g} (FID {by_fid['fid']:.2f})"
    scan = [r for r in scan if math.isfinite(r["eps_norm_gap"])]  # a chain that blew up picks nothing
    if scan:
        by_gap = min(scan, key=lambda r: r["eps_norm_gap"])
        agree = "agree" if by_fid["eps_scale"] == by_gap["eps_scale"] else "disagree"
        sentences = [f"{picked}; the exposure metric (eps-norm along sampling closest to the forward eps-norm) picks "
                     f"lambda = {by_gap['eps_scale']:g} (gap {by_gap['eps_norm_gap']:.4f}): they {agree}."]
    else:
        sentences = [f"{picked}; the eps-norm scan did not run, so the exposure metric has no pick."]
    base = next((r for r in rows if r["eps_scale"] == 1.0), None)
    if base is not None and by_fid is not base:
        difference, beyond = significant(by_fid, base, "kid", "kid_std")
        sentences.append(f"Against lambda = 1, FID's pick changes KID by {difference:+.4f}, {_beyond(beyond)} two "
                         "standard deviations.")
    return sentences


VERDICTS = {(False, False): "changes neither quality nor brightness measurably",
            (False, True): "changes brightness only", (True, True): "changes brightness and quality",
            (True, False): "changes quality, not brightness"}


def change_findings(rows: list, label) -> list:
    """Parts 3 and 4. Each row against its table's baseline row: does it change quality (KID) and brightness
    (luminance W1 against the data), each judged against two standard deviations (KID's over subsets, W1's by
    bootstrap)? label(row) names a row."""
    base = next((r for r in rows if r.get("beyond_2sd") == "baseline"), None)
    sentences = []
    for row in rows if base is not None else []:
        if row is base:
            continue
        kid_change, quality = significant(row, base, "kid", "kid_std")
        w1_change, brightness = significant(row, base, "w1", "w1_sd")
        sentences.append(
            f"{label(row)} against {label(base)}: {VERDICTS[quality, brightness]} at n = {row['n']} (KID "
            f"{base['kid']:.4f} -> {row['kid']:.4f}, {'lower' if kid_change < 0 else 'higher'}, {_beyond(quality)} two "
            f"standard deviations; luminance W1 {base['w1']:.3f} -> {row['w1']:.3f}, "
            f"{'closer to' if w1_change < 0 else 'further from'} the data, {_beyond(brightness)} two bootstrap "
            f"standard deviations; std ratio {base['std_ratio']:.2f} -> {row['std_ratio']:.2f}).")
    return sentences


def steering_findings(rows: list) -> list:
    """Part 3. How far DC steering moves the samples' mean brightness from plain noise's toward the target."""
    return [f"Steering the leak's DC to the {r['steered_to']} tercile's mean ({r['target_mean']:+.3f}) moves the "
            f"samples' mean brightness from {r['plain_mean']:+.3f} (plain noise) to {r['samples_mean']:+.3f}: "
            f"{r['share']:.0%} of the way (sqrt(alpha_bar) = {r['sqrt_alpha_bar_t0']:.4f} at t0 = {r['t0']})."
            for r in rows if math.isfinite(r["share"])]


def quality_findings(tables: dict) -> dict:
    """{part: sentences} of the study, each chosen by the numbers of its tables."""
    return {"samplers": sampler_findings(tables["samplers"]),
            "eps": eps_findings(tables["eps"], tables.get("scan", [])),
            "leak": change_findings(tables["leak"], lambda r: f"the standard model from {r['start']}")
            + steering_findings(tables["steering"]),
            "fixes": change_findings(tables["fixes"], lambda r: f"{r['model']} (from {r['start']})")
            + offset_findings(tables["terciles"])}


def _paragraph(sentences: list) -> str:
    return "<p>" + " ".join(html.escape(s) for s in sentences) + "</p>" if sentences else ""


# ----------------------------------------------------------------------------- report

def format_results(results: dict) -> str:
    """The study's result tables, and the findings computed from them, as plain text."""
    if results.get("study") == "quality":
        return format_quality_results(results)
    tables = results["tables"]
    parts = ["Offset noise: class-conditional samples, mean brightness (data in [-1, 1])",
             metrics.format_table(tables["offset_noise"],
                                  ["model", "asked", "data_mean", "samples_mean", "gap", "steps", "n"]),
             *offset_findings(tables["offset_noise"]),
             "", "Signal leak: unconditional samples vs data, per-image luminance",
             metrics.format_table(tables["signal_leak"],
                                  ["model", "initial_noise", "t0", "std_ratio", "wasserstein", "ks", "n"]),
             *leak_findings(tables["signal_leak"])]
    if results.get("skipped"):
        parts += ["", results["skipped"]]
    return "\n".join(parts)


def write_report(results: dict, path: Path) -> None:
    """A self-contained HTML page (images referenced next to it) with every section of the demo or the study."""
    if results.get("study") == "quality":
        return _write_page("ldm_lite bias and quality study", _quality_sections(results), path)
    return _write_page("ldm_lite bias study", _demo_sections(results), path)


def _write_page(title: str, sections: list, path: Path) -> None:
    body = "".join(f"<h2>{html.escape(name)}</h2>{content}" for name, content in sections)
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _demo_sections(results: dict) -> list:
    config = results["config"]
    sections = [
        ("Summary", "<p>Left: mean brightness of class-conditional samples per asked class (part 2). Right: "
         "spread of the per-image brightness of unconditional samples against the data (part 3).</p>" +
         _img(results["figures"]["summary"])),
        ("Settings", _html_table([{"setting": k, "value": v} for k, v in config.items()]) +
         _html_table([{"part": k, "seconds": round(v, 1)} for k, v in results["timings"].items()]) +
         f"<p>Total run time: {results['total_seconds'] / 60:.1f} minutes.</p>"),
        ("1. How the forward process destroys each DCT band",
         "<p>SNR per octave band of the data, SNR_b(t) = alpha_bar_t P_b / (1 - alpha_bar_t); a band is destroyed "
         "once its SNR falls below 1. Measured correlation of x0 and x_t per band vs the theory sqrt(S / (1 + S)); "
         f"largest deviation {results['band_correlation_max_error']:.3f}.</p>" +
         _paragraph(band_findings(results["tables"]["destruction"], results["tables"]["band_leak"])) +
         "".join(_img(p) for p in results["figures"]["bands"].values()) +
         "<h3>Destruction timestep per band (all channels)</h3>" + _html_table(results["tables"]["destruction"]) +
         "<h3>SNR left at the first sampled step</h3>" + _html_table(results["tables"]["band_leak"])),
        ("2. Offset noise: asked for dark or bright",
         "<p>Class-conditional samples per brightness class, mean brightness vs the data's class mean "
         "(gap = samples - data; near-zero gaps for dark and bright mean the model reaches the extremes).</p>" +
         _html_table(results["tables"]["offset_noise"]) +
         _paragraph(offset_findings(results["tables"]["offset_noise"])) +
         "".join(_img(p, k) for k, p in results["grids"].items() if "rows" in k)),
        ("3. Signal leak: unconditional brightness",
         "<p>Per-image luminance of unconditional samples vs the data: std ratio below 1 means squeezed toward "
         "mid-grey; W1 and KS compare the distributions.</p>" + _html_table(results["tables"]["signal_leak"]) +
         _paragraph(leak_findings(results["tables"]["signal_leak"])) +
         "".join(_img(p, k) for k, p in results["figures"].items() if k.startswith("brightness")) +
         "".join(_img(p, k) for k, p in results["grids"].items() if "unconditional" in k)),
    ]
    if results.get("skipped"):
        sections.append(("4. Zero terminal SNR", f"<p>{html.escape(results['skipped'])}</p>"))
    return sections


COLUMNS_NOTE = ("<p>Columns: <b>kid</b>, KID mean over 100 random subsets of n // 2 images per side (Binkowski et "
                "al.), <b>kid_std</b> its standard deviation over the subsets; <b>fid</b> against the same reference; "
                "<b>kid_diff</b> KID minus the baseline's and <b>beyond_2sd</b> whether |kid_diff| exceeds 2 "
                "sqrt(kid_std<sup>2</sup> + kid_std<sub>baseline</sub><sup>2</sup>); <b>w1</b>, <b>ks</b>, "
                "<b>std_ratio</b>: per-image luminance of the samples against the reference images (W1 with its "
                "bootstrap standard deviation <b>w1_sd</b>; std ratio below 1 = squeezed toward mid-grey); "
                "<b>mean</b>: mean brightness in [-1, 1]; <b>hf_log10</b>: log10 samples / data power in the finest "
                "complete DCT octave (below 0: blurred); <b>seconds</b>: sampling, features and metrics.</p>")


def _quality_sections(results: dict) -> list:
    """The study's report: the findings first, then one section per evaluation, the plan and the settings."""
    tables, figures, config = results["tables"], results["figures"], results["config"]
    findings = quality_findings(tables)
    base = (f"the standard model, DDIM with {config['sample_steps']} steps from plain noise, unconditional (the null "
            "label)")
    return [
        ("Summary", f"<p>{len(results['models'])} tiny class-conditional UNets, identical but for the fix, trained on "
         f"{html.escape(config['data'])} at {config['resolution']} px; every setting draws {results['samples']} "
         f"samples from the same seeds, compared with {results['reference']['images']} training images.</p>"
         + _list([s for part in findings.values() for s in part]) + _figure(figures, "summary")),
        ("1. Samplers against the number of model calls",
         "<p>The standard model, unconditional samples from the same x_T per sampler; Heun takes 2N - 1 calls "
         "for N steps. Baseline of kid_diff: DDIM at the same NFE.</p>" + COLUMNS_NOTE
         + _figure(figures, "fid_nfe") + _html_table(tables["samplers"])
         + _paragraph(findings["samplers"])),
        ("2. Epsilon scaling: the lambda FID picks and the one the exposure metric picks",
         f"<p>{base}, with eps / lambda in every x0 estimate (Ning et al.); eps_norm_gap: RMS relative gap between "
         "the eps-norm along sampling (from noised training images) and on forward-noised training images.</p>"
         + _html_table(tables["eps"]) + _paragraph(findings["eps"]) + _figure(figures, "eps_quality")
         + _figure(figures, "eps_scan")),
        ("3. Signal leak and DC steering",
         f"<p>{base}, from plain x_T and from leak-aware x_T (dct+pixel statistics of the training images, "
         "Everaert et al.). Steering fixes the leak's DC to a tercile's mean brightness; its samples are meant to "
         "differ from the data, so they get brightness figures, not FID.</p>" + _html_table(tables["leak"])
         + _html_table(tables["steering"]) + _paragraph(findings["leak"])),
        ("4. The fixes against the standard recipe",
         f"<p>Each model unconditionally with DDIM, {config['sample_steps']} steps (the zero-SNR model with trailing "
         "spacing, the offset model from its own training noise, randn + s randn(C, 1, 1)); then asked for each "
         "brightness tercile.</p>" + _html_table(tables["fixes"]) + _html_table(tables["terciles"])
         + _paragraph(findings["fixes"])),
        ("Plan, budget and timings", _plan_section(results)),
        ("Sample grids", "".join(_img(path, label) for label, path in results["grids"].items())),
        ("Settings", _html_table([{"setting": k, "value": v} for k, v in config.items()])
         + _html_table(results["models"])
         + f"<p>Reference: {html.escape(results['reference']['source'])}, features cached in "
         f"{html.escape(results['reference']['path'])}. Seed {config['seed']}: training batches and sample i's noise "
         "(sample_seed(seed, i)), the same for every setting.</p>"),
    ]


def _plan_section(results: dict) -> str:
    speed, dropped = results["speed"], results["dropped"]
    autocast = (f"<p>Evaluation sampling runs with bf16 autocast {'on' if speed['autocast'] == 'bf16' else 'off'} "
                f"(--autocast {results['config']['autocast']}; measured {speed['fp32_calls_per_second']:.0f} model "
                f"calls/s in float32" + (f", {speed['bf16_calls_per_second']:.0f} under bf16"
                                         if "bf16_calls_per_second" in speed else "") + ").</p>")
    estimates = [{"part": k, "planned minutes": v / 60} for k, v in results["estimates"].items()]
    timings = [{"part": k, "minutes": v / 60} for k, v in results["timings"].items()]
    cut = _list(dropped) if dropped else "<p>Nothing was dropped: every planned evaluation fit the budget.</p>"
    return (_html_table([speed]) + autocast + "<h3>Plan</h3>" + _html_table(estimates) + "<h3>Dropped</h3>" + cut
            + "<h3>Measured time per part</h3>" + _html_table(timings)
            + f"<p>Total run time: {results['total_seconds'] / 60:.1f} of {results['config']['minutes']:g} minutes."
            "</p>")


def _figure(figures: dict, name: str) -> str:
    """The figure, or a line saying its evaluations did not run (see the plan's dropped list)."""
    return _img(figures[name]) if name in figures else f"<p>({name}: not drawn, its evaluations were skipped)</p>"


def _list(sentences: list) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in sentences) + "</ul>"


def format_quality_results(results: dict, markdown: bool = False) -> str:
    """The study's tables and findings as plain text, or as markdown (report.md)."""
    tables, findings = results["tables"], quality_findings(results["tables"])
    lead = ["kid", "kid_std", "fid", "kid_diff", "beyond_2sd", "w1", "std_ratio", "hf_log10"]
    parts = [("1. Samplers against NFE", [(tables["samplers"], ["sampler", "nfe", *lead])], "samplers"),
             ("2. Epsilon scaling", [(tables["eps"], ["eps_scale", *lead, "eps_norm_gap"])], "eps"),
             ("3. Signal leak and DC steering", [(tables["leak"], ["start", *lead]), (tables.get("steering", []), [
                 "steered_to", "t0", "sqrt_alpha_bar_t0", "n", "target_mean", "plain_mean", "samples_mean", "share"])],
              "leak"),
             ("4. Fixes", [(tables["fixes"], ["model", "start", *lead]), (tables.get("terciles", []), [
                 "model", "asked", "n", "data_mean", "samples_mean", "gap"])], "fixes")]
    lines = []
    for title, shown, key in parts:
        lines += [f"### {title}", ""] if markdown else [title]
        for rows, columns in shown:
            lines += [metrics.format_table(rows, columns, markdown=markdown) if rows else "(not evaluated)", ""]
        lines += [f"- {sentence}" if markdown else sentence for sentence in findings[key]] + [""]
    dropped = [f"- {line}" if markdown else line for line in results["dropped"]]
    return "\n".join(lines + dropped)


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:right}"
        "img{max-width:100%;margin:4px;image-rendering:pixelated}figure{display:inline-block;margin:4px}")


def _html_table(rows: list) -> str:
    if not rows:
        return "<p>(no rows)</p>"
    columns = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_format(row.get(c)))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: str, caption: str = "") -> str:
    caption_html = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f"<figure><img src='{html.escape(str(path))}'>{caption_html}</figure>"


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _grid_scale(config: StudyConfig) -> int:
    """Pixel repeat that makes small samples about 48 pixels wide in the report's grids."""
    return max(1, 48 // config.resolution)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def _schedule_name(trained: dict) -> str:
    d = trained["config"].diffusion
    return d.beta_schedule + (" + zero SNR" if d.rescale_betas_zero_snr else "")


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not isinstance(v, torch.nn.Module)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
