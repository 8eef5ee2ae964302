"""Export a run as a diffusers folder: the way back from `ldm_lite.runs.load_model`, which reads what this writes.

    out/model_index.json                           a DDPMPipeline: unet + scheduler (+ vae for a latent run)
    out/unet/config.json                           UNet2DModel config, the inverse of `unet_fields_from_diffusers`
    out/unet/diffusion_pytorch_model.safetensors   the weights: our parameter names already are diffusers'
    out/scheduler/scheduler_config.json            the run's sampling schedule (`LoadedModel.scheduler_config`)
    out/vae/config.json + diffusion_pytorch_model.safetensors    a latent run's AutoencoderKL, diffusers layout
    out/classes.json                               the class names (label i = name i), when the run records them
    out/README.md                                  the lines that sample the folder in diffusers (`readme`)

Class labels need no mapping: our embedding has num_classes + 1 rows with the null class (Ho & Salimans 2022,
arXiv:2207.12598) last, which is diffusers' `num_class_embeds = num_classes + 1`, label num_classes meaning "no
class". diffusers' DDPMPipeline passes no `class_labels`, which UNet2DModel requires of a class-conditional model:
the README's lines call the UNet and the scheduler directly instead. diffusers has no pipeline for an AutoencoderKL latent model without text: its DDPMPipeline ignores vae/
(with a warning) and returns latents; decode them with `AutoencoderKL.from_pretrained(out / "vae")` after
`latents / scaling_factor + shift_factor` (Rombach et al. 2022, arXiv:2112.10752, sec. 4.3.2). `load_model(out)`
reads the VAE back and samples images.
"""
import json
import re
from pathlib import Path

from safetensors.torch import save_file

from ldm_lite.models.vae_loading import original_from_diffusers
from ldm_lite.runs import CLASSES_FILE, load_model
from ldm_lite.schedules import QUADRATIC_SPACING, TIMESTEP_SPACINGS

# The diffusers release this layout was checked against (tests/test_export.py); diffusers reads the field.
DIFFUSERS_VERSION = "0.42.1"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Original (CompVis) attention names of the VAE's middle block -> diffusers' names.
VAE_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


# ----------------------------------------------------------------------------- UNet

def _attention_head_dim(config) -> int | None:
    """diffusers' attention_head_dim: channels per head, the same in every attention block; None = one head.

    Our `num_heads` without `head_channels` fixes the head count instead, which diffusers can express only when
    every attention block (middle one included) then has the same head width.
    """
    if config.head_channels:
        return config.head_channels
    widths = [w for level, w in enumerate(config.level_channels) if config.has_attention(level)]
    widths += [config.level_channels[-1]] if config.mid_attention else []
    if config.num_heads == 1 or not widths:
        return None
    head_widths = sorted({w // config.num_heads for w in widths})
    if len(head_widths) > 1:
        raise ValueError(f"UNet2DModel cannot express num_heads={config.num_heads} over attention widths {widths}: "
                         f"its heads all have one width (here {head_widths}); set head_channels instead")
    return head_widths[0]


def _mid_attention_groups(config) -> int | None:
    """diffusers' attn_norm_num_groups. None gives the middle attention a GroupNorm exactly when the time
    conditioning is additive; a number forces one. No value removes it from an additive model."""
    wanted = config.mid_attention_norm
    if not config.mid_attention or wanted == (config.time_conditioning == "additive"):
        return None
    if wanted:
        return config.norm_groups
    raise ValueError("UNet2DModel cannot express mid_attention_norm=False with additive time conditioning "
                     "(its middle attention then always has a GroupNorm)")


def _number(value: float):
    """An integral float as an int (diffusers types freq_shift as int), others unchanged."""
    return int(value) if float(value).is_integer() else value


def diffusers_unet_config(config) -> dict:
    """A diffusers UNet2DModel config.json (dict) for a `UNetConfig`: the inverse of `unet_fields_from_diffusers`.

    ValueError, one line, for a config UNet2DModel cannot express (see `_attention_head_dim` and
    `_mid_attention_groups`); every other field has a diffusers equivalent.
    """
    attention = [config.has_attention(level) for level in range(len(config.channel_mult))]
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": config.sample_size, "in_channels": config.in_channels, "out_channels": config.out_channels,
        "center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
        "freq_shift": _number(config.freq_shift), "flip_sin_to_cos": config.flip_sin_to_cos,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": list(config.level_channels), "layers_per_block": config.num_res_blocks,
        "mid_block_scale_factor": 1, "downsample_padding": config.downsample_padding, "downsample_type": "conv",
        "upsample_type": "conv", "dropout": config.dropout, "act_fn": "silu",
        "attention_head_dim": _attention_head_dim(config), "norm_num_groups": config.norm_groups,
        "attn_norm_num_groups": _mid_attention_groups(config), "norm_eps": config.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if config.time_conditioning == "scale_shift" else "default",
        "add_attention": config.mid_attention, "class_embed_type": None,
        "num_class_embeds": None if config.num_classes is None else config.num_classes + 1,
    }


# ----------------------------------------------------------------------------- VAE

def _diffusers_vae_key(key: str, levels: int) -> str:
    """One original-layout (CompVis) AutoencoderKL key -> diffusers' name; the inverse of the loader's renaming.
    The decoder's up.i (i = 0 the highest resolution) is diffusers' up_blocks.(levels - 1 - i)."""
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.(block|upsample)\.",
                 lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}."
                           f"{'resnets' if m[2] == 'block' else 'upsamplers.0'}.", key)
    key = re.sub(r"\.mid\.block_([12])\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", key)
    key = re.sub(r"\.mid\.attn_1\.(norm|q|k|v|proj_out)\.",
                 lambda m: f".mid_block.attentions.0.{VAE_ATTENTION_NAMES[m[1]]}.", key)
    return key.replace(".nin_shortcut.", ".conv_shortcut.")


def diffusers_vae_state_dict(vae) -> dict:
    """The VAE's tensors under diffusers' AutoencoderKL names, contiguous float tensors; attention projections as
    the (C, C) Linear weights diffusers holds instead of our (C, C, 1, 1) 1x1 convs."""
    levels = len(vae.config.block_out_channels)
    original = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    renamed = {}
    for key, tensor in original.items():
        new_key = _diffusers_vae_key(key, levels)
        attention_weight = ".attentions.0.to_" in new_key and new_key.endswith(".weight")
        renamed[new_key] = tensor.flatten(1) if attention_weight else tensor
    if set(original_from_diffusers(renamed)) != set(original):  # our loader must read every key back
        raise RuntimeError("VAE key renaming does not invert the loader's (ldm_lite.models.vae_loading)")
    return renamed


def diffusers_vae_config(config, sample_size: int) -> dict:
    """A diffusers AutoencoderKL config.json (dict) for a `VAEConfig`; sample_size: the image size in pixels."""
    levels = len(config.block_out_channels)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(config.block_out_channels), "layers_per_block": config.layers_per_block,
        "act_fn": "silu", "latent_channels": config.latent_channels, "norm_num_groups": config.norm_groups,
        "sample_size": sample_size, "scaling_factor": config.scaling_factor, "shift_factor": config.shift_factor,
        "force_upcast": config.force_upcast, "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_post_quant_conv, "mid_block_add_attention": config.mid_attention,
    }


# ----------------------------------------------------------------------------- the folder

def _write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_weights(state_dict: dict, path: Path) -> None:
    """safetensors with diffusers' metadata; tensors made contiguous (channels_last weights are not)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, str(path), metadata={"format": "pt"})


def _check_out(out: Path) -> None:
    """Refuse a file, or a non-empty folder that is not an earlier export (it would mix in foreign files)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise ValueError(f"output folder {str(out)!r} is not empty and holds no earlier export (model_index.json); "
                         "choose a new or empty folder")


def export_diffusers(run, out, use_ema: bool = True) -> Path:
    """Write the model of `run` to `out` as a diffusers DDPMPipeline folder (module docstring); returns `out`.

    run: anything `ldm_lite.runs.load_model` accepts (a run folder, a training checkpoint, a diffusers folder).
    use_ema: export the EMA weights of a training checkpoint when it has them, else the raw ones.
    ValueError, one line, for a UNet that UNet2DModel cannot express, a schedule diffusers cannot express (DDIM's
    quadratic spacing) or an unusable output path; nothing is written then.
    """
    out = Path(out)
    loaded = load_model(run, use_ema=use_ema)
    unet_config = diffusers_unet_config(loaded.unet.config)   # refuses before anything is written
    scheduler_config = dict(loaded.scheduler_config)
    if "_class_name" not in scheduler_config:
        raise ValueError(f"the schedule of {str(run)!r} names no scheduler class (_class_name)")
    if scheduler_config.get("timestep_spacing") == QUADRATIC_SPACING:
        raise ValueError(f"the schedule of {str(run)!r} uses timestep_spacing={QUADRATIC_SPACING!r} (DDIM's quadratic "
                         f"spacing), which diffusers has no spacing for; use one of {', '.join(TIMESTEP_SPACINGS)}")
    _check_out(out)
    (out / "model_index.json").unlink(missing_ok=True)   # an earlier export is incomplete until rewritten
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "scheduler": ["diffusers", scheduler_config["_class_name"]], "unet": ["diffusers", "UNet2DModel"]}
    _write_json(unet_config, out / "unet" / "config.json")
    _write_weights(loaded.unet.state_dict(), out / "unet" / WEIGHTS_NAME)
    _write_json(scheduler_config, out / "scheduler" / "scheduler_config.json")
    if loaded.vae is not None:
        index["vae"] = ["diffusers", "AutoencoderKL"]
        image_size = loaded.unet.config.sample_size * loaded.vae.downscale
        _write_json(diffusers_vae_config(loaded.vae.config, image_size), out / "vae" / "config.json")
        _write_weights(diffusers_vae_state_dict(loaded.vae), out / "vae" / WEIGHTS_NAME)
    if loaded.class_names is not None and loaded.unet.config.num_classes is not None:
        (out / CLASSES_FILE).write_text(json.dumps(list(loaded.class_names)) + "\n")
    (out / "README.md").write_text(readme(loaded, scheduler_config["_class_name"]))
    _write_json(index, out / "model_index.json")   # last: a folder with it is a complete export
    return out


def readme(loaded, scheduler_class: str) -> str:
    """README.md of an export: how ldm_lite samples it, and the Python lines that sample it in diffusers by
    calling the UNet (with class labels) and the scheduler directly, which DDPMPipeline cannot do for a
    class-conditional model. loaded: the `LoadedModel` exported."""
    config = loaded.unet.config
    channels, size = config.in_channels, config.sample_size
    if config.num_classes is None:
        labels, batch = "labels = None  # unconditional", "4"
    else:
        names = loaded.class_names or [str(i) for i in range(config.num_classes)]
        meaning = ", ".join(f"{i} = {name}" for i, name in enumerate(names))
        labels, batch = (f"labels = torch.arange({config.num_classes})  # {meaning}; {config.num_classes} = no "
                         "class (the null label)", "len(labels)")
    mean_channels, note = ("", "") if config.out_channels == channels else (f"[:, :{channels}]",
                                                                            "  # learned variance dropped")
    decode = "" if loaded.vae is None else (
        "vae = AutoencoderKL.from_pretrained(\"vae\").eval()\n"
        "with torch.no_grad():  # latents -> images (Rombach et al. 2022, sec. 4.3.2)\n"
        "    x = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample\n")
    return f"""# An ldm_lite run exported for diffusers

ldm_lite samples this folder as it samples the run: `python -m sample --ckpt THIS_FOLDER --out samples/`
(add `--class NAME` for a class-conditional model; the names are in classes.json).

diffusers' `DDPMPipeline` loads it, but passes no `class_labels`, which a class-conditional `UNet2DModel`
requires. These lines, run in this folder, sample it with labels by calling the UNet and the scheduler directly:

```python
import torch
from diffusers import AutoencoderKL, {scheduler_class}, UNet2DModel

unet = UNet2DModel.from_pretrained("unet").eval()
scheduler = {scheduler_class}.from_pretrained("scheduler")
{labels}
steps = 50
scheduler.set_timesteps(steps)
noise = torch.randn(({batch}, {channels}, {size}, {size}), generator=torch.Generator().manual_seed(0))
x = noise * scheduler.init_noise_sigma
with torch.no_grad():
    for t in scheduler.timesteps:
        output = unet(scheduler.scale_model_input(x, t), t, class_labels=labels).sample
        x = scheduler.step(output{mean_channels}, t, x).prev_sample{note}
{decode}images = (x.clamp(-1, 1) + 1) / 2  # (B, C, H, W) in [0, 1]
```
"""


__all__ = ["DIFFUSERS_VERSION", "diffusers_unet_config", "diffusers_vae_config", "diffusers_vae_state_dict",
           "export_diffusers"]
