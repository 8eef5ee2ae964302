"""AutoencoderKL, the first stage of latent diffusion (Rombach et al. 2022, arXiv:2112.10752, sec. 3.1 and app. G).

Written from scratch in the original CompVis layout, so an original checkpoint's state dict (minus its
`first_stage_model.` prefix) loads as is: `encoder.down.i.block.j`, `encoder.mid.{block_1,attn_1,block_2}`,
`decoder.up.i` with up.0 the highest resolution, attention `norm,q,k,v,proj_out` as 1x1 convs.

    image (B, 3, H, W) in [-1, 1] --encoder--> moments (B, 2 C_lat, H/f, W/f) --> q(z|x) = N(mean, exp(logvar))
    latent z (B, C_lat, H/f, W/f) --decoder--> image (B, 3, H, W), roughly [-1, 1] (not clamped)

f = 2 ** (levels - 1) = 8 for every released model. Diffusion runs on scaled latents (sec. 4.3.2 and app. D.1;
SD3 adds a shift, Esser et al. 2024, arXiv:2403.03206): z_scaled = (z - shift_factor) * scaling_factor.

Speed: activations and conv weights are kept channels_last (NHWC: oneDNN convolutions run fastest on it and
the attention reshape becomes free); residual adds go in place into fresh conv outputs, SiLU in place when no
gradient is needed (`ops.norm_silu`: fewer large allocations, each of which costs page faults); the nearest x2 +
3x3 conv upsampling runs as one stride-2 transposed conv (`ops.upsample_conv`: same result, 4/9 of the FLOPs).
"""
import dataclasses
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm_lite.models.ops import Downsample, Upsample, norm_silu


@dataclass(frozen=True)
class VAEConfig:
    """Architecture and latent scaling of one AutoencoderKL. `block_out_channels[i]` is the width of level i."""
    variant: str = "sd"
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2           # resnets per encoder level; decoder levels have one more
    latent_channels: int = 4
    norm_groups: int = 32
    mid_attention: bool = True
    use_quant_conv: bool = True         # 1x1 conv on the moments (SD 1/2/XL); SD3 and Flux have none
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    force_upcast: bool = False          # decode float16 weights in float32 (SDXL's fp16 decode overflows to NaN)

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        bad = [c for c in self.block_out_channels if c % self.norm_groups]
        if bad or not self.block_out_channels:
            raise ValueError(f"block_out_channels={self.block_out_channels} must be non-empty multiples of "
                             f"norm_groups={self.norm_groups}")


_FOUR_CHANNELS = dict(latent_channels=4, use_quant_conv=True, use_post_quant_conv=True)
_SIXTEEN_CHANNELS = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
PRESETS = {
    "sd": dict(_FOUR_CHANNELS, scaling_factor=0.18215),                                  # SD 1.x / 2.x
    "sdxl": dict(_FOUR_CHANNELS, scaling_factor=0.13025, force_upcast=True),
    "sd3": dict(_SIXTEEN_CHANNELS, scaling_factor=1.5305, shift_factor=0.0609),
    "flux": dict(_SIXTEEN_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159),
    # Tiny two-level model (downscale 2) for fast end-to-end tests; scaling 1 keeps latents as they come.
    "test": dict(_FOUR_CHANNELS, block_out_channels=(32, 64), layers_per_block=1, scaling_factor=1.0),
}


def vae_preset(variant: str, **overrides) -> VAEConfig:
    """The VAEConfig of a named variant ("sd", "sdxl", "sd3", "flux" or the tiny "test"), with optional overrides."""
    if variant not in PRESETS:
        raise ValueError(f"variant must be one of {sorted(PRESETS)}, got {variant!r}")
    return VAEConfig(**{"variant": variant, **PRESETS[variant], **overrides})


# ----------------------------------------------------------------------------------------------- building blocks

def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_silu(x, self.norm1))
        h = self.conv2(norm_silu(h, self.norm2))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))   # conv output: safe in place


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (scale C^-1/2), q/k/v/proj_out stored as 1x1 convs."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(batch, 1, height * width, channels)  # (B, 1, HW, C)
        q, k, v = (F.linear(h, conv.weight.flatten(1), conv.bias) for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return h.reshape(batch, height, width, channels).permute(0, 3, 1, 2).add_(x)  # NHWC memory, NCHW view


class Level(nn.Module):
    """One resolution of the encoder or decoder: resnet `block`s, then an optional down/up-sampler."""

    def __init__(self, widths: list, groups: int, resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o, groups) for i, o in zip(widths[:-1], widths[1:]))
        if resample is not None:
            self.add_module(resample_name, resample)


class Mid(nn.Module):
    """block_1, single-head attn_1 (optional), block_2 at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else None
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


def _to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


class Encoder(nn.Module):
    """(B, C_in, H, W) -> moments (B, 2 C_lat, H/f, W/f): conv_in, levels with downsampling, mid, norm, conv_out."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = c.block_out_channels
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            level_widths = [widths[max(i - 1, 0)]] + [width] * c.layers_per_block
            self.down.append(Level(level_widths, c.norm_groups, None if last else Downsample(width), "downsample"))
        self.mid = Mid(widths[-1], c.norm_groups, c.mid_attention)
        self.norm_out = _norm(widths[-1], c.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(_to_channels_last(x))
        for level in self.down:
            for block in level.block:
                x = block(x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        x = self.mid(x)
        return self.conv_out(norm_silu(x, self.norm_out))


class Decoder(nn.Module):
    """(B, C_lat, h, w) -> (B, C_out, f h, f w): conv_in, mid, levels with upsampling (up.0 = full size), conv_out."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = c.block_out_channels
        self.conv_in = nn.Conv2d(c.latent_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1], c.norm_groups, c.mid_attention)
        self.up = nn.ModuleList()
        for i, width in enumerate(widths):  # up[i] works at the resolution of encoder level i
            level_widths = [widths[min(i + 1, len(widths) - 1)]] + [width] * (c.layers_per_block + 1)
            self.up.append(Level(level_widths, c.norm_groups, Upsample(width) if i > 0 else None, "upsample"))
        self.norm_out = _norm(widths[0], c.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(_to_channels_last(z)))
        for level in reversed(self.up):
            for block in level.block:
                x = block(x)
            if hasattr(level, "upsample"):
                x = level.upsample(x)
        return self.conv_out(norm_silu(x, self.norm_out))


# ----------------------------------------------------------------------------------------------- posterior

class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))) (Kingma & Welling 2014, arXiv:1312.6114), logvar clamped to [-30, 20].

    moments: (B, 2 C, h, w), mean first then logvar along the channels. Every attribute is (B, C, h, w).
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps with eps = torch.randn(mean.shape, generator=generator) (the reparameterisation)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over (C, h, w): (B,)."""
        return 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


# ----------------------------------------------------------------------------------------------- tiling

def tile_starts(size: int, tile: int, overlap: int) -> list:
    """Evenly spread starts of tiles of length `tile` that cover [0, size), neighbours overlapping >= `overlap`."""
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _ramp(length: int, overlap: int, rise: bool, fall: bool) -> torch.Tensor:
    """(length,) blending weights: 1, with linear ramps strictly inside (0, 1) over `overlap` at shared edges."""
    weights = torch.ones(length)
    ramp = torch.arange(1, overlap + 1) / (overlap + 1)
    if rise:
        weights[:overlap] = ramp
    if fall:
        weights[length - overlap:] = ramp.flip(0)
    return weights


def tiled_apply(fn, x: torch.Tensor, tile: int, overlap: int, in_scale: int, out_scale: int) -> torch.Tensor:
    """fn applied to overlapping tiles of x, outputs blended with linear ramps and normalised by the weight sum.

    Sizes are counted on the latent grid: a tile is `tile` latent pixels, i.e. `in_scale * tile` pixels of x
    and `out_scale * tile` of fn's output. x: (B, C, in_scale h, in_scale w) -> (B, C', out_scale h, out_scale w).
    """
    height, width = x.shape[2] // in_scale, x.shape[3] // in_scale
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    out = weight_sum = None
    for top in rows:
        for left in cols:
            th, tw = min(tile, height), min(tile, width)
            y = fn(x[:, :, in_scale * top:in_scale * (top + th), in_scale * left:in_scale * (left + tw)])
            if out is None:
                out = y.new_zeros(y.shape[0], y.shape[1], out_scale * height, out_scale * width)
                weight_sum = torch.zeros(out_scale * height, out_scale * width, device=y.device)
            o = out_scale * overlap
            weights = torch.outer(_ramp(y.shape[2], o, top > 0, top + th < height),
                                  _ramp(y.shape[3], o, left > 0, left + tw < width)).to(y.device)
            region = (slice(out_scale * top, out_scale * (top + th)), slice(out_scale * left, out_scale * (left + tw)))
            out[(slice(None), slice(None)) + region] += y * weights.to(y.dtype)
            weight_sum[region] += weights
    return out / weight_sum.to(out.dtype)


# ----------------------------------------------------------------------------------------------- the model

class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder of latent diffusion. Images are (B, 3, H, W) floats in [-1, 1], H and W
    multiples of `downscale`; latents are (B, latent_channels, H / downscale, W / downscale).

    4-D weights are stored channels_last (`state_dict()` tensors are then not contiguous: `save_vae_original`
    handles that; call `.contiguous()` before writing them with safetensors yourself).

    `tile_size` (pixels, a multiple of `downscale`) in encode/decode/to_latents/from_latents processes larger
    images tile by tile, blending `tile_overlap` pixels (default: a quarter tile); memory then stays that of
    one tile. Each tile is
    normalised and attended on its own, so the result differs slightly from the untiled one.
    """

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(config.latent_channels, config.latent_channels, 1)
                                if config.use_post_quant_conv else None)
        self.to(memory_format=torch.channels_last)  # conv weights in the activations' layout: no per-call copy

    variant = property(lambda self: self.config.variant)
    scaling_factor = property(lambda self: self.config.scaling_factor)
    shift_factor = property(lambda self: self.config.shift_factor)
    latent_channels = property(lambda self: self.config.latent_channels)
    downscale = property(lambda self: 2 ** (len(self.config.block_out_channels) - 1))

    def _check(self, x: torch.Tensor, name: str, channels: int, multiple: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(f"{name} must be (B, {channels}, H, W) with H and W multiples of {multiple}, "
                             f"got {tuple(x.shape)}")

    def _tiling(self, tile_size: int | None, tile_overlap: int | None) -> tuple:
        """(tile, overlap) on the latent grid; the overlap defaults to a quarter of the tile."""
        f = self.downscale
        if tile_size is None:
            return None, 0
        if tile_overlap is None:
            tile_overlap = tile_size // 4 // f * f
        if tile_size % f or tile_overlap % f or not 0 <= tile_overlap < tile_size:
            raise ValueError(f"tile_size={tile_size} and tile_overlap={tile_overlap} must be multiples of {f} "
                             f"with 0 <= tile_overlap < tile_size")
        return tile_size // f, tile_overlap // f

    def _moments(self, images: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(images.to(self.encoder.conv_in.weight.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments.contiguous()

    def encode(self, images: torch.Tensor, tile_size: int | None = None,
               tile_overlap: int | None = None) -> DiagonalGaussian:
        """images (B, 3, H, W) in [-1, 1] -> posterior q(z | x) over (B, C_lat, H / f, W / f)."""
        self._check(images, "images", self.config.in_channels, self.downscale)
        tile, overlap = self._tiling(tile_size, tile_overlap)
        if tile is None:
            return DiagonalGaussian(self._moments(images))
        return DiagonalGaussian(tiled_apply(self._moments, images, tile, overlap, self.downscale, 1))

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.config.force_upcast and self.decoder.conv_in.weight.dtype == torch.float16:
            return self._decode_float32(latents)
        z = latents.to(self.decoder.conv_in.weight.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).contiguous()

    def _decode_float32(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode with float32 copies of float16 weights, leaving the module as it is (force_upcast)."""
        params = {name: p.float() for name, p in self.named_parameters() if not name.startswith("encoder.")}
        z = latents.float()
        with torch.autocast(z.device.type, enabled=False):
            if self.post_quant_conv is not None:
                z = F.conv2d(z, params["post_quant_conv.weight"], params["post_quant_conv.bias"])
            decoder_params = {name[len("decoder."):]: p for name, p in params.items() if name.startswith("decoder.")}
            return torch.func.functional_call(self.decoder, decoder_params, (z,)).contiguous()

    def decode(self, latents: torch.Tensor, tile_size: int | None = None,
               tile_overlap: int | None = None) -> torch.Tensor:
        """Unscaled latents (B, C_lat, h, w) -> images (B, 3, f h, f w), roughly [-1, 1], not clamped.

        Float32 when force_upcast applies to float16 weights, else the weights' dtype.
        """
        self._check(latents, "latents", self.config.latent_channels, 1)
        tile, overlap = self._tiling(tile_size, tile_overlap)
        if tile is None:
            return self._decode(latents)
        return tiled_apply(self._decode, latents, tile, overlap, 1, self.downscale)

    def to_latents(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
                   tile_size: int | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> diffusion latents (z - shift_factor) * scaling_factor, z the posterior
        mode (or a sample when `sample`): (B, C_lat, H / f, W / f)."""
        posterior = self.encode(images, tile_size)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.shift_factor) * self.scaling_factor

    def from_latents(self, latents: torch.Tensor, tile_size: int | None = None) -> torch.Tensor:
        """Diffusion latents (B, C_lat, h, w) -> images (B, 3, f h, f w), roughly [-1, 1]; inverts `to_latents`."""
        return self.decode(latents / self.scaling_factor + self.shift_factor, tile_size)

    def forward(self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """Reconstruction (B, 3, H, W) and the posterior, as in training (a posterior sample is decoded)."""
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def identity(self) -> str:
        """Short id, e.g. "sd-1a2b3c4d5e6f", that changes with the config (scaling included) or any weight byte."""
        digest = hashlib.sha256(repr(dataclasses.astuple(self.config)).encode())
        for name, tensor in self.state_dict().items():
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy())  # logical (NCHW) order
        return f"{self.variant}-{digest.hexdigest()[:12]}"
