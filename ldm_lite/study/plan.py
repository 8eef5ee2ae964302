"""The study's budget (pure logic but for the speed measurement): the clock, the evaluated settings of the four
parts, the machine's measured rates, and the plan that fits the evaluations into `--minutes`, dropping the most
expensive first."""
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from ldm_lite import bf16_choice
from ldm_lite.config import DiffusionConfig
from ldm_lite.models import UNet, unet_preset
from ldm_lite.quality import inception_features
from ldm_lite.sampling import eps_scale_schedule
from ldm_lite.schedulers import from_config
from ldm_lite.schedules import QUADRATIC_SPACING, default_steps_offset, max_quadratic_steps
from ldm_lite.study.config import CLASS_NAMES, QualityStudyConfig


class Clock:
    """Wall time of the study's parts, and what is left of the budget."""

    def __init__(self, minutes: float):
        self.start = time.monotonic()
        self.budget = 60 * minutes
        self.parts = {}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    @contextmanager
    def __call__(self, name: str):
        """`with clock("train"):` adds the block's wall time to part `name` (nothing when the block raises)."""
        start = time.monotonic()
        yield
        self.parts[name] = self.parts.get(name, 0.0) + time.monotonic() - start


PLAIN, LEAK, OWN_NOISE = "plain noise", "signal leak (dct+pixel)", "own offset noise"
TRAIN_SHARE = 0.55     # the least share of the budget the plan keeps for training, when models need it
FID_SECONDS = 15.0     # planned seconds of one FID (a 2048 x 2048 eigh) and KID (100 subsets), on the CPU
MIN_SAMPLES = 128      # the plan halves the samples per setting down to this, no lower
MIN_REFERENCE = 1000   # the plan halves uncached reference images down to this, no lower
REPORT_SECONDS = 60.0  # what the plan and the run-time checks keep for the figures and the report
# KID's standard deviation over subsets at n = 500 (CIFAR-10 at 32 px, KID about 0.04; docs/study.md's measured
# run): the plan's prior for the KID difference it can detect at its n (the report adds the measured one)
KID_STD_AT_500 = 0.003
TRAIN_TIMESTEPS = DiffusionConfig.num_train_timesteps  # T of every study model (train_config keeps the default)


@dataclass(frozen=True)
class Setting:
    """One evaluated way of sampling: `model` with `sampler` at `steps` steps (`nfe` model calls) from `start`
    noise with epsilon scale `eps_scale` (the mean lambda of lambda_t = eps_slope t + b when eps_slope is not 0,
    `eps_lambdas`); `level` is the NFE target of part 1 it stands for. clip_sample: the sampler's x0 clipping,
    None for the run's own (on for pixel models, where the sampler has it); spacing: a timestep spacing instead of
    the run's (None)."""
    model: str
    sampler: str
    steps: int
    nfe: int
    level: int
    eps_scale: float = 1.0
    start: str = PLAIN
    clip_sample: bool | None = None
    spacing: str | None = None
    eps_slope: float = 0.0

    @property
    def variant(self) -> str:
        """What the setting changes in the run's sampler: "" or e.g. " unclipped quadratic"."""
        clipping = {None: "", True: " clipped", False: " unclipped"}[self.clip_sample]
        return clipping + (f" {self.spacing}" if self.spacing else "")

    @property
    def key(self) -> str:
        slope = f" slope {self.eps_slope:g}" if self.eps_slope else ""
        return slug(f"{self.model} {self.sampler}{self.variant} {self.steps} eps {self.eps_scale:g}{slope} "
                    f"{self.start}")

    @property
    def label(self) -> str:
        scale = f", lambda {self.eps_scale:g}" if self.eps_scale != 1 or self.eps_slope else ""
        scale += f" (mean) with slope {self.eps_slope:g} per step" if self.eps_slope else ""
        return f"{self.model}, {self.sampler}{self.variant} {self.steps} steps ({self.nfe} calls){scale}, {self.start}"

    def eps_lambdas(self, num_steps: int):
        """The epsilon scale for `sample`: None (lambda 1), the constant lambda, or with a slope the N lambdas in
        sampling order, centred on eps_scale (`eps_scale_schedule`)."""
        if self.eps_slope:
            return eps_scale_schedule(self.eps_scale, num_steps, self.eps_slope, centred=True)
        return self.eps_scale if self.eps_scale != 1 else None

    def scheduler_overrides(self) -> dict:
        """Keywords for `from_config` on the run's schedule: clip_sample when set (dropped by samplers without it),
        the spacing with its `default_steps_offset` when set."""
        overrides = {} if self.clip_sample is None else {"clip_sample": self.clip_sample}
        if self.spacing:
            overrides.update(timestep_spacing=self.spacing, steps_offset=default_steps_offset(self.spacing))
        return overrides


def study_parts(config: QualityStudyConfig) -> dict:
    """{part: [Setting]} of the four evaluations. Parts 2-4 share the base setting: the standard model, DDIM at
    sample_steps from plain noise with lambda 1 and the run's x0 clipping (on for pixel models). Part 1 runs every
    sampler unclipped, so that clipping does not decide the comparison, plus DDIM with quadratic spacing (at the
    NFE levels it allows, `max_quadratic_steps`) and the base setting as its clipped DDIM row. Part 3 compares
    plain with leak-aware x_T on the standard model (the control) and, when it trains, the leaky one (SD's
    schedule)."""
    n = config.sample_steps
    base = Setting("standard", "ddim", n, n, n)
    samplers = {}  # by key: NFE targets that give a sampler the same steps (Heun at 9 and 10) are one setting
    for level in config.nfe_levels:
        for name in config.sampler_names:
            setting = Setting("standard", name, *sampler_steps(name, level), level, clip_sample=False)
            samplers.setdefault(setting.key, setting)
        if config.quadratic_ddim and level <= max_quadratic_steps(TRAIN_TIMESTEPS):
            setting = Setting("standard", "ddim", level, level, level, clip_sample=False, spacing=QUADRATIC_SPACING)
            samplers.setdefault(setting.key, setting)
    samplers.setdefault(base.key, base)
    return {"samplers": list(samplers.values()),
            "eps": [replace(base, eps_scale=value) for value in config.lambdas]
            + [replace(base, eps_scale=config.eps_slope_mean, eps_slope=k) for k in config.slopes],
            "leak": [setting for model in leak_models(config)
                     for setting in (replace(base, model=model), replace(base, model=model, start=LEAK))],
            "fixes": [base] + [Setting(fix, "ddim", n, n, n, start=OWN_NOISE if fix == "offset" else PLAIN)
                               for fix in config.fix_names]}


def leak_models(config: QualityStudyConfig) -> list:
    """The models of part 3 (and of its DC steering): the standard one, then the leaky one when it trains."""
    return ["standard", *(name for name in config.fix_names if name == "leaky")]


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
    choice: bf16 when asked for, or under auto when measured at least bf16_choice.MIN_GAIN times faster.
    Measured in this process; `calls_per_second` and `inception_per_second` count all `processes` sharing the work (the rates
    observed while evaluating replace these estimates)."""
    unet = UNet(unet_preset("tiny", in_channels=channels, sample_size=config.resolution,
                            num_classes=len(CLASS_NAMES))).to(device).eval()
    batch = min(config.eval_batch_size, config.unconditional_samples)
    speed = {"device": str(device), "batch": batch, "fp32_calls_per_second": _calls_per_second(unet, batch, None)}
    if config.autocast != "off":
        speed["bf16_calls_per_second"] = _calls_per_second(unet, batch, torch.bfloat16)
    faster = speed.get("bf16_calls_per_second", 0.0) > bf16_choice.MIN_GAIN * speed["fp32_calls_per_second"]
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


EXTRAS = ("terciles", "steering", "scan")  # the evaluations that are not settings (see `extra_calls`)


@dataclass
class Plan:
    """What the budget holds: the settings to evaluate (in run order), images per setting, reference images, the
    extras kept (EXTRAS), the estimated seconds of each part, and sentences saying what was dropped and why."""
    settings: list
    samples: int
    estimates: dict
    dropped: list
    reference: int = 0
    extras: tuple = EXTRAS


def plan_study(config: QualityStudyConfig, parts: dict, speed: dict, reference_cached, train_needed: bool,
               seconds_left: float, samples: int | None = None, reference: int | None = None) -> Plan:
    """Fit the study into `seconds_left`: the reference features (`reference_cached(count)` says whether the
    features of `count` reference images are on disk; if not they cost count / inception_per_second), training (at
    least TRAIN_SHARE of the budget while models still need it, less when that would leave no room for the
    evaluations that always run: the base setting, the real-data floor and the report), the evaluations and a
    margin. Cuts, in order, until the evaluations fit: part 1's NFE levels above sample_steps (largest first); the
    reference images (halved, down to MIN_REFERENCE); part 1's other settings; part 2's settings and scan; then the
    samples per setting (halved, down to MIN_SAMPLES), so more samples per setting win over settings of lower
    importance. A resumed study passes its first evaluations' `samples` and `reference` (see `first_choices`),
    which then stay as they are: all settings keep one n and one reference, so their FIDs stay comparable."""
    base, order = run_order(parts)[0], run_order(parts)
    extras = [e for e in EXTRAS if not (config.unet_from and e == "terciles")]  # a model from elsewhere: parts 1-3
    kept_samples, kept_reference = samples is not None, reference is not None
    samples = samples if kept_samples else config.unconditional_samples
    reference = reference if kept_reference else config.reference_images
    margin = 0.03 * 60 * config.minutes + 60
    dropped = [f"Samples per setting kept at {samples}, the count of the study's first evaluations."] \
        if kept_samples and samples != config.unconditional_samples else []
    while True:
        reference_seconds = 0.0 if reference_cached(reference) else reference / speed["inception_per_second"]
        least = setting_seconds(base, samples, speed) + floor_seconds(samples, speed) + REPORT_SECONDS
        share = TRAIN_SHARE * 60 * config.minutes if train_needed else 0.0
        training = min(share, max(seconds_left - reference_seconds - least - margin, 0.0))
        allowed = seconds_left - reference_seconds - training - margin
        cost = evaluation_seconds(config, order, samples, speed, extras)
        if cost <= allowed and training >= share:
            break
        why = (f"the evaluations were estimated at {cost / 60:.1f} min ({speed['calls_per_second']:.0f} model "
               f"calls/s, {speed['inception_per_second']:.1f} Inception images/s measured) but the budget left "
               f"{max(allowed, 0) / 60:.1f} min for them after the reference features ({reference_seconds / 60:.1f} "
               f"min), training ({training / 60:.1f} min) and a margin ({margin / 60:.1f} min)")
        levels = sorted({s.level for s in order if s in parts["samplers"] and s.level > config.sample_steps})
        lower = [[s for s in order if s in parts[part] and s != base] for part in ("samplers", "eps")]
        if levels:
            gone = [s for s in order if s.level == levels[-1] and s in parts["samplers"] and s != base]
            order = [s for s in order if s not in gone]
            dropped.append(f"Part 1 at NFE {levels[-1]} ({len(gone)} settings) dropped: {why}.")
        elif not kept_reference and reference_seconds and reference // 2 >= min(MIN_REFERENCE, reference):
            dropped.append(f"Reference images cut from {reference} to {reference // 2} (their features are not "
                           f"cached): {why}.")
            reference //= 2
        elif lower[0] or lower[1] or "scan" in extras:
            part, gone = (1, lower[0]) if lower[0] else (2, lower[1])
            order = [s for s in order if s not in gone]
            extras = extras if part == 1 else [e for e in extras if e != "scan"]
            dropped.append(f"Part {part} dropped ({len(gone)} settings{'' if part == 1 else ' and its scan'}; the base "
                           f"setting stays): {why}.")
        elif not kept_samples and samples // 2 >= min(MIN_SAMPLES, samples):
            dropped.append(f"Samples per setting cut from {samples} to {samples // 2}: {why}.")
            samples //= 2
        else:
            dropped.append(f"Nothing left to cut: {why}; settings that do not fit when their turn comes are "
                           "skipped.")
            break
    estimates = {"reference features": reference_seconds, "evaluations": cost, "evaluations (least)": least,
                 "training (least)": training, "margin": margin}
    return Plan(order, samples, estimates, dropped, reference, tuple(extras))


def detectable_kid_difference(samples: int, kid_std_at_500: float = KID_STD_AT_500) -> float:
    """The KID difference between two settings beyond two standard deviations of the difference, 2 sqrt(2)
    kid_std, at n samples each: kid_std scales as 1 / sqrt(n) (the unbiased MMD^2 of subsets of n // 2 images)."""
    return 2 * math.sqrt(2) * kid_std_at_500 * math.sqrt(500 / samples)


def evaluation_seconds(config: QualityStudyConfig, settings: list, samples: int, speed: dict,
                       extras=EXTRAS) -> float:
    """Planned seconds of the evaluations: the settings' (see `setting_seconds`), the real-data floor's and the model
    calls of the `extras` (see `extra_seconds`)."""
    extra = sum(seconds for name, seconds in extra_seconds(config, speed).items() if name in extras)
    return sum(setting_seconds(setting, samples, speed) for setting in settings) + floor_seconds(samples, speed) + extra


def floor_seconds(samples: int, speed: dict) -> float:
    """Seconds of the real-data floor: the held-out images' Inception features, FID and KID."""
    return samples / speed["inception_per_second"] + FID_SECONDS


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
    steering to two targets per model of part 3 and the eps-norm scan (forward pass and one chain per lambda,
    part 2)."""
    steps, per_class = config.sample_steps, config.samples_per_class
    return {"terciles": steps * per_class * 3 * (1 + len(config.fix_names)),
            "steering": steps * per_class * 2 * len(leak_models(config)),
            "scan": steps * config.exposure_images * (1 + len(config.lambdas))}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
