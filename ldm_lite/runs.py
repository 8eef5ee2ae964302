"""Run folders and checkpoints: the layout, the file names, saving, the resume check and `load_model`.

A run folder (written by `ldm_lite.training.train`):
    config.toml        the resolved training config
    checkpoint.pt      format TRAIN_FORMAT: unet_config, model, ema, optimizer, step, rng, config, data
                       (the data's classes and fingerprint, `data_record`)
    metrics.jsonl      one line per log interval
    classes.json       label index -> class name (class-conditional runs)
    samples/           sample grids written during training
    .lock              the lock a running training holds (`ldm_lite.run_safety.FolderLock`)
    latents.safetensors   the latent cache of a latent-diffusion run (unless latent.cache names another file)

Checkpoints are read by one function, `ldm_lite.models.weights_io.read_training_checkpoint`, which the UNet
loader shares. Run folders written by earlier versions keep loading: `stored_config` upgrades their configs.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm_lite.config import NOISE_DEFAULTS, NOISE_SWITCHES, Config
from ldm_lite.config_io import config_from_dict, config_to_dict
from ldm_lite.data import CIFAR10_CLASSES, SYNTHETIC_CLASSES
from ldm_lite.models.unet import load_unet
from ldm_lite.models.vae_loading import load_vae
from ldm_lite.models.weights_io import TRAIN_FORMAT, read_training_checkpoint

CHECKPOINT_NAME, RUN_CONFIG_FILE, CLASSES_FILE, METRICS_FILE = "checkpoint.pt", "config.toml", "classes.json", \
    "metrics.jsonl"
RESUME_ENTRIES = ("unet_config", "model", "ema", "optimizer", "step", "config")
# [train] keys that may change when a run resumes: when to stop, how often to report, how fast to run.
RESUMABLE_TRAIN_KEYS = ("steps", "max_minutes", "budget_clock", "num_threads", "keep_freed_memory", "compile",
                        "channels_last")


# ----------------------------------------------------------------------------- saving

def atomic_save(payload: dict, path: Path) -> None:
    """torch.save to `path` so that a crash at any moment leaves either the old or the new file:
    write `path`.tmp, fsync, rename over `path`, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        torch.save(payload, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@contextlib.contextmanager
def written_then_renamed(path):
    """Write a file so that no reader ever sees half of it: the body writes the temporary file it is given,
    `path`.PID.tmp beside `path` (PID: this process, so processes writing the same file never share one), which is
    renamed over `path` when the body ends, or removed when it raises (then `path` is untouched):

        with written_then_renamed(cache) as partial:
            save_file(tensors, str(partial))
    """
    path = Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)


def write_text(path, text: str) -> None:
    """Replace the text file `path` so that no reader (or resume after a kill) ever sees half of it."""
    with written_then_renamed(path) as partial:
        partial.write_text(text)


def read_metrics(path, warn: bool = False) -> list[dict]:
    """The records of a metrics.jsonl, in file order. An incomplete last line (a process killed while writing it,
    or one still writing) is left out, with a warning naming the file when `warn`; a damaged line anywhere else is
    a ValueError naming the file and the line."""
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            record["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number < len(lines):
                raise ValueError(f"{str(path)!r} line {number} is damaged ({line[:40]!r}); repair or delete the "
                                 "file") from None
            if warn:
                print(f"warning: {str(path)!r}: dropped its incomplete last line (written when the run was "
                      "killed)", file=sys.stderr)
            continue
        records.append(record)
    return records


def checkpoint_payload(config: Config, model, ema, optimizer, step: int) -> dict:
    """What checkpoint.pt holds (TRAIN_FORMAT)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"format": TRAIN_FORMAT, "unet_config": dataclasses.asdict(model.config), "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "optimizer": optimizer.state_dict(), "step": step,
            "rng": rng, "config": config_to_dict(config)}


def load_checkpoint(path: Path) -> dict:
    """A checkpoint to resume from: every entry a resume needs, or a one-line ValueError."""
    return read_training_checkpoint(path, required=RESUME_ENTRIES)


# ----------------------------------------------------------------------------- configs

def stored_config(tree: dict) -> Config:
    """The Config of a run folder or checkpoint, written by this or an earlier version.

    Earlier versions stored the noise strengths at the papers' values with their switches off; those values
    meant nothing and are dropped (today a strength set with its switch off is an error). Likewise
    min_snr_gamma = 5.0 with min_snr off.
    """
    tree = {section: dict(values) if isinstance(values, dict) else values for section, values in tree.items()}
    noise, diffusion = tree.get("noise", {}), tree.get("diffusion", {})
    for key, switch in NOISE_SWITCHES.items():
        if not noise.get(switch) and noise.get(key) == NOISE_DEFAULTS[key]:
            noise.pop(key)
    if not diffusion.get("min_snr") and diffusion.get("min_snr_gamma") == 5.0:
        diffusion.pop("min_snr_gamma")
    return config_from_dict(tree)


def training_differences(saved: Config, config: Config) -> list:
    """The `section.key` names whose values differ between two configs and shape the training, so a resume
    with them would silently train another model: [data], [latent], [model], [diffusion], [noise], and the
    [train] keys other than RESUMABLE_TRAIN_KEYS. [run] (output, logging, sampling frequencies) may change."""
    before, after = config_to_dict(saved), config_to_dict(config)
    differing = []
    for section in ("data", "latent", "model", "diffusion", "noise", "train"):
        for key, value in after[section].items():
            if section == "train" and key in RESUMABLE_TRAIN_KEYS:
                continue
            if before[section].get(key) != value:
                differing.append(f"{section}.{key}")
    return differing


def check_resume(checkpoint: dict, config: Config, path: Path) -> None:
    """Refuse, in one line, to resume a checkpoint whose training settings differ from `config`."""
    differing = training_differences(stored_config(checkpoint["config"]), config)
    if differing:
        raise ValueError(f"{str(path)!r} was trained with other settings ({', '.join(differing)}); to start fresh, "
                         f"choose another --out or pass --fresh (deletes the old checkpoint)")


def data_record(dataset) -> dict:
    """What a run records of its data (an InMemoryImages): the class names and a fingerprint of the tensor it
    trains on (images, or latents); file times are not used, since every copy changes them."""
    return {"classes": list(dataset.class_names), "fingerprint": tensor_digest(dataset.images)}


def check_data(checkpoint: dict | None, record: dict, config: Config, is_main: bool = True) -> dict:
    """`record` (see `data_record`) with the history of data changes, after comparing it with the checkpoint's.

    Other classes are refused in one line (the model has one embedding per class); other images are refused
    unless run.allow_data_change, and then the change is printed and kept in the checkpoint ("changes").
    Checkpoints of earlier versions record no data and are not checked.
    """
    saved = (checkpoint or {}).get("data")
    if saved is None:
        return record
    where = str(Path(config.run.out))
    if saved["classes"] != record["classes"]:
        raise ValueError(f"{where!r} was trained on the classes {saved['classes']} but the data now hold "
                         f"{record['classes']}; choose another --out or pass --fresh to start over")
    changes = saved.get("changes", [])
    if saved["fingerprint"] != record["fingerprint"]:
        if not config.run.allow_data_change:
            raise ValueError(f"the data's images differ from those {where!r} was trained on (fingerprint "
                             f"{saved['fingerprint']}, now {record['fingerprint']}); pass --allow-data-change to "
                             "resume on them, or --fresh to start over")
        step = int(checkpoint["step"])
        changes = [*changes, {"step": step, "from": saved["fingerprint"], "to": record["fingerprint"]}]
        if is_main:
            print(f"{where}: resuming at step {step} on changed data (fingerprint {saved['fingerprint']} -> "
                  f"{record['fingerprint']}; --allow-data-change)")
    return {**record, "changes": changes} if changes else record


def tensor_digest(tensor: torch.Tensor, digits: int = 16) -> str:
    """The first `digits` hex digits of the SHA-256 of a tensor's bytes."""
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy()).hexdigest()[:digits]


def run_config(path: Path) -> tuple | None:
    """(Config, where it came from) of an ldm_lite run: its config.toml, else the copy inside the checkpoint.

    None when `path` is neither a run folder (checkpoint.pt) nor a training checkpoint file.
    """
    checkpoint = path / CHECKPOINT_NAME if path.is_dir() else path
    if not checkpoint.is_file() or checkpoint.suffix not in (".pt", ".ckpt"):
        return None
    toml = checkpoint.parent / RUN_CONFIG_FILE
    if toml.is_file():
        import tomllib
        return stored_config(tomllib.loads(toml.read_text())), str(toml)
    saved = read_training_checkpoint(checkpoint, required=("config",))
    return stored_config(saved["config"]), f"{checkpoint} (embedded config)"


def class_names(run_dir: Path, data) -> tuple | None:
    """Label names of a run: its classes.json, or for runs older than that file, what the data config implies."""
    recorded = run_dir / CLASSES_FILE
    if recorded.is_file():
        return tuple(json.loads(recorded.read_text()))
    if data.source == "synthetic" or data.labels == "brightness":
        return SYNTHETIC_CLASSES
    if data.source.startswith("cifar10:"):
        return CIFAR10_CLASSES
    return None


# ----------------------------------------------------------------------------- loading for sampling

@dataclass
class LoadedModel:
    """A denoiser ready to sample: UNet, the schedule it was trained with, and the VAE of a latent model.

    scheduler_config: diffusers-style keywords with `_class_name` (read by `ldm_lite.schedulers.from_config`).
    class_names: names of the class labels when the checkpoint records them (index = label).
    """
    unet: torch.nn.Module
    scheduler_config: dict
    vae: torch.nn.Module | None = None
    class_names: tuple | None = None
    source: dict = field(default_factory=dict)

    @property
    def sample_shape(self) -> tuple:
        """(C, H, W) of what the UNet denoises: images, or latents for a latent model."""
        config = self.unet.config
        return (config.in_channels, config.sample_size, config.sample_size)


def load_model(path, use_ema: bool = True, scheduler_config=None) -> LoadedModel:
    """Load a checkpoint for sampling.

    path: an ldm_lite run folder (checkpoint.pt + config.toml), a training checkpoint .pt inside one, or a
    diffusers folder: a pipeline (model_index.json, unet/, scheduler/, optionally vae/) or a UNet2DModel
    folder whose schedule is found in scheduler_config.json beside it or in ../scheduler/.
    scheduler_config: a scheduler_config.json (file or folder) overriding the checkpoint's schedule; needed
    for weights that carry none (an exported .safetensors).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (expected an ldm_lite run folder, a "
                                "training checkpoint .pt or a diffusers folder)")
    found = run_config(path)
    if (path / "model_index.json").is_file():
        loaded = _load_diffusers_pipeline(path)
    elif found is not None:
        loaded = _load_run(path, *found, use_ema)
    else:
        loaded = LoadedModel(load_unet(path, use_ema=use_ema), None, source={"kind": "weights", "path": str(path)})
    if scheduler_config is not None:
        loaded.scheduler_config = read_json(Path(scheduler_config), "scheduler_config.json")
    elif loaded.scheduler_config is None:
        loaded.scheduler_config = _find_scheduler_config(path)
    loaded.unet.eval()
    if loaded.vae is not None and loaded.vae.latent_channels != loaded.unet.config.in_channels:
        raise ValueError(f"the VAE has {loaded.vae.latent_channels} latent channels but the UNet takes "
                         f"{loaded.unet.config.in_channels}")
    return loaded


def folder_of(path: Path) -> Path:
    """`path` if it is a folder, else the folder holding the file."""
    return path if path.is_dir() else path.parent


def read_json(path: Path, name: str) -> dict:
    """JSON from `path`, or from `path`/`name` when `path` is a folder; one-line errors."""
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {name} at {str(path)!r}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from None


def _load_diffusers_pipeline(folder: Path) -> LoadedModel:
    """A diffusers pipeline folder: model_index.json names the components stored in subfolders."""
    index = read_json(folder, "model_index.json")
    if "vqvae" in index:
        raise ValueError(f"{folder}: VQ-VAE pipelines (LDMPipeline) are not supported; only AutoencoderKL (vae/)")
    if "unet" not in index or "scheduler" not in index:
        raise ValueError(f"{folder}/model_index.json must list 'unet' and 'scheduler' (found: {sorted(index)})")
    vae = load_vae(folder / "vae", dtype=torch.float32) if "vae" in index else None
    scheduler_config = read_json(folder / "scheduler", "scheduler_config.json")
    names = tuple(read_json(folder, CLASSES_FILE)) if (folder / CLASSES_FILE).is_file() else None  # our exports
    return LoadedModel(load_unet(folder), scheduler_config, vae, class_names=names,
                       source={"kind": "diffusers pipeline", "path": str(folder)})


def _find_scheduler_config(path: Path) -> dict:
    """The schedule of bare weights: scheduler_config.json beside them, in scheduler/, or in ../scheduler/."""
    folder = folder_of(path)
    for candidate in (folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json",
                      folder.parent / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return read_json(candidate, candidate.name)
    raise ValueError(f"{path} holds no noise schedule (no run config.toml, no scheduler_config.json beside it or "
                     "in ../scheduler/); pass one with --scheduler-config")


def _load_run(path: Path, config: Config, config_source: str, use_ema: bool) -> LoadedModel:
    """An ldm_lite run: the schedule, the VAE and the class names come from its resolved training config."""
    vae = load_vae(config.latent.vae, dtype=torch.float32) if config.latent.vae else None
    return LoadedModel(load_unet(path, use_ema=use_ema), config.scheduler_config(), vae,
                       class_names=class_names(folder_of(path), config.data),
                       source={"kind": "ldm_lite run", "path": str(path), "config": config_source})


__all__ = ["CHECKPOINT_NAME", "RUN_CONFIG_FILE", "CLASSES_FILE", "METRICS_FILE", "LoadedModel", "atomic_save",
           "written_then_renamed", "write_text", "read_metrics", "check_data", "check_resume", "checkpoint_payload", "class_names", "data_record",
           "load_checkpoint", "load_model", "run_config", "stored_config", "tensor_digest", "training_differences"]
