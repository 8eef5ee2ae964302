"""Helpers for the executable lessons in docs/lessons/ (plain Python in the jupytext "percent" cell format).

- `Lesson`: one lesson's run. Parses `--quick`, owns the output folder runs/lessons/NN/, records figures,
  findings (sentences chosen by the numbers) and `check`s (claims tested on what the lesson just ran), and on
  `finish()` writes results.json and exits non-zero when a check failed.
- `lesson_images`: real pictures (CIFAR-10 or COCO from ../shared/data beside the repository) or, without
  them, the embedded synthetic images.
- `lesson_config`, `cached_runs`, `load_cached`: the lessons' tiny models, trained once into a cache
  (runs/lessons/cache, or $LDM_LITE_LESSON_CACHE) keyed by a hash of the resolved training config.
- `loss_per_bucket`: the denoising loss by timestep bucket, in the eps, x0 and v parametrisations at once.
- `percent_cells`, `markdown_to_html`, `write_index`: the lessons' text and results as runs/lessons/index.html.
- `main`: `python -m ldm_lite.teaching [--quick] [NN ...]` runs the lessons one after the other (what
  `make lessons` calls) and writes the index.

Environment: LDM_LITE_LESSON_OUT (output root, default runs/lessons under the repository), LDM_LITE_LESSON_CACHE
(model cache, default <output root>/cache), LDM_LITE_LESSON_QUICK=1 (quick mode without the flag, e.g. in a
notebook). Tests point both folders at a temporary directory, so every run starts from an empty cache.
"""
import argparse
import codecs
import dataclasses
import functools
import hashlib
import html
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm_lite import html_page

try:  # the lessons extra (pip install -e .[lessons]): markdown and math rendered as MathML
    from latex2mathml.converter import convert as latex_to_mathml
    from markdown_it import MarkdownIt
    from mdit_py_plugins.dollarmath import dollarmath_plugin
except ImportError:
    MarkdownIt = None
from ldm_lite.processes import process_seconds, train_in_processes
from ldm_lite.training import train

OUT_ENV = "LDM_LITE_LESSON_OUT"
CACHE_ENV = "LDM_LITE_LESSON_CACHE"
QUICK_ENV = "LDM_LITE_LESSON_QUICK"
RESULTS_FILE = "results.json"
CACHE_RECORD = "cache.json"
RUN_RECORD = "run.json"  # written by the runner: exit code, seconds, the reason of a failure
LESSON_PATTERN = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.py$")


# ----------------------------------------------------------------------------- places

def repo_root() -> Path:
    """The repository holding this package (the folder above ldm_lite/)."""
    return Path(__file__).resolve().parents[1]


def output_root() -> Path:
    """Where lessons write: $LDM_LITE_LESSON_OUT, else <repository>/runs/lessons."""
    return Path(os.environ.get(OUT_ENV) or repo_root() / "runs" / "lessons")


def cache_root() -> Path:
    """The trained-model cache: $LDM_LITE_LESSON_CACHE, else <output root>/cache."""
    return Path(os.environ.get(CACHE_ENV) or output_root() / "cache")


def lessons_folder() -> Path:
    """docs/lessons/ of the repository."""
    return repo_root() / "docs" / "lessons"


def lesson_files(folder=None) -> list[Path]:
    """The lesson scripts NN_name.py in `folder` (default docs/lessons/), sorted by number."""
    folder = Path(folder) if folder is not None else lessons_folder()
    return sorted(p for p in folder.glob("*.py") if LESSON_PATTERN.match(p.name))


def shared_data_dir() -> Path:
    """../shared/data beside the repository (found from the repository root, never an absolute path)."""
    return repo_root().parent / "shared" / "data"


# ----------------------------------------------------------------------------- one lesson's run

@dataclass
class Check:
    """A claim of the lesson, whether what it ran bears it out, and the numbers that decided."""
    claim: str
    passed: bool
    measured: str = ""


@dataclass
class Lesson:
    """The run of lesson `number`: mode, output folder, figures, findings and checks.

    `Lesson(1, "The forward process")` reads `--quick` from sys.argv (unknown arguments, such as a notebook
    kernel's, are ignored) or LDM_LITE_LESSON_QUICK=1, and empties runs/lessons/01/ of earlier figures.
    """
    number: int
    title: str
    argv: list | None = None
    quick: bool = field(init=False)
    out: Path = field(init=False)
    figures: list = field(default_factory=list, init=False)
    findings: list = field(default_factory=list, init=False)
    checks: list = field(default_factory=list, init=False)

    def __post_init__(self):
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--quick", action="store_true")
        known, _ = parser.parse_known_args(sys.argv[1:] if self.argv is None else self.argv)
        self.quick = known.quick or os.environ.get(QUICK_ENV, "") not in ("", "0")
        self.out = output_root() / f"{self.number:02d}"
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in list(self.out.glob("*.png")) + [self.out / RESULTS_FILE]:
            stale.unlink(missing_ok=True)
        self._started = time.monotonic()
        print(f"Lesson {self.number}: {self.title} ({'quick' if self.quick else 'full'} mode) -> {self.out}")

    def path(self, name: str) -> Path:
        """A file in this lesson's output folder."""
        return self.out / name

    def figure(self, fig, name: str, caption: str = "") -> Path:
        """Save a matplotlib figure as NN/name (PNG), close it and list it on the lesson's page."""
        import matplotlib.pyplot as plt
        path = self.path(name)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return self.add_figure(path, caption)

    def image_grid(self, images: torch.Tensor, name: str, caption: str = "", nrow: int = 8, scale: int = 4) -> Path:
        """Save images (N, 3, H, W) in [-1, 1] as one PNG grid (`ldm_lite.data.save_image_grid`) and list it."""
        from .data import save_image_grid
        path = self.path(name)
        save_image_grid(images.detach().float().cpu(), path, nrow=nrow, scale=scale)
        return self.add_figure(path, caption)

    def add_figure(self, path, caption: str = "") -> Path:
        """List an image file already in the output folder on the lesson's page."""
        path = Path(path)
        self.figures.append({"file": path.name, "caption": caption})
        print(f"  figure: {path}")
        return path

    def finding(self, sentence: str) -> str:
        """Print and record a sentence of the lesson's findings (build it from the numbers it ran)."""
        self.findings.append(sentence)
        print(f"  finding: {sentence}")
        return sentence

    def check(self, claim: str, passed, measured: str = "") -> bool:
        """Record whether `claim` holds on what the lesson ran; `measured` states the deciding numbers."""
        result = Check(claim, bool(passed), measured)
        self.checks.append(result)
        print(f"  [{'PASS' if result.passed else 'FAIL'}] {claim}" + (f" ({measured})" if measured else ""))
        return result.passed

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def finish(self) -> dict:
        """Write NN/results.json and print the summary; SystemExit(1) when a check failed or none was made."""
        seconds = time.monotonic() - self._started
        results = {"number": self.number, "title": self.title, "mode": "quick" if self.quick else "full",
                   "seconds": round(seconds, 2), "passed": self.passed, "figures": self.figures,
                   "findings": self.findings, "checks": [dataclasses.asdict(c) for c in self.checks]}
        self.path(RESULTS_FILE).write_text(json.dumps(results, indent=2))
        failed = [c for c in self.checks if not c.passed]
        print(f"Lesson {self.number}: {len(self.checks) - len(failed)}/{len(self.checks)} checks passed "
              f"in {seconds:.1f} s")
        if failed or not self.checks:
            raise SystemExit(1)
        return results


# ----------------------------------------------------------------------------- data

def lesson_images(n: int, resolution: int, data_root=None, seed: int = 0) -> tuple[torch.Tensor, str]:
    """n pictures (n, 3, R, R) float in [-1, 1] and a description of where they came from.

    Looks in `data_root` (default `shared_data_dir()`) for cifar10-jpeg/test, then coco128, taking n images
    spread evenly over the sorted file list; without either, the embedded `synthetic_brightness` images.
    """
    from .data import list_images, read_images, synthetic_brightness, to_float
    root = Path(data_root) if data_root is not None else shared_data_dir()
    for sub, name in (("cifar10-jpeg/test", "CIFAR-10 test pictures"), ("coco128", "COCO pictures")):
        folder = root / sub
        if folder.is_dir():
            paths = list_images(folder)
            if paths:
                keep = torch.linspace(0, len(paths) - 1, min(n, len(paths))).round().long().tolist()
                images, _ = read_images([paths[i] for i in keep], resolution)
                return to_float(images), f"{len(images)} {name} from {sub} at {resolution}x{resolution}"
    images = synthetic_brightness(n, resolution, seed).images
    return to_float(images), f"{n} embedded synthetic images at {resolution}x{resolution} (no ../shared/data)"


# ----------------------------------------------------------------------------- trained-model cache

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
    from .config import config_from_dict
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
    the [run] section (folder, logging, grids) and train.num_threads / train.keep_freed_memory."""
    from .config import config_to_dict
    tree = config_to_dict(config)
    tree.pop("run")
    for key in ("num_threads", "keep_freed_memory"):
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
    from .runs import load_model
    return load_model(run.run_dir)


def training_log(run: CachedRun) -> list[dict]:
    """The run's metrics.jsonl lines (step, loss, ...)."""
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# ----------------------------------------------------------------------------- loss per timestep bucket

@torch.no_grad()
def loss_per_bucket(model, scheduler, x0: torch.Tensor, num_buckets: int = 10, repeats: int = 1,
                    generator: torch.Generator | None = None, batch_size: int = 256) -> dict:
    """Mean squared error of a denoiser per timestep bucket, in all three parametrisations at once.

    The T training timesteps are cut into `num_buckets` equal buckets; every image of x0 (N, C, H, W) is noised
    `repeats` times at a timestep drawn uniformly in each bucket (Ho et al. 2020, arXiv:2006.11239, Algorithm 1)
    and the model output is converted by `predict_x0_and_eps` for the scheduler's prediction type. Per image,
    mean over elements of (x0_hat - x0)^2, (eps_hat - eps)^2 and (v_hat - v)^2 with v = sqrt(ab) eps -
    sqrt(1 - ab) x0 (Salimans & Ho 2022, arXiv:2202.00512). For a consistent model these are one error seen
    three ways: eps error = -(sqrt(ab) / sqrt(1 - ab)) x0 error and v error = -x0 error / sqrt(1 - ab).

    Returns float64 tensors: "edges" (K + 1,) int64, "centres" (K,), "x0_mse", "eps_mse", "v_mse", "loss" (the
    model's own training target) and "loss_stderr" (K,) (standard error over images).
    """
    from .schedulers.base import predict_x0_and_eps
    T = scheduler.num_train_timesteps
    if not 1 <= num_buckets <= T:
        raise ValueError(f"num_buckets must be in [1, {T}], got {num_buckets}")
    edges = torch.linspace(0, T, num_buckets + 1).round().long()
    target = {"epsilon": "eps_mse", "v_prediction": "v_mse", "sample": "x0_mse"}[scheduler.prediction_type]
    data = x0.repeat(repeats, 1, 1, 1).double()
    rows = {name: [] for name in ("x0_mse", "eps_mse", "v_mse")}
    stderr = []
    for low, high in zip(edges[:-1].tolist(), edges[1:].tolist()):
        t = torch.randint(low, high, (len(data),), generator=generator)
        noise = torch.randn(data.shape, generator=generator, dtype=torch.float64)
        ab = scheduler.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        x_t = scheduler.add_noise(data, noise, t)
        errors = {name: [] for name in rows}
        for start in range(0, len(data), batch_size):
            part = slice(start, start + batch_size)
            output = model(x_t[part].float(), t[part], None).double()
            x0_hat, eps_hat = predict_x0_and_eps(output, x_t[part], a[part], b[part], scheduler.prediction_type)
            v, v_hat = a[part] * noise[part] - b[part] * data[part], a[part] * eps_hat - b[part] * x0_hat
            for name, error in (("x0_mse", x0_hat - data[part]), ("eps_mse", eps_hat - noise[part]),
                                ("v_mse", v_hat - v)):
                errors[name].append(error.pow(2).flatten(1).mean(1))
        for name in rows:
            per_image = torch.cat(errors[name])
            rows[name].append(per_image.mean())
            if name == target:
                stderr.append(per_image.std() / math.sqrt(len(per_image)))
    result = {name: torch.stack(values) for name, values in rows.items()}
    return {"edges": edges, "centres": (edges[:-1] + edges[1:] - 1).double() / 2, **result,
            "loss": result[target].clone(), "loss_stderr": torch.stack(stderr)}


# ----------------------------------------------------------------------------- lesson text and index page

def percent_cells(path) -> list[tuple[str, str]]:
    """The cells of a "percent"-format script: [(kind, text)] with kind "markdown" or "code".

    A line starting with `# %%` opens a cell (`# %% [markdown]` a text cell). Text cells lose their leading
    `# ` (or `#`); the text before the first marker is a code cell (the module docstring, imports).
    """
    cells, kind, lines = [], "code", []
    for line in Path(path).read_text().splitlines():
        if line.startswith("# %%"):
            cells.append((kind, "\n".join(lines).strip("\n")))
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind == "markdown":
            lines.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
        else:
            lines.append(line)
    cells.append((kind, "\n".join(lines).strip("\n")))
    return [(k, text) for k, text in cells if text.strip()]


_INLINE_MATH = re.compile(r"(\$[^$\n]+\$)")


def _inline(text: str) -> str:
    """Escape HTML and render `code`, **bold**, *italic* and [links](url); $...$ math is kept verbatim (escaped),
    also inside bold or italic text."""
    maths = _INLINE_MATH.findall(text)
    parts = _INLINE_MATH.split(text)
    placeholder = "\x00{}\x00"
    text = "".join(placeholder.format(i // 2) if i % 2 else part for i, part in enumerate(parts))
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"<em>\1</em>", text)
    text = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', text)
    return re.sub("\x00(\\d+)\x00", lambda m: html.escape(maths[int(m.group(1))]), text)


LESSONS_EXTRA_NOTICE = ("Equations are shown as LaTeX source: install the lessons extra "
                        "(<code>pip install -e .[lessons]</code>, which <code>make lessons</code> does) to see them "
                        "rendered.")


def math_to_mathml(latex: str, display: bool) -> str:
    """MathML of a LaTeX formula (latex2mathml), rendered natively by current browsers, no script."""
    return latex_to_mathml(latex, display="block" if display else "inline")


def _math_html(latex: str, options: dict) -> str:
    try:
        return math_to_mathml(latex, options["display_mode"])
    except Exception:  # latex2mathml's errors share no base class; show the source (a test keeps this unused)
        return f'<code class="fail">{html.escape(latex)}</code>'


@functools.cache
def markdown_parser():
    """CommonMark (raw HTML off) with $inline$ and $$display$$ math rendered as MathML; None without the extra."""
    if MarkdownIt is None:
        return None
    return MarkdownIt("commonmark", {"html": False}).use(dollarmath_plugin, double_inline=True, renderer=_math_html)


def markdown_to_html(text: str) -> str:
    """Markdown with math to HTML: markdown-it-py and MathML with the lessons extra, else
    `markdown_subset_to_html` (math kept as LaTeX source)."""
    parser = markdown_parser()
    return parser.render(text) if parser is not None else markdown_subset_to_html(text)


def markdown_subset_to_html(text: str) -> str:
    """A small Markdown subset to HTML: # headings, paragraphs, - and 1. lists, $$ display math $$, inline
    `code`, **bold**, *italic*, [links](url) and $math$ (kept verbatim, escaped)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            i += 1
        elif line.strip().startswith("$$"):
            math_lines = [line.strip()]
            while not (math_lines[-1].endswith("$$") and (len(math_lines) > 1 or len(line.strip()) > 2)):
                i += 1
                if i >= len(lines):
                    break
                math_lines.append(lines[i].strip())
            blocks.append(f'<div class="math">{html.escape(" ".join(math_lines))}</div>')
            i += 1
        elif re.match(r"#{1,6} ", line):
            level = len(line) - len(line.lstrip("#"))
            blocks.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
            i += 1
        elif re.match(r"\s*([-*]|\d+\.) ", line):
            ordered = bool(re.match(r"\s*\d+\. ", line))
            items = []
            while i < len(lines) and lines[i].strip():
                if re.match(r"\s*([-*]|\d+\.) ", lines[i]):
                    items.append(re.sub(r"^\s*([-*]|\d+\.) ", "", lines[i]))
                else:
                    items[-1] += " " + lines[i].strip()
                i += 1
            tag = "ol" if ordered else "ul"
            blocks.append(f"<{tag}>" + "".join(f"<li>{_inline(item)}</li>" for item in items) + f"</{tag}>")
        else:
            paragraph = []
            while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith("$$") \
                    and not re.match(r"#{1,6} |\s*([-*]|\d+\.) ", lines[i]):
                paragraph.append(lines[i].strip())
                i += 1
            blocks.append(f"<p>{_inline(' '.join(paragraph))}</p>")
    return "\n".join(blocks)


_CSS = """div.math{overflow-x:auto;margin:.8em 0;text-align:center}
.findings{background:#f6f8fa;border-left:4px solid #8ab;padding:.5em 1em}"""


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _status(out_root: Path, number: int) -> str:
    """The lesson's result in one line: checks passed, or failed with the reason the runner recorded."""
    results = _read_json(out_root / f"{number:02d}" / RESULTS_FILE)
    run = _read_json(out_root / f"{number:02d}" / RUN_RECORD)
    if run is not None and run["returncode"] != 0:
        return (f'<span class="fail">failed</span>: {html.escape(run["reason"])} '
                f'(exit {run["returncode"]}, {run["seconds"]:.0f} s)')
    if results is None:
        return '<span class="fail">not run</span>'
    passed = sum(c["passed"] for c in results["checks"])
    css = "pass" if results["passed"] else "fail"
    return (f'<span class="{css}">{passed}/{len(results["checks"])} checks passed</span> '
            f'({results["mode"]} mode, {results["seconds"]:.0f} s)')


def lesson_section(path: Path, out_root: Path) -> str:
    """HTML of one lesson: its text cells, then its findings, figures and checks from NN/results.json."""
    number = int(path.name[:2])
    results = _read_json(out_root / f"{number:02d}" / RESULTS_FILE)
    parts = [f'<section id="lesson-{number:02d}">', f"<p>{_status(out_root, number)} &middot; source "
             f"<code>docs/lessons/{html.escape(path.name)}</code></p>"]
    parts += [markdown_to_html(text) for kind, text in percent_cells(path) if kind == "markdown"]
    if results is not None:
        if results["findings"]:
            parts.append('<h3>Findings of this run</h3><div class="findings">'
                         + "".join(f"<p>{html.escape(s)}</p>" for s in results["findings"]) + "</div>")
        if results["figures"]:
            parts.append("<h3>Figures</h3>")
        parts += [html_page.figure(f"{number:02d}/{f['file']}", f["caption"]) for f in results["figures"]]
        rows = [{"result": html_page.Html(f'<span class="{"pass" if c["passed"] else "fail"}">'
                                          f'{"PASS" if c["passed"] else "FAIL"}</span>'),
                 "claim": c["claim"], "measured": c["measured"]} for c in results["checks"]]
        parts.append("<h3>Checks</h3>" + html_page.table(rows, headers={"result": ""}))
    parts.append("</section>")
    return "\n".join(parts)


def write_index(folder=None, out_root=None) -> Path:
    """Write <out_root>/NN.html for every lesson (text, findings, figures, checks) and <out_root>/index.html: the
    summary table followed by every lesson's section. Returns the index path."""
    files = lesson_files(folder)
    out_root = Path(out_root) if out_root is not None else output_root()
    out_root.mkdir(parents=True, exist_ok=True)
    rows, sections = [], []
    notice = f'<p class="notice">{LESSONS_EXTRA_NOTICE}</p>' if markdown_parser() is None else ""
    for path in files:
        number = int(path.name[:2])
        section = lesson_section(path, out_root)
        title = _lesson_title(path)
        html_page.write_page(out_root / f"{number:02d}.html", title,
                             f'{notice}<p><a href="index.html">All lessons</a></p>\n{section}', heading=False,
                             css=_CSS)
        rows.append({"lesson": html_page.Html(f'<a href="#lesson-{number:02d}">{html.escape(title)}</a> '
                                              f'(<a href="{number:02d}.html">page</a>)'),
                     "result": html_page.Html(_status(out_root, number))})
        sections.append(section)
    body = (notice + "<h1>ldm_lite lessons</h1><p>Executable lessons from <code>docs/lessons/</code>; every number below "
            "was computed by the run that wrote this page (<code>make lessons</code>).</p>"
            + html_page.table(rows) + "\n" + "\n".join(sections))
    index = out_root / "index.html"
    html_page.write_page(index, "ldm_lite lessons", body, heading=False, css=_CSS)
    return index


def _lesson_title(path: Path) -> str:
    """The first markdown heading of a lesson, else its file name."""
    for kind, text in percent_cells(path):
        if kind == "markdown":
            for line in text.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return path.stem


# ----------------------------------------------------------------------------- runner

def run_lessons(files, quick: bool = False, python: str | None = None, out_root=None) -> list[dict]:
    """Run lesson scripts one after the other as subprocesses; [{"lesson", "returncode", "seconds", "reason"}].

    Each row is also written to <out_root>/NN/run.json for the index page; `reason` (when the lesson failed) is
    its first failed check, else the last line it wrote on stderr (shown live as it runs).
    """
    out_root = Path(out_root) if out_root is not None else output_root()
    rows = []
    for path in files:
        folder = out_root / Path(path).name[:2]
        folder.mkdir(parents=True, exist_ok=True)
        for stale in (RESULTS_FILE, RUN_RECORD):
            (folder / stale).unlink(missing_ok=True)
        command = [python or sys.executable, str(path)] + (["--quick"] if quick else [])
        started = time.monotonic()
        returncode, last_line = _run_showing_stderr(command)
        row = {"lesson": Path(path).name, "returncode": returncode, "seconds": round(time.monotonic() - started, 1),
               "reason": "" if returncode == 0 else _failure_reason(folder, last_line, returncode)}
        (folder / RUN_RECORD).write_text(json.dumps(row, indent=2))
        rows.append(row)
    return rows


def _run_showing_stderr(command: list) -> tuple[int, str]:
    """Run `command` in the repository root, passing its stderr through; (exit code, last non-empty stderr line)."""
    process = subprocess.Popen(command, cwd=repo_root(), stderr=subprocess.PIPE)
    decoder, tail = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    for chunk in iter(lambda: process.stderr.read1(65536), b""):
        text = decoder.decode(chunk)
        sys.stderr.write(text)
        sys.stderr.flush()
        tail = (tail + text)[-8192:]
    lines = [line.strip() for line in re.split(r"[\r\n]", tail) if line.strip()]
    return process.wait(), lines[-1] if lines else ""


def _failure_reason(folder: Path, last_line: str, returncode: int) -> str:
    """One line on why a lesson failed: its failed checks, else its last stderr line, else its exit code."""
    results = _read_json(folder / RESULTS_FILE)
    if results is not None:
        failed = [c["claim"] for c in results["checks"] if not c["passed"]]
        if failed:
            return f"{len(failed)} of {len(results['checks'])} checks failed, first: {failed[0]}"
        if not results["checks"]:
            return "the lesson made no checks"
    return last_line or f"exit code {returncode}"


def main(argv=None) -> int:
    """`python -m ldm_lite.teaching [--quick] [--lessons DIR] [NN ...]`: run the lessons, write the index page."""
    parser = argparse.ArgumentParser(prog="python -m ldm_lite.teaching", description=main.__doc__)
    parser.add_argument("numbers", nargs="*", help="lesson numbers to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="bounded runs (20 s each), the exact denoiser")
    parser.add_argument("--lessons", default=None, help="folder of NN_name.py lessons (default docs/lessons)")
    args = parser.parse_args(argv)
    files = lesson_files(args.lessons)
    if args.numbers:
        wanted = {int(n) for n in args.numbers}
        files = [p for p in files if int(p.name[:2]) in wanted]
    if not files:
        print("no lessons to run", file=sys.stderr)
        return 2
    results = run_lessons(files, args.quick, out_root=output_root())
    index = write_index(args.lessons, output_root())
    for row in results:
        status = "ok" if row["returncode"] == 0 else f"FAILED (exit {row['returncode']}): {row['reason']}"
        print(f"{row['lesson']:<32} {row['seconds']:>7.1f} s  {status}")
    print(f"total {sum(r['seconds'] for r in results):.1f} s; index: {index}")
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
