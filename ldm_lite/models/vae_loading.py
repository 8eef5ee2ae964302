"""Read AutoencoderKL weights in every common layout, with no conversion step; write original-layout files.

Detected formats (`read_vae_state_dict` returns one of these names):
  "original checkpoint"   a whole SD checkpoint (.safetensors/.ckpt): the VAE sits under `first_stage_model.`
                          (or ComfyUI's `vae.`); the UNet, text encoder and EMA copies are ignored, and for
                          .safetensors never even read.
  "original VAE"          a standalone VAE file such as vae-ft-mse-840000-ema-pruned.{safetensors,ckpt}: no prefix,
                          maybe wrapped in "state_dict"; training-only `loss.*` and `model_ema.*` keys are dropped.
  "diffusers folder"      config.json + diffusion_pytorch_model.{safetensors,bin} (a pipeline folder's vae/ too),
  "diffusers file"        or such a weight file alone; old (query/key/value/proj_attn) and new (to_q/to_k/to_v/
                          to_out.0) attention names, with linear (C, C) or 1x1-conv (C, C, 1, 1) weights.
Pickle files (.ckpt, .pt, .pth, .bin) are read with torch.load(weights_only=True): tensors and plain containers
only; a file that needs arbitrary code is refused. Every load is strict: a wrong file raises a ValueError listing
missing, unexpected and wrongly shaped keys and the detected format, never a silent partial load.
"""
import dataclasses
import json
import math
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm_lite.checks import safetensors_file
from ldm_lite.models.weights_io import torch_load_weights
from ldm_lite.models.vae import PRESETS, AutoencoderKL, VAEConfig, vae_preset

CHECKPOINT_PREFIXES = ("first_stage_model.", "vae.")
TRAINING_ONLY_PREFIXES = ("loss.", "model_ema.")
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                          "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
CONFIG_KEY = "ldm_lite_vae_config"   # our config, stored in safetensors metadata or beside a .ckpt's state_dict
ATTENTION_WEIGHT = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


# ----------------------------------------------------------------------------------------------- reading files

def _checkpoint_prefix(keys) -> str:
    return next((p for p in CHECKPOINT_PREFIXES if any(k.startswith(p) for k in keys)), "")


def _select(state_dict: dict, prefix: str) -> dict:
    """Tensors under `prefix` (prefix removed); with no prefix, all tensors but the training-only ones."""
    if prefix:
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return {k: v for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and not k.startswith(TRAINING_ONLY_PREFIXES)}


def _read_safetensors(file: Path) -> tuple:
    """(VAE tensors, prefix, our stored config or None): only the VAE's tensors are read from disk."""
    safetensors_file(file)
    try:
        return _read_safetensors_unchecked(file)
    except SafetensorError as error:
        raise ValueError(f"{file}: not a readable .safetensors file ({error})") from None


def _read_safetensors_unchecked(file: Path) -> tuple:
    with safe_open(str(file), framework="pt") as handle:
        keys = list(handle.keys())
        prefix = _checkpoint_prefix(keys)
        wanted = _select(dict.fromkeys(keys, torch.empty(0)), prefix)
        state_dict = {k: handle.get_tensor(prefix + k) for k in wanted}
        stored = (handle.metadata() or {}).get(CONFIG_KEY)
    return state_dict, prefix, json.loads(stored) if stored else None


def _read_pickle(file: Path) -> tuple:
    raw = torch_load_weights(file)
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a dict of tensors, found a {type(raw).__name__}")
    stored = raw.get(CONFIG_KEY)
    if isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    prefix = _checkpoint_prefix(raw)
    return {k: v.clone() for k, v in _select(raw, prefix).items()}, prefix, stored   # clone: drop the mmap


def _diffusers_weight_file(folder: Path) -> tuple:
    """(weight file, config.json) of a diffusers VAE folder or of a pipeline folder holding vae/."""
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    files = [folder / name for name in DIFFUSERS_WEIGHT_FILES if (folder / name).is_file()]
    if not (folder / "config.json").is_file() or not files:
        raise ValueError(f"{folder}: not a diffusers VAE folder (needs config.json and one of "
                         f"{', '.join(DIFFUSERS_WEIGHT_FILES)})")
    return files[0], json.loads((folder / "config.json").read_text())


# ----------------------------------------------------------------------------------------------- diffusers names

def _rename_diffusers_key(key: str, levels: int) -> str:
    """One diffusers AutoencoderKL key -> the original (CompVis) name. decoder.up_blocks.k is decoder.up.(n-1-k)."""
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.", key)
    key = re.sub(r"\.mid_block\.resnets\.([01])\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = key.replace(".mid_block.attentions.0.", ".mid.attn_1.").replace(".conv_shortcut.", ".nin_shortcut.")
    for new, old, original in (("group_norm", "group_norm", "norm"), ("to_q", "query", "q"), ("to_k", "key", "k"),
                               ("to_v", "value", "v"), ("to_out.0", "proj_attn", "proj_out")):
        key = re.sub(rf"\.attn_1\.({re.escape(new)}|{old})\.", f".attn_1.{original}.", key)
    return key


def is_diffusers_layout(keys) -> bool:
    return any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in keys)


def original_from_diffusers(state_dict: dict) -> dict:
    """A diffusers AutoencoderKL state dict renamed to the original layout (tensors shared, shapes unchanged)."""
    up_levels = {int(m[1]) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    levels = max(up_levels) + 1 if up_levels else 0
    return {_rename_diffusers_key(k, levels): v for k, v in state_dict.items()}


def _attention_as_conv(state_dict: dict) -> dict:
    """Linear (C, C) attention weights (diffusers, some converted files) as the 1x1 convs (C, C, 1, 1) we hold."""
    return {k: v.reshape(*v.shape[:2], 1, 1) if ATTENTION_WEIGHT.search(k) and v.ndim in (2, 3) else v
            for k, v in state_dict.items()}


def read_vae_state_dict(path) -> tuple:
    """(state dict in our original layout, detected format, config source) from a file or folder.

    The config source is a diffusers config.json dict, our own stored VAEConfig fields, or None.
    """
    path = Path(path)
    config_json = stored = None
    if path.is_dir():
        file, config_json = _diffusers_weight_file(path)
        fmt = "diffusers folder"
    else:
        file = path
    if file.suffix == ".safetensors":
        state_dict, prefix, stored = _read_safetensors(file)
    elif file.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        state_dict, prefix, stored = _read_pickle(file)
    else:
        raise ValueError(f"{path}: unknown weight file type {file.suffix!r}; "
                         f"use .safetensors, .ckpt, .pt, .pth, .bin or a diffusers folder")
    if not path.is_dir():
        fmt = "original checkpoint" if prefix else "original VAE"
    if is_diffusers_layout(state_dict):
        state_dict = original_from_diffusers(state_dict)
        fmt = fmt if path.is_dir() else "diffusers file"
    return _attention_as_conv(state_dict), fmt, config_json if config_json is not None else stored


# ----------------------------------------------------------------------------------------------- config inference

def infer_architecture(state_dict: dict) -> dict | None:
    """VAEConfig architecture fields read off an original-layout state dict's shapes; None if keys are missing."""
    try:
        levels = 1 + max(int(m[1]) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
        layers = len({m[1] for k in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.conv1\.w", k))})
        return dict(in_channels=state_dict["encoder.conv_in.weight"].shape[1],
                    out_channels=state_dict["decoder.conv_out.weight"].shape[0],
                    block_out_channels=tuple(state_dict[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]
                                             for i in range(levels)),
                    layers_per_block=layers,
                    latent_channels=state_dict["decoder.conv_in.weight"].shape[1],
                    mid_attention="encoder.mid.attn_1.q.weight" in state_dict,
                    use_quant_conv="quant_conv.weight" in state_dict,
                    use_post_quant_conv="post_quant_conv.weight" in state_dict)
    except (KeyError, ValueError, IndexError):
        return None


def _variant_name(architecture: dict, fmt: str, scaling) -> str:
    """Preset whose architecture matches; SD vs SDXL and SD3 vs Flux share one, so the scaling (when the file
    says it) decides, else the usual packaging: SD for 4 channels, SD3 inside a whole checkpoint, else Flux."""
    fields = [f.name for f in dataclasses.fields(VAEConfig) if f.name in architecture]
    names = [n for n in PRESETS if all(getattr(vae_preset(n), f) == architecture[f] for f in fields)]
    if not names:
        return "custom"
    by_scaling = [n for n in names if scaling is not None and math.isclose(PRESETS[n]["scaling_factor"], scaling)]
    if by_scaling:
        return by_scaling[0]
    if "sd3" in names and "flux" in names:
        guess = "sd3" if fmt == "original checkpoint" else "flux"
        warnings.warn(f"16-channel VAE taken as {guess!r} (it fits sd3 and flux, which scale latents differently); "
                      f"pass variant= to choose")
        return guess
    return names[0]   # "sd" before "sdxl": the SD 1.x/2.x VAE is the common 4-channel one


def infer_config(state_dict: dict, fmt: str, config_source: dict | None) -> VAEConfig | None:
    """VAEConfig from our stored config, else from shapes plus a diffusers config.json (scaling, groups, upcast)."""
    if config_source is not None and "variant" in config_source:   # written by save_vae_original
        return VAEConfig(**config_source)
    architecture = infer_architecture(state_dict)
    if architecture is None:
        return None
    source = config_source or {}
    name = _variant_name(architecture, fmt, source.get("scaling_factor"))
    fields = dict(PRESETS.get(name, {}), **architecture, variant=name)
    if source.get("norm_num_groups"):
        fields["norm_groups"] = source["norm_num_groups"]
    for key in ("scaling_factor", "shift_factor", "force_upcast"):
        if source.get(key) is not None:
            fields[key] = source[key]
    return VAEConfig(**fields)


# ----------------------------------------------------------------------------------------------- load and save

def check_state_dict(expected: dict, given: dict, source, fmt: str, shown: int = 5) -> None:
    """Raise a ValueError naming missing, unexpected and wrongly shaped keys (first `shown` of each)."""
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    wrong = [f"{k}: file {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sorted(expected.keys() & given.keys()) if given[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(items)} {label} {items[:shown]}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)) if items]
        raise ValueError(f"{source}: does not fit the VAE (detected format: {fmt}): " + "; ".join(parts))


def vae_from_state_dict(config: VAEConfig, state_dict: dict, source="state dict", fmt: str = "original VAE",
                        dtype: torch.dtype | None = None) -> AutoencoderKL:
    """An AutoencoderKL holding exactly `state_dict` (original layout), all tensors cast to `dtype` (default: the
    dtype of the file's decoder.conv_in.weight). Built on the meta device, so no random init is spent."""
    state_dict = _attention_as_conv(state_dict)
    with torch.device("meta"):
        model = AutoencoderKL(config)
    check_state_dict(model.state_dict(), state_dict, source, fmt)
    dtype = dtype or state_dict["decoder.conv_in.weight"].dtype
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, assign=True)
    return model.to(memory_format=torch.channels_last).eval()


def load_vae(path_or_variant, variant: str | None = None, dtype: torch.dtype | None = None,
             seed: int = 0) -> AutoencoderKL:
    """An AutoencoderKL from a weight file or folder in any format above, or a random one from a variant name.

    path_or_variant: file, folder, or one of "sd", "sdxl", "sd3", "flux", "test" (random init seeded by `seed`).
    variant: force a preset (its architecture must match the file); by default inferred from shapes and config:
        the preset with the file's architecture and scaling, "sd" for an SD-shaped file without a config, and
        "custom" for other architectures (scaling from config.json, else 0.18215; override `vae.config`).
    dtype: cast the weights (e.g. torch.float32 to upcast float16/bfloat16 files); default keeps the file's.
    """
    if variant is not None and variant not in PRESETS:
        raise ValueError(f"variant must be one of {sorted(PRESETS)} or None, got {variant!r}")
    path = Path(path_or_variant)
    if str(path_or_variant) in PRESETS:
        if variant not in (None, str(path_or_variant)):
            raise ValueError(f"variant={variant!r} contradicts path_or_variant={str(path_or_variant)!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoencoderKL(vae_preset(str(path_or_variant)))
        return model.to(dtype or torch.float32).eval()
    if not path.exists():
        raise ValueError(f"path_or_variant {str(path_or_variant)!r} is neither an existing file or folder nor "
                         f"a variant name ({', '.join(PRESETS)})")
    state_dict, fmt, config_source = read_vae_state_dict(path)
    config = vae_preset(variant) if variant else infer_config(state_dict, fmt, config_source) or vae_preset("sd")
    return vae_from_state_dict(config, state_dict, path, fmt, dtype)


def save_vae_original(vae: AutoencoderKL, path, prefix: str = "", extra: dict | None = None) -> None:
    """Write `vae` in the original layout: .safetensors (config in the metadata) or .ckpt/.pt ({"state_dict": ...}).

    prefix "first_stage_model." writes it as an SD checkpoint would; `extra` adds other tensors (e.g. a UNet).
    """
    path = Path(path)
    tensors = {prefix + k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    tensors.update(extra or {})
    config = json.dumps(dataclasses.asdict(vae.config))
    if path.suffix == ".safetensors":
        save_file(tensors, str(path), metadata={"format": "pt", CONFIG_KEY: config})
    elif path.suffix in (".ckpt", ".pt"):
        torch.save({"state_dict": tensors, CONFIG_KEY: json.loads(config)}, path)
    else:
        raise ValueError(f"path must end in .safetensors, .ckpt or .pt, got {path}")
