"""The bias study behind `make demo`: each claim tested where its paper makes it, on one dataset, in minutes.

1. Frequency view: how the forward process destroys each DCT band of the data (theory and measurement),
   for the linear, scaled_linear and zero-terminal-SNR schedules.
2. Offset noise (Guttenberg / Crosslabs 2023): a class-conditional model asked for a dark or bright image
   still returns one near mid-grey when trained with the leaky scaled_linear schedule; offset noise lets it
   reach the extremes. Two `tiny` models, identical but for the noise, same seed and steps.
3. Signal leak (Everaert et al. 2024, arXiv:2309.15842): the standard model sampled unconditionally from
   plain noise and from signal-leak initial noise ("dct+pixel" statistics of the training images).
4. Optional: zero terminal SNR with v-prediction and trailing spacing (Lin et al. 2023, arXiv:2305.08891),
   the schedule-side fix, when the time budget allows a third model.

Everything lands in `<out>/report.html` (plots, sample grids, the results table with settings, seeds and run
times); no number in the report is written by hand.
"""
import dataclasses
import html
import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldm_lite import metrics, plots
from ldm_lite.config import config_from_dict, config_to_dict, option
from ldm_lite.data import brightness_terciles, load_dataset, save_image_grid, to_float
from ldm_lite.leak import LeakStats
from ldm_lite.models import load_unet
from ldm_lite.runs import CHECKPOINT_NAME, load_checkpoint
from ldm_lite.sampling import initial_noise, sample
from ldm_lite.schedulers import from_config
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

    def __post_init__(self):
        for name in ("resolution", "steps", "batch_size", "samples_per_class", "unconditional_samples",
                     "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")


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
        self.parts[name] = time.monotonic() - start
        return result


def run_study(config: StudyConfig) -> dict:
    """Run the whole study; returns the results (also written as results.json and report.html in config.out)."""
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

def train_config(config: StudyConfig, name: str, minutes: float, threads: int = 0):
    """The training config of one of the study's models (tiny, class-conditional, null labels 10%)."""
    zero_snr = name == "zero_snr"
    return config_from_dict({
        "data": {"source": config.data, "resolution": config.resolution, "synthetic_size": config.synthetic_size,
                 "max_images": config.max_images, "labels": "dataset" if config.data == "synthetic" else "brightness"},
        "model": {"preset": "tiny", "class_conditional": True, "null_label_prob": 0.1},
        "diffusion": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                      "rescale_betas_zero_snr": zero_snr, "prediction_type": "v_prediction" if zero_snr else "epsilon"},
        "noise": {"offset_noise": True, "offset_noise_strength": config.offset_noise} if name == "offset" else {},
        "train": {"steps": config.steps, "batch_size": config.batch_size, "lr": config.lr, "warmup_steps": 100,
                  "ema_decay": 0.999, "seed": config.seed, "max_minutes": max(minutes, 0.1), "num_threads": threads},
        "run": {"out": str(Path(config.out) / f"model_{name}"), "log_every": 25, "checkpoint_every": 250,
                "sample_every": 0, "progress": config.progress and threads == 0, "resume": True,
                "fresh": config.fresh},
    })


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


def _train_in_processes(configs: dict, progress: bool) -> dict:
    """{name: Config} -> {name: run_dir}, one spawned process per run, one progress bar for all."""
    context = multiprocessing.get_context("spawn")
    total = sum(c.train.steps for c in configs.values())
    with ProcessPoolExecutor(max_workers=len(configs), mp_context=context) as pool, \
            tqdm(total=total, desc="training " + " + ".join(configs), unit="step", disable=not progress) as bar:
        futures = {name: pool.submit(_train_worker, config_to_dict(c)) for name, c in configs.items()}
        while not all(f.done() for f in futures.values()):
            time.sleep(1.0)
            bar.update(sum(_logged_step(Path(c.run.out)) for c in configs.values()) - bar.n)
        return {name: Path(future.result()) for name, future in futures.items()}


def _train_worker(config: dict) -> str:
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
    data_brightness = data.mean(dim=(1, 2, 3))
    for name, trained in models.items():
        scheduler = study_scheduler(trained)
        spacing = scheduler.config["timestep_spacing"]
        images = sample(trained["model"], scheduler, len(class_labels), num_inference_steps=config.sample_steps,
                        class_labels=class_labels, seed=config.seed, progress=config.progress)
        shown = torch.cat([images[class_labels == c][:16] for c in range(len(CLASS_NAMES))])  # one row per class
        save_image_grid(shown.clamp(-1, 1), out / f"grid_{name}_classes.png", nrow=min(n, 16),
                        scale=_grid_scale(config))
        results["grids"][f"{name}: dark / mid / bright rows"] = f"grid_{name}_classes.png"
        brightness = images.clamp(-1, 1).mean(dim=(1, 2, 3))
        for c, class_name in enumerate(CLASS_NAMES):
            target = float(data_brightness[labels == c].mean())
            got = brightness[class_labels == c]
            rows.append(dict(model=name, schedule=_schedule_name(trained), spacing=spacing, steps=trained["steps"],
                             seed=config.seed, asked=class_name, n=len(got), data_mean=target,
                             samples_mean=float(got.mean()), gap=float(got.mean()) - target))
    results["tables"]["offset_noise"] = rows


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


def _paragraph(sentences: list) -> str:
    return "<p>" + " ".join(html.escape(s) for s in sentences) + "</p>" if sentences else ""


# ----------------------------------------------------------------------------- report

def format_results(results: dict) -> str:
    """The study's result tables, and the findings computed from them, as plain text."""
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
    """A self-contained HTML page (images referenced next to it) with every section of the study."""
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
         _html_table(results["tables"]["offset_noise"]) + _paragraph(offset_findings(results["tables"]["offset_noise"])) +
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
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in sections)
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>ldm_lite bias study</title>"
                    f"<style>{_CSS}</style></head><body><h1>ldm_lite bias study</h1>{body}</body></html>")


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
