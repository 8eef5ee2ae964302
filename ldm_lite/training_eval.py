"""Quality while training: every run.eval_every steps (and when the run stops) the EMA model draws a fixed, seeded
set of samples and the run logs, in metrics.jsonl, one row with `"event": "eval"`:

    kid, kid_std   KID x 1 (mean, std over 100 subsets of min(1000, n // 2) images; Binkowski et al. 2018)
    fid, n         FID of the n samples (biased upward at small n: compare runs at the same n)
    w1, std_ratio  luminance W1 distance to the reference images and the samples' / data's brightness spread
    tercile_share  class-conditional models: the share of the way from mid-grey (0) to the data's class mean
                   that samples asked for the darkest and the brightest class reach (1 = they reach it), as
                   the study measures its part 4
    train_minutes  training time so far on the budget's clock (evaluations excluded), images_seen, step

All against the reference statistics of the run's own training data (`ldm_lite.fid_reference`: the same cached
features the study uses). Sampling runs under one autocast setting whatever the training precision, so runs of
different precision compare; "auto" measures float32 against bf16 on the model once and keeps bf16 when it is at
least 1.1x faster (recorded in each row).
"""
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ldm_lite import bf16_choice, fid_reference, metrics
from ldm_lite.config import Config
from ldm_lite.data import InMemoryImages, to_float, to_uint8
from ldm_lite.models.inception import load_fid_inception
from ldm_lite.runs import METRICS_FILE, read_metrics
from ldm_lite.quality import FidStatistics, inception_features, quality_report
from ldm_lite.sampling import sample
from ldm_lite.schedulers import from_config, x0_clipping

EVAL_SEED = 12345          # the samples' seed: fixed, so successive evaluations see the same x_T


@dataclass
class EvalRow:
    """One evaluation of a training run (the fields of its metrics.jsonl row)."""
    step: int
    images_seen: int
    train_minutes: float
    clock: str
    kid: float
    kid_std: float
    fid: float
    n: int
    w1: float
    std_ratio: float
    tercile_share: float | None
    sampler: str
    steps: int
    x0_clipped: bool
    autocast: str
    eval_seconds: float
    event: str = "eval"


class TrainingEvaluator:
    """What every evaluation of a run shares: the reference statistics and images, the Inception network, the
    sampler settings and the autocast choice."""

    def __init__(self, config: Config, dataset: InMemoryImages, device: torch.device, progress: bool = False):
        if dataset.images.dtype != torch.uint8:
            raise ValueError("run.eval_every: evaluation while training needs a pixel-space run (latent runs "
                             "train on VAE latents); set run.eval_every=0")
        self.config, self.device, self.progress = config, device, progress
        self.images = fid_reference.reference_images(dataset.images, config.run.eval_reference_images)
        self.data = to_float(self.images)                                 # (N, C, H, W) in [-1, 1]
        self.class_means = _class_means(dataset) if config.model.class_conditional else None
        # built now, so a bad run.eval_sampler fails at start, not at step N; its x0 clipping is fixed for the run
        self.x0_clipped = x0_clipping(self.scheduler()) != "off"
        self.network = load_fid_inception(device)           # so does a missing FID wheel
        self.reference = None                               # computed at the first evaluation (cached)
        self.autocast_dtype, self.autocast_chosen = None, False

    def prepare(self) -> None:
        """Load the reference statistics (computed and cached when missing)."""
        if self.reference is not None:
            return
        path = fid_reference.reference_path(self.images, self.config.run.eval_cache)
        self.reference = fid_reference.reference_statistics(
            path, self.images, self.features,
            source=f"{self.config.data.source}: {len(self.images)} training images at "
                   f"{self.config.data.resolution} px")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Inception pool3 features (N, 2048) of uint8 images (N, C, H, W)."""
        return inception_features(images, device=self.device, network=self.network, progress=self.progress)

    def choose_autocast(self, model) -> None:
        """Fix the sampling precision once per run, as run.eval_autocast says (see the module docstring)."""
        choice = self.config.run.eval_autocast
        if choice == "auto":
            gain = bf16_choice.sampling_gain(model, self.data.shape[1:], self.device, self.config.run.eval_batch_size)
            choice = "bf16" if bf16_choice.choose(gain) == "bf16" else "off"
        self.autocast_dtype, self.autocast_chosen = (torch.bfloat16 if choice == "bf16" else None), True

    def scheduler(self):
        """The evaluation sampler on the run's schedule, with the run's x0 clipping where the class has it."""
        return from_config(self.config, self.config.run.eval_sampler)

    def draw(self, model, n: int, class_labels) -> torch.Tensor:
        """n samples (n, C, H, W) in [-1, 1] from the run's sampler at fixed seeds."""
        run, scheduler = self.config.run, self.scheduler()
        return sample(model, scheduler, n, shape=tuple(self.data.shape[1:]), num_inference_steps=run.eval_steps,
                      class_labels=class_labels, seed=EVAL_SEED, batch_size=run.eval_batch_size, progress=False,
                      device=self.device, autocast_dtype=self.autocast_dtype).cpu()

    @torch.no_grad()
    def evaluate(self, model, step: int, train_seconds: float) -> EvalRow:
        """The row of the model (the EMA copy) after `step` steps and `train_seconds` of training."""
        started, was_training = time.perf_counter(), model.training
        model.eval()
        self.prepare()
        if not self.autocast_chosen:
            self.choose_autocast(model)
        run, conditional = self.config.run, model.config.num_classes is not None
        null = model.config.num_classes if conditional else None                # unconditional: the null label
        images = to_uint8(self.draw(model, run.eval_samples, null))
        quality = quality_report(FidStatistics.from_features(self.features(images)), self.reference, kid=True)
        brightness = metrics.brightness_report(to_float(images), self.data)
        luminance = next(r for r in brightness["rows"] if r["quantity"] == "luminance")
        share = self.tercile_share(model) if conditional and self.class_means is not None else None
        model.train(was_training)
        return EvalRow(step=step, images_seen=step * self.config.train.batch_size,
                       train_minutes=train_seconds / 60, clock=self.config.train.budget_clock,
                       kid=quality["kid_mean"], kid_std=quality["kid_std"], fid=quality["fid"],
                       n=quality["n_samples"], w1=luminance["wasserstein"], std_ratio=luminance["std_ratio"],
                       tercile_share=share, sampler=run.eval_sampler, steps=run.eval_steps,
                       x0_clipped=self.x0_clipped,
                       autocast="bf16" if self.autocast_dtype is not None else "off",
                       eval_seconds=time.perf_counter() - started)

    def tercile_share(self, model) -> float:
        """Mean over the darkest and the brightest class of (samples' mean brightness) / (data's class mean)."""
        k, extremes = self.config.run.eval_class_samples, (0, len(self.class_means) - 1)
        labels = torch.tensor(extremes).repeat_interleave(k)
        brightness = self.draw(model, len(labels), labels).clamp(-1, 1).mean(dim=(1, 2, 3))
        shares = [float(brightness[labels == c].mean()) / self.class_means[c] for c in extremes
                  if abs(self.class_means[c]) > 1e-6]
        return sum(shares) / len(shares) if shares else math.nan


def eval_record(row: EvalRow) -> dict:
    """The metrics.jsonl line of an evaluation (NaN, e.g. a KID of too few samples, written as null)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(row).items()}


def read_eval_rows(run_dir) -> list[dict]:
    """The evaluation rows of a run's metrics.jsonl, in step order (a ValueError naming the file if it has none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} is not a training run folder (no {METRICS_FILE})")
    rows = [r for r in read_metrics(path) if r.get("event") == "eval"]
    if not rows:
        raise ValueError(f"{path} holds no evaluations; train with --run.eval_every=N to log them")
    return [{k: (math.nan if v is None else v) for k, v in r.items()} for r in sorted(rows, key=lambda r: r["step"])]


def _class_means(dataset: InMemoryImages) -> list[float]:
    """Mean brightness (over C, H, W, in [-1, 1]) of the training images of each label."""
    brightness = to_float(dataset.images).mean(dim=(1, 2, 3))
    return [float(brightness[dataset.labels == c].mean()) if (dataset.labels == c).any() else 0.0
            for c in range(dataset.num_classes)]
