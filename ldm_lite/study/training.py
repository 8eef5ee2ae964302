"""Training of the study's models: one config per model (the standard recipe or a fix), pairs trained side by side
in child processes of one thread each (`ldm_lite.processes`), and the trained models loaded back."""
import contextlib
import dataclasses
import json
from pathlib import Path

import torch

from ldm_lite import bf16_choice, compile_choice
from ldm_lite.config import LEGACY_VALUES
from ldm_lite.config_io import config_from_dict
from ldm_lite.models import UNet, load_unet, unet_preset
from ldm_lite.processes import train_in_processes
from ldm_lite.runs import CHECKPOINT_NAME, load_checkpoint, load_model, stored_config, write_text
from ldm_lite.schedulers import from_config
from ldm_lite.study.config import CLASS_NAMES, QualityStudyConfig, StudyConfig
from ldm_lite.study.plan import Clock, Plan
from ldm_lite.training import AUTOCAST_DTYPES, train


def train_config(config: StudyConfig, name: str, minutes: float, threads: int = 0, steps: int | None = None):
    """The training config of one of the study's models (tiny, class-conditional, null labels 10%): "standard",
    or a fix: "offset" (offset noise), "ip" (input perturbation), "zero_snr" (v-prediction, trailing spacing), or
    "leaky": the standard recipe on Stable Diffusion's schedule (`StudyConfig.BETAS`), whose signal leak is large."""
    zero_snr = name == "zero_snr"
    beta_schedule, beta_start, beta_end = StudyConfig.BETAS if name == "leaky" else config.BETAS
    return config_from_dict({
        "data": {"source": config.data, "resolution": config.resolution, "synthetic_size": config.synthetic_size,
                 "max_images": config.max_images, "labels": "dataset" if config.data == "synthetic" else "brightness"},
        "model": {"preset": "tiny", "class_conditional": True, "null_label_prob": 0.1},
        "diffusion": {"beta_schedule": beta_schedule, "beta_start": beta_start, "beta_end": beta_end,
                      "rescale_betas_zero_snr": zero_snr, "prediction_type": "v_prediction" if zero_snr else "epsilon"},
        "noise": _noise_section(config, name),
        "train": {"steps": steps or config.steps, "batch_size": config.batch_size, "lr": config.lr,
                  "warmup_steps": 100, "ema_decay": 0.999, "seed": config.seed, "max_minutes": max(minutes, 0.1),
                  "num_threads": threads, "precision": config.precision, "compile": config.compile},
        "run": {"out": str(Path(config.out) / f"model_{name}"), "log_every": 25, "checkpoint_every": 250,
                "sample_every": 0, "progress": config.progress and threads == 0, "resume": True,
                "fresh": config.fresh},
    })


def shared_precision(config: StudyConfig, names: list, channels: int, device) -> StudyConfig:
    """`config` with --precision auto resolved once for all its models, so they compare: the precision an earlier
    run of this study stored in a model's checkpoint (unless --fresh), else bf16 where a training step of the
    study's model measures at least bf16_choice.MIN_GAIN times faster under it, on one thread as the models train
    side by side, else fp32."""
    if config.precision != "auto":
        return config
    stored = _stored_choice(config, names, "precision")
    if stored is not None:
        return dataclasses.replace(config, precision=stored)
    with _one_thread():
        gain = bf16_choice.training_gain(_study_model(config, channels, device), (channels, config.resolution,
                                         config.resolution), config.batch_size, torch.device(device))
    precision = bf16_choice.choose(gain)
    print(f"--precision auto: {precision} (a training step measured {gain:.2f}x faster under bf16 autocast)")
    return dataclasses.replace(config, precision=precision)


def shared_compile(config: StudyConfig, names: list, channels: int, device, minutes: float) -> StudyConfig:
    """`config` with --compile auto resolved once for all its models (after --precision), so they train alike:
    the choice an earlier run of this study stored in a model's checkpoint (unless --fresh); "off" when each
    model trains less than compile_choice.MIN_MINUTES (`minutes`), since compiling costs about a minute; else
    "on" where a compiled training step of the study's model, at its precision and on one thread as the models
    train, measures at least compile_choice.MIN_GAIN times faster (about a minute to compile), "off" otherwise
    or where compiling fails."""
    if config.compile != "auto":
        return config
    stored = _stored_choice(config, names, "compile")
    if stored in ("on", "off"):
        return dataclasses.replace(config, compile=stored)
    if minutes < compile_choice.MIN_MINUTES:
        choice, reason = "off", f"each model trains {minutes:.1f} min, less than the {compile_choice.MIN_MINUTES:g} " \
                                f"that repay compiling"
    else:
        try:
            with _one_thread():
                gain = compile_choice.training_gain(_study_model(config, channels, device), (channels,
                                                    config.resolution, config.resolution), config.batch_size,
                                                    torch.device(device), AUTOCAST_DTYPES[config.precision])
            choice = "on" if gain >= compile_choice.MIN_GAIN else "off"
            reason = f"a compiled training step measured {gain:.2f}x the eager speed"
        except Exception as error:  # no C++ compiler, an operation the compiler does not take
            choice, reason = "off", compile_choice.failure_reason(error)
    print(f"--compile auto: {choice} ({reason})")
    return dataclasses.replace(config, compile=choice)


def _stored_choice(config: StudyConfig, names: list, key: str):
    """train.`key` as an earlier run of this study stored it in one of its models' checkpoints (older bool
    spellings read as today's), or None (no checkpoint yet, or --fresh)."""
    for name in names if not config.fresh else ():
        path = Path(config.out) / f"model_{name}" / CHECKPOINT_NAME
        if path.is_file():
            value = load_checkpoint(path)["config"]["train"].get(key)
            return LEGACY_VALUES.get(f"train.{key}", {}).get(value, value)
    return None


def _study_model(config: StudyConfig, channels: int, device) -> UNet:
    return UNet(unet_preset("tiny", in_channels=channels, sample_size=config.resolution,
                            num_classes=len(CLASS_NAMES))).to(device)


@contextlib.contextmanager
def _one_thread():
    """Measure on one thread, as the models train side by side."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
        run_dirs = train_in_processes(configs, config.progress, threads=1)
    return {name: {"model": load_unet(run_dirs[name]).eval(), "config": configs[name], "run_dir": run_dirs[name],
                   **_trained_with(run_dirs[name])} for name in names}


def study_scheduler(trained: dict):
    """DDIM on the model's schedule, with the spacing every command uses for it (`Config.scheduler_config`)."""
    return from_config(trained["config"])


def trained_record(out: Path) -> dict:
    path = out / "trained.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def train_study_models(config: QualityStudyConfig, names: list, clock: Clock, plan: Plan, device,
                       channels: int = 3) -> dict:
    """Train the models two at a time (one process and one thread each) for the same number of steps: the first
    pair for its share of what the planned evaluations leave (at least the plan's training floor), later pairs for
    as many steps as it reached, capped at 1.25 times that share; none takes what the evaluations that always run
    (the plan's "evaluations (least)") and the margin need. trained.json records finished models, so a
    resumed study loads them. Returns {name: trained model info}."""
    out, record = Path(config.out), trained_record(Path(config.out))
    pending = [pair for pair in (names[i:i + 2] for i in range(0, len(names), 2))
               if any(name not in record for name in pair)]
    if pending and config.compile == "auto":  # chosen by each model's share, which then pays for the choice
        with clock("choose train.compile"):
            config = shared_compile(config, names, channels, device, _pair_share(clock, plan, len(pending)))
    share = _pair_share(clock, plan, len(pending))
    kept = plan.estimates["margin"] + plan.estimates["evaluations (least)"]  # what training never takes
    for pair in pending:
        steps = record.get("steps", config.steps)
        minutes = min(share * (1.25 if "steps" in record else 1.0), (clock.left() - kept) / 60)
        configs = {name: train_config(config, name, minutes, 1 if len(pair) > 1 else 0, steps) for name in pair}
        with clock(f"train {' + '.join(pair)}"):
            # threads=0 keeps each config's thread count: one each for a pair, torch's default for a model alone
            train_in_processes(configs, config.progress, hide_cuda=device.type == "cpu", threads=0)
        for name in pair:
            record[name] = int(load_checkpoint(Path(configs[name].run.out) / CHECKPOINT_NAME)["step"])
        record.setdefault("steps", min(record[name] for name in pair))
        write_text(out / "trained.json", json.dumps(record))
    return {name: load_trained(config, name, record.get("steps", config.steps), device) for name in names}


def _pair_share(clock: Clock, plan: Plan, pairs: int) -> float:
    """Minutes each of `pairs` pairs trains for: what the planned evaluations and the margin leave, at least the
    plan's training floor."""
    available = clock.left() - plan.estimates["evaluations"] - plan.estimates["margin"]
    return max(available, plan.estimates["training (least)"]) / 60 / max(pairs, 1)


def load_trained(config: StudyConfig, name: str, steps: int, device) -> dict:
    trained_config = train_config(config, name, 0.1, steps=steps)
    run_dir = Path(trained_config.run.out)
    return {"model": load_unet(run_dir).to(device).eval(), "config": trained_config, "run_dir": run_dir,
            **_trained_with(run_dir)}


def _trained_with(run_dir: Path) -> dict:
    """What a trained model's checkpoint records beyond its config: its steps, and whether it trained compiled
    (train.compile = "auto" settles while training)."""
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
    return {"steps": int(checkpoint["step"]), "compile": stored_config(checkpoint["config"]).train.compile}


def external_model(config: QualityStudyConfig, channels: int, device) -> dict:
    """The model of --unet-from, in the standard model's place (a dict like `load_trained`'s, its "config" the
    scheduler config it was trained with): whatever `runs.load_model` reads, a diffusers UNet2DModel folder or
    pipeline, an ldm_lite run or its export. Its images must be the study's: `channels` x resolution^2 pixels."""
    loaded = load_model(config.unet_from)
    if loaded.vae is not None:
        raise ValueError(f"unet_from: {config.unet_from!r} is a latent model; the study samples pixel models")
    if loaded.sample_shape != (channels, config.resolution, config.resolution):
        raise ValueError(f"unet_from: {config.unet_from!r} makes {'x'.join(map(str, loaded.sample_shape))} images, the "
                         f"study's data is {channels}x{config.resolution}x{config.resolution} (--resolution)")
    checkpoint = Path(config.unet_from) / CHECKPOINT_NAME
    return {"model": loaded.unet.to(device).eval(), "config": loaded.scheduler_config,
            "run_dir": Path(config.unet_from),
            "steps": int(load_checkpoint(checkpoint)["step"]) if checkpoint.is_file() else 0,
            "source": loaded.source}


def model_row(name: str, trained: dict) -> dict:
    c = trained["config"]
    if isinstance(c, dict):  # a model of --unet-from: its scheduler config
        return dict(model=name, schedule=c.get("beta_schedule", "linear"), prediction=c.get("prediction_type",
                    "epsilon"), spacing=c.get("timestep_spacing", "leading"), training_noise="trained elsewhere",
                    steps=trained["steps"], source=trained["source"].get("path", ""))
    noise = "randn"
    if c.noise.offset_noise:
        noise = f"randn + offset noise {c.noise.strength('offset_noise_strength'):g}"
    elif c.noise.input_perturbation:
        noise = f"randn, input perturbation gamma {c.noise.strength('input_perturbation_gamma'):g}"
    return dict(model=name, schedule=schedule_name(trained), prediction=c.diffusion.prediction_type,
                spacing=c.scheduler_config()["timestep_spacing"], training_noise=noise, steps=trained["steps"],
                batch_size=c.train.batch_size, seed=c.train.seed, precision=c.train.precision,
                compile=trained["compile"])


def schedule_name(trained: dict) -> str:
    d = trained["config"].diffusion
    return d.beta_schedule + (" + zero SNR" if d.rescale_betas_zero_snr else "")
