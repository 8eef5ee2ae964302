"""Read and write UNet weights: our .safetensors, training checkpoints, and diffusers `UNet2DModel` folders.

Our module tree already uses diffusers' parameter names (`down_blocks.1.attentions.0.to_q.weight`, ...), so a
diffusers folder needs only (1) its config.json translated to UNetConfig fields and (2) the attention names of
old files renamed (`query, key, value, proj_attn` -> `to_q, to_k, to_v, to_out.0`). Pickle-based files
(.bin, .pt, .ckpt) are read with `torch.load(weights_only=True)`, so no pickled code runs.

This module knows file formats only; `unet.py` builds the model (`load_unet`, `save_unet`).
"""
import json
from pathlib import Path

from safetensors.torch import load_file, safe_open, save_file

from ldm_lite.checks import safetensors_file
from ldm_lite.models.weights_io import read_training_checkpoint, torch_load_weights

EXPORT_FORMAT = "ldm_lite.unet.v1"
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# UNet2DModel.__init__ defaults, used when a config.json omits a key (diffusers does the same).
DIFFUSERS_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None,
}
# Settings our UNet does not implement: a config asking for anything else is refused, not approximated.
DIFFUSERS_REQUIRED = {
    "center_input_sample": False, "time_embedding_type": "positional", "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1, "downsample_type": "conv", "upsample_type": "conv", "class_embed_type": None,
}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"unsupported diffusers UNet2DModel config: {message}")


def _sample_size(value) -> int:
    sizes = value if isinstance(value, (list, tuple)) else (value, value)
    _require(sizes[0] is not None and sizes[0] == sizes[1], f"sample_size must be a square size, got {value}")
    return int(sizes[0])


def _attention_levels(down_types, up_types) -> list:
    """Levels (0 = full resolution) with attention; the decoder must mirror the encoder."""
    allowed_down, allowed_up = ("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D")
    _require(all(t in allowed_down for t in down_types), f"down_block_types must be in {allowed_down}")
    _require(all(t in allowed_up for t in up_types), f"up_block_types must be in {allowed_up}")
    down = [t.startswith("Attn") for t in down_types]
    up = [t.startswith("Attn") for t in reversed(up_types)]
    _require(down == up, f"attention must sit at the same levels in {down_types} and {up_types}")
    return [level for level, attn in enumerate(down) if attn]


def _mid_attention_norm(c: dict) -> bool:
    """diffusers gives the mid attention a GroupNorm only for additive conditioning, unless told otherwise."""
    groups = c["attn_norm_num_groups"]
    if groups is None:
        return c["resnet_time_scale_shift"] == "default"
    _require(groups == c["norm_num_groups"], "attn_norm_num_groups must be None or equal norm_num_groups")
    return True


def unet_fields_from_diffusers(config: dict) -> dict:
    """Translate a diffusers UNet2DModel config.json (dict) into UNetConfig fields (dict).

    Keys starting with "_" and keys diffusers' UNet2DModel does not take are ignored, as diffusers does.
    num_class_embeds = N becomes num_classes = N - 1: we read the last embedding row as the null class.
    """
    _require(config.get("_class_name", "UNet2DModel") == "UNet2DModel", f"_class_name {config.get('_class_name')}")
    c = {key: config.get(key, default) for key, default in DIFFUSERS_DEFAULTS.items()}
    for key, value in DIFFUSERS_REQUIRED.items():
        _require(c[key] == value, f"{key}={c[key]!r} (only {value!r} is implemented)")
    widths = list(c["block_out_channels"])
    base = widths[0]
    _require(all(w % base == 0 for w in widths), f"block_out_channels {widths} must be multiples of the first")
    _require(c["time_embedding_dim"] in (None, 4 * base), "time_embedding_dim must be 4 * block_out_channels[0]")
    _require(c["act_fn"] in ("silu", "swish"), f"act_fn={c['act_fn']!r} (only silu)")
    _require(c["resnet_time_scale_shift"] in ("default", "scale_shift"), "resnet_time_scale_shift")
    _require(c["out_channels"] in (c["in_channels"], 2 * c["in_channels"]), "out_channels must be in or 2 * in")
    _require(c["norm_num_groups"] is not None, "norm_num_groups=None")
    _require(c["num_class_embeds"] is None or c["num_class_embeds"] >= 2, "num_class_embeds must be >= 2")
    size = _sample_size(c["sample_size"])
    return {
        "in_channels": c["in_channels"], "sample_size": size, "base_channels": base,
        "channel_mult": tuple(w // base for w in widths), "num_res_blocks": c["layers_per_block"],
        "attention_resolutions": tuple(size // 2 ** level
                                       for level in _attention_levels(c["down_block_types"], c["up_block_types"])),
        "num_heads": 1, "head_channels": c["attention_head_dim"], "mid_attention": c["add_attention"],
        "mid_attention_norm": _mid_attention_norm(c), "dropout": c["dropout"], "norm_groups": c["norm_num_groups"],
        "norm_eps": c["norm_eps"],
        "time_conditioning": "scale_shift" if c["resnet_time_scale_shift"] == "scale_shift" else "additive",
        "flip_sin_to_cos": c["flip_sin_to_cos"], "freq_shift": c["freq_shift"],
        "downsample_padding": c["downsample_padding"],
        "num_classes": None if c["num_class_embeds"] is None else c["num_class_embeds"] - 1,
        "learn_sigma": c["out_channels"] == 2 * c["in_channels"],
    }


def rename_legacy_attention_keys(state_dict: dict) -> dict:
    """Old diffusers files name the attention projections query/key/value/proj_attn; map them to the new names."""
    renamed = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")  # leaf is "weight" or "bias"
        path, _, name = prefix.rpartition(".")
        if ".attentions." in key and name in LEGACY_ATTENTION_NAMES:
            key = f"{path}.{LEGACY_ATTENTION_NAMES[name]}.{leaf}"
        renamed[key] = value
    return renamed


def check_state_dict(expected: dict, state_dict: dict, source, shown: int = 5) -> None:
    """Raise ValueError listing missing, unexpected and wrongly shaped keys (first `shown` of each).

    expected maps parameter name -> shape (the model's); state_dict maps name -> tensor (the file's).
    """
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
             for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        lines = [f"{name} ({len(keys)}): {keys[:shown]}{' ...' if len(keys) > shown else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError(f"weights in {source} do not fit the UNet config; " + "; ".join(lines))


def _strip_averaged_model(state_dict: dict) -> dict:
    """An EMA kept as torch.optim.swa_utils.AveragedModel prefixes 'module.' and adds 'n_averaged'."""
    if state_dict and all(k.startswith("module.") or k == "n_averaged" for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items() if k != "n_averaged"}
    return state_dict


def unet_from_checkpoint(file: Path, use_ema: bool, map_location="cpu"):
    """(UNetConfig fields, state dict) from a training checkpoint; the EMA weights when asked and present."""
    checkpoint = read_training_checkpoint(file, map_location=map_location)
    weights = checkpoint["ema"] if use_ema and checkpoint.get("ema") is not None else checkpoint["model"]
    return checkpoint["unet_config"], _strip_averaged_model(weights)


def read_exported(file: Path):
    """(UNetConfig fields, state dict) from a .safetensors written by `save_unet`."""
    safetensors_file(file)
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{file}: no ldm_lite UNet config in the metadata (format {EXPORT_FORMAT!r}); "
                         "for diffusers weights pass the folder holding config.json")
    return json.loads(metadata["unet_config"]), load_file(str(file))


def read_diffusers_folder(folder: Path, map_location="cpu"):
    """(UNetConfig fields, state dict) from a UNet2DModel folder (config.json + weights), or a pipeline's unet/."""
    if not (folder / "config.json").is_file() and (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"
    config = json.loads((folder / "config.json").read_text())
    weight_files = [folder / name for name in DIFFUSERS_WEIGHT_FILES if (folder / name).is_file()]
    if not weight_files:
        raise ValueError(f"{folder}: config.json found but none of {DIFFUSERS_WEIGHT_FILES}")
    file = weight_files[0]  # safetensors first
    state_dict = load_file(str(safetensors_file(file))) if file.suffix == ".safetensors" else \
        torch_load_weights(file, map_location)
    return unet_fields_from_diffusers(config), rename_legacy_attention_keys(state_dict)


def read_unet_weights(path, use_ema: bool = True, map_location="cpu"):
    """(UNetConfig fields, state dict) from any supported source; see `unet.load_unet`."""
    path = Path(path)
    if path.is_dir():
        if (path / "checkpoint.pt").is_file():  # an ldm_lite run dir (its config.json is a training config)
            return unet_from_checkpoint(path / "checkpoint.pt", use_ema, map_location)
        if (path / "config.json").is_file() or (path / "unet" / "config.json").is_file():
            return read_diffusers_folder(path, map_location)
        raise ValueError(f"{path}: a folder must hold checkpoint.pt (ldm_lite run) or config.json (diffusers)")
    if not path.is_file():
        raise ValueError(f"UNet weights not found: {path}")
    if path.suffix == ".safetensors":
        return read_exported(path)
    if path.suffix in (".pt", ".ckpt", ".bin", ".pth"):
        return unet_from_checkpoint(path, use_ema, map_location)
    raise ValueError(f"{path}: unknown weight file type; use .safetensors, .pt, .ckpt or a folder")


def write_unet_weights(path, config_fields: dict, state_dict: dict) -> None:
    """Write a .safetensors with the config JSON in its metadata (tensors made contiguous, as safetensors needs)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save path must end in .safetensors, got {path}")
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={"format": EXPORT_FORMAT, "unet_config": json.dumps(config_fields)})
