"""One evaluated setting of the study: its samples (saved with their features, reused by a resumed study), FID and
KID against the reference, and the bias metrics, as one row."""
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm_lite import metrics
from ldm_lite.data import to_float, to_uint8
from ldm_lite.leak import LeakStats
from ldm_lite.quality import FidStatistics, quality_report
from ldm_lite.sampling import initial_noise, sample_generators
from ldm_lite.schedulers import from_config, x0_clipping
from ldm_lite.study.config import QualityStudyConfig
from ldm_lite.study.plan import LEAK, OWN_NOISE, Setting
from ldm_lite.study.shards import Shards


SPECTRUM_IMAGES = 2048


def offset_training_noise(scheduler, shape, n: int, strength: float, seed: int) -> torch.Tensor:
    """x_T (n, C, H, W) drawn like the offset model's training noise, randn + s randn(C, 1, 1) per image, from
    sample i's own generator: its randn part is the plain x_T of sample i, so the settings stay paired."""
    generators = sample_generators(seed, 0, n)
    x_T = initial_noise(scheduler, (n, *shape), generator=generators)
    offsets = torch.stack([torch.randn(shape[0], 1, 1, generator=g) for g in generators])
    return x_T + strength * float(scheduler.init_noise_sigma) * offsets


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
        """The row of one setting: the setting, the sampler's x0 clipping ("clip_sample", "thresholding" or "off")
        and first timestep t0, FID, KID, the bias metrics, seconds (see `scored`)."""
        key = json.dumps({"setting": dataclasses.asdict(setting), "n": self.samples, "seed": self.config.seed,
                          "model_steps": trained["steps"], "autocast": str(self.autocast_dtype),
                          "reference": self.reference_name})
        scheduler = from_config(trained["config"], setting.sampler, **setting.scheduler_overrides())
        scheduler.set_timesteps(setting.steps)

        def samples() -> torch.Tensor:
            start = {"leak": self.leak} if setting.start == LEAK else {}
            if setting.start == OWN_NOISE:
                start["x_T"] = offset_training_noise(scheduler, self.data.shape[1:], self.samples,
                                                     self.config.offset_noise, self.config.seed)
            return to_uint8(self.draw(trained, scheduler, self.samples, setting.steps,
                                      class_labels=trained["model"].config.num_classes,
                                      eps_scale=setting.eps_lambdas(len(scheduler.timesteps)), **start))
        fields = {**dataclasses.asdict(setting), "x0_clipping": x0_clipping(scheduler),
                  "t0": float(scheduler.timesteps[0])}
        return self.scored(setting.key, key, samples, fields)

    def scored(self, name: str, key: str, images_of, fields: dict) -> dict:
        """The row of the uint8 images (N, C, H, W) `images_of()` returns: `fields`, FID, KID, the bias metrics,
        seconds. Images (as a PNG holds them) and features land in eval/<name>.safetensors under `key`; a resumed
        study reuses them (row["reused"]). `images[name]` keeps the images."""
        path = self.out / "eval" / f"{name}.safetensors"
        cached = _read_evaluation(path, key)
        if cached is not None:
            self.images[name] = cached[0]
            return cached[1]
        started = time.monotonic()
        images = images_of()
        sampling = time.monotonic() - started
        features = self.shards.features(images)
        row = {**fields, **self.measure(images, features), "sampling_seconds": sampling,
               "seconds": time.monotonic() - started}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"samples": images.contiguous(), "features": features.contiguous()}, str(path),
                  metadata={"key": key, "row": json.dumps(row)})
        self.images[name] = images
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
