"""The synthetic bias study, `python -m analysis demo` (make demo, minutes): each claim tested where its paper makes
it, on one dataset.
1. Frequency view: how the forward process destroys each DCT band of the data (theory and measurement),
   for the linear, scaled_linear and zero-terminal-SNR schedules.
2. Offset noise (Guttenberg / Crosslabs 2023): a class-conditional model asked for a dark or bright image
   still returns one near mid-grey when trained with the leaky scaled_linear schedule; offset noise lets it
   reach the extremes. Two `tiny` models, identical but for the noise, same seed and steps.
3. Signal leak (Everaert et al. 2024, arXiv:2309.15842): the standard model sampled unconditionally from
   plain noise and from signal-leak initial noise ("dct+pixel" statistics of the training images).
4. Optional: zero terminal SNR with v-prediction and trailing spacing (Lin et al. 2023, arXiv:2305.08891),
   the schedule-side fix, when the time budget allows a third model.
"""
import dataclasses
import time
from pathlib import Path

import torch

from ldm_lite import metrics, plots
from ldm_lite.data import brightness_terciles, load_cifar10, load_dataset, save_image_grid, to_float
from ldm_lite.leak import LeakStats
from ldm_lite.sampling import initial_noise, sample
from ldm_lite.schedules import named_alphas_cumprod
from ldm_lite.study.config import CLASS_NAMES, StudyConfig, grid_scale
from ldm_lite.study.plan import Clock, slug
from ldm_lite.study.report import write_report
from ldm_lite.study.results import DemoResults, save_results
from ldm_lite.study.training import (schedule_name, shared_compile, shared_precision, study_scheduler,
                                     train_models)


def run_demo(config: StudyConfig) -> DemoResults:
    """Run the demo; returns the results (also written as results.json and report.html in config.out)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(config.minutes)
    with clock("load data"):
        dataset = load_study_data(config)
    data = to_float(dataset.images)
    results = DemoResults(config=dataclasses.asdict(config))
    with clock("bands"):
        study_bands(data, out, results, config.seed)
    # the two compared models train side by side, one core each: small convolutions scale poorly across
    # threads, so two single-threaded runs finish sooner than two runs one after the other; measuring the
    # precision and the compile choice (where asked) comes out of their share
    device, names = "cuda" if torch.cuda.is_available() else "cpu", ["standard", "offset", "zero_snr"]
    pair_minutes = lambda: (clock.left() - 0.25 * clock.budget) / 60  # noqa: E731 (what is left for the pair)
    with clock("choose train.precision"):
        config = shared_precision(config, names, data.shape[1], device)
    with clock("choose train.compile"):
        config = shared_compile(config, names, data.shape[1], device, pair_minutes())
    with clock("train standard + offset"):
        models = train_models(config, ["standard", "offset"], pair_minutes())
    if config.zero_snr_model:
        minutes = (clock.left() - 0.15 * clock.budget) / 60
        if minutes < 0.25 * config.minutes:
            results.skipped = (f"zero-SNR model (part 4) skipped: {clock.left() / 60:.1f} of {config.minutes} "
                                  "minutes left; a larger --minutes budget includes it")
        else:
            with clock("train zero_snr"):
                models.update(train_models(config, ["zero_snr"], minutes))
    with clock("offset noise"):
        study_offset_noise(models, data, dataset.labels, config, out, results)
    with clock("signal leak"):
        leak_reports = study_signal_leak(models, data, config, out, results)
    study_summary(leak_reports, out, results)
    results.timings = clock.parts
    results.total_seconds = time.monotonic() - clock.start
    save_results(results, out / "results.json")
    write_report(results, out / "report.html")
    return results


def load_study_data(config: StudyConfig):
    """The dataset, labelled by brightness tercile (the embedded data already is)."""
    dataset = load_dataset(config.data, config.resolution, synthetic_size=config.synthetic_size,
                           seed=config.seed, max_images=config.max_images, progress=config.progress)
    return dataset if config.data == "synthetic" else brightness_terciles(dataset)


def load_test_split(config: StudyConfig, n: int) -> tuple:
    """(n uint8 images (n, C, H, W) spread over the data's test split, its name), or (None, None) when the data has
    none: the `test` folder beside an image folder (.../train -> .../test), CIFAR-10's test batch for
    'cifar10:ROOT'."""
    if config.data.startswith("cifar10:"):
        try:
            return load_cifar10(config.data.split(":", 1)[1], config.resolution, train=False).images, \
                f"{config.data} test split"
        except ValueError:  # the test batch is missing
            return None, None
    folder = Path(config.data)
    test = folder.parent / "test"
    if config.data == "synthetic" or not test.is_dir() or test.resolve() == folder.resolve():
        return None, None
    return load_dataset(str(test), config.resolution, seed=config.seed, max_images=n,
                        progress=config.progress).images, str(test)


# ----------------------------------------------------------------------------- 1. bands

def study_bands(data, out: Path, results: DemoResults, seed: int) -> None:
    schedules = named_alphas_cumprod(["linear", "scaled_linear", "scaled_linear_zero_snr"])
    analysis = metrics.band_analysis(data[:2048], schedules=schedules, measure_schedule="scaled_linear",
                                     generator=torch.Generator().manual_seed(seed))
    results.figures["bands"] = {k: str(p.relative_to(out)) for k, p in plots.plot_bands(analysis, out).items()}
    tables = metrics.band_tables(analysis)
    for name, rows in tables.items():
        plots.write_csv(rows, out / f"bands_{name}.csv")
    results.tables["destruction"] = [r for r in tables["destruction"] if r["channel"] == "all"]
    results.tables["band_leak"] = [r for r in tables["leak"] if r["channel"] == "all" and r["noise"] == "white"]
    worst = max(abs(r["measured"] - r["theory"]) for r in tables["correlation"])
    results.band_correlation_max_error = worst


# ----------------------------------------------------------------------------- 2. offset noise

def study_offset_noise(models: dict, data, labels, config: StudyConfig, out: Path, results: DemoResults) -> None:
    """Per class: mean brightness of conditional samples vs the data's class mean, for each model."""
    rows, n = [], config.samples_per_class
    class_labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(n)
    for name, trained in models.items():
        scheduler = study_scheduler(trained)
        images = sample(trained["model"], scheduler, len(class_labels), num_inference_steps=config.sample_steps,
                        class_labels=class_labels, seed=config.seed, progress=config.progress)
        save_class_grid(images, class_labels, out / f"grid_{name}_classes.png", config)
        results.grids[f"{name}: dark / mid / bright rows"] = f"grid_{name}_classes.png"
        rows += class_rows(name, trained, scheduler, images, class_labels, data, labels, config.seed)
    results.tables["offset_noise"] = rows


def save_class_grid(images, class_labels, path: Path, config: StudyConfig) -> None:
    """Up to 16 samples per class, one row per class."""
    shown = torch.cat([images[class_labels == c][:16] for c in range(len(CLASS_NAMES))])
    save_image_grid(shown.clamp(-1, 1), path, nrow=min(config.samples_per_class, 16), scale=grid_scale(config))


def class_rows(name: str, trained: dict, scheduler, images, class_labels, data, labels, seed: int) -> list:
    """Rows of the class-conditional table: per asked class, the samples' mean brightness (over C, H, W) against
    the data's class mean."""
    brightness, data_brightness = images.clamp(-1, 1).mean(dim=(1, 2, 3)), data.mean(dim=(1, 2, 3))
    rows = []
    for c, class_name in enumerate(CLASS_NAMES):
        target, got = float(data_brightness[labels == c].mean()), brightness[class_labels == c]
        rows.append(dict(model=name, schedule=schedule_name(trained), spacing=scheduler.config["timestep_spacing"],
                         steps=trained["steps"], seed=seed, asked=class_name, n=len(got), data_mean=target,
                         samples_mean=float(got.mean()), gap=float(got.mean()) - target))
    return rows


# ----------------------------------------------------------------------------- 3. signal leak

def study_signal_leak(models: dict, data, config: StudyConfig, out: Path, results: DemoResults) -> dict:
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
        save_image_grid(images[:64], out / f"grid_{name}_{slug(start)}.png", nrow=16, scale=grid_scale(config))
        results.grids[f"{key} (unconditional)"] = f"grid_{name}_{slug(start)}.png"
        report = metrics.brightness_report(images, data)
        reports[key] = report
        luminance = next(r for r in report["rows"] if r["quantity"] == "luminance")
        rows.append(dict(model=name, initial_noise=start, t0=int(scheduler.timesteps[0]),
                         sqrt_alpha_bar_t0=float(scheduler.alphas_cumprod[int(scheduler.timesteps[0])]) ** 0.5,
                         seed=config.seed, n=n, samples_std=luminance["samples_std"],
                         data_std=luminance["data_std"], std_ratio=luminance["std_ratio"],
                         wasserstein=luminance["wasserstein"], ks=luminance["ks"]))
    for key, report in reports.items():
        path = out / f"brightness_{slug(key)}.png"
        plots.plot_brightness(report, path)
        results.figures[f"brightness: {key}"] = path.name
    results.tables["signal_leak"] = rows
    return reports


def study_summary(leak_reports: dict, out: Path, results: DemoResults) -> None:
    """One figure for parts 2 and 3: class means per model, and the spread of unconditional brightness."""
    shown = [key for key in leak_reports if key.startswith(("standard", "zero_snr")) or "own offset" in key]
    luminance = {"data": leak_reports[shown[0]]["data"]["luminance"]}
    luminance.update({key: leak_reports[key]["samples"]["luminance"] for key in shown})
    plots.plot_study_summary(results.tables["offset_noise"], luminance, out / "summary.png")
    results.figures["summary"] = "summary.png"
