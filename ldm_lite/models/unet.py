"""DDPM / ADM-style UNet, written from scratch for training speed on CPU.

Architecture of Ho et al. 2020 (DDPM, arXiv:2006.11239, appendix B) with the options of Dhariwal & Nichol
2021 (ADM, arXiv:2105.05233, section 3): residual blocks with GroupNorm + SiLU, sinusoidal time embedding
(Vaswani et al. 2017 section 3.5) fed to every block, self-attention at chosen resolutions, optional
scale-shift ("adaptive group norm", ADM eq. in section 3) time conditioning, optional class conditioning
(with a null class for classifier-free guidance, Ho & Salimans 2022) and optional learned variance output
(Nichol & Dhariwal 2021, arXiv:2102.09672, section 3.1: 2C output channels).

The module tree uses the parameter names of diffusers' `UNet2DModel`, so a diffusers state dict loads
with only a config translation (see `unet_loading.py`). Every image-shaped tensor is (B, C, H, W).

Speed (CPU, measured against diffusers, see bench/train_throughput.py and bench/sampling.py): nearest-upsample
+ 3x3 conv runs as one stride-2 transposed conv (`ops.upsample_conv`: 2.25x fewer FLOPs, same output); SiLU
runs in place where autograd does not need its input (`ops.inplace_silu`); q, k, v come from one 1x1 conv, and a
single head's output projection is folded into v's (see `AttentionBlock`); low-precision attention uses explicit
matmuls where the fused CPU kernel is slower (see `attention`); float32 activations are channels_last (faster
oneDNN convs); bf16 / fp16 ones are NCHW when autograd is on, and without autograd channels_last only at
resolutions of 32x32 and up (there bf16 convs are 15-30% faster; below, PyTorch's channels_last GroupNorm is
5-35x slower); dropout draws its mask from 16-bit random words instead of per-element Bernoulli draws.

h-space (Kwon et al. 2023, arXiv:2210.10960): set `model.mid_block_hook = fn`; during each forward pass
`fn(h)` receives the middle-block output h, shape (B, C_mid, H / 2^(L-1), W / 2^(L-1)) with C_mid =
base_channels * channel_mult[-1], and its return value replaces h. Capture h by storing it and returning it
unchanged; edit it by returning `h + scale * direction`. `None` (the default) costs nothing.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm_lite.models.ops import Downsample, Upsample, inplace_silu, norm_silu
from ldm_lite.models.unet_config import UNetConfig, unet_config_from_dict, unet_preset  # noqa: F401 (re-exported)
from ldm_lite.models.unet_loading import check_state_dict, read_unet_weights, write_unet_weights


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) float32 (DDPM's `get_timestep_embedding`, Vaswani et al. 3.5).

    Frequencies max_period^(-i / (dim/2 - freq_shift)) for i < dim/2; output [sin, cos], or [cos, sin]
    when flip_sin_to_cos; an odd dim gets a zero last column. Timesteps may be fractional.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * (-math.log(max_period))
    freqs = torch.exp(exponent / (half - freq_shift))
    angles = timesteps.float()[:, None] * freqs[None, :]
    parts = (torch.cos(angles), torch.sin(angles)) if flip_sin_to_cos else (torch.sin(angles), torch.cos(angles))
    return F.pad(torch.cat(parts, dim=1), (0, dim % 2))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last if x is stored that way, else the default NCHW layout."""
    return torch.channels_last if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format


def add_into(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """fresh + other, written into `fresh` (saves an allocation) when the result keeps fresh's dtype.

    Only for a `fresh` that nothing saved for backward, e.g. a conv or linear output.
    """
    return fresh.add_(other) if torch.promote_types(fresh.dtype, other.dtype) == fresh.dtype else fresh + other


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout (Srivastava et al. 2014): zero each element with probability p, scale by 1 / (1 - p).

    The keep mask compares 16-bit random words with a threshold (p is rounded to a multiple of 2^-16 and the
    scale uses the rounded value, so E[output] = x exactly): one 64-bit draw serves four elements, 1.5-2.5x
    cheaper on CPU than F.dropout's per-element Bernoulli draws.
    """
    if not training or p == 0.0:
        return x
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, 2 ** 63 - 1)
    dropped = round(p * 65536)  # words below -32768 + dropped are dropped
    keep = words.view(torch.int16)[:x.numel()].view(x.shape) >= dropped - 32768
    return (x * keep).mul_(65536 / (65536 - dropped))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q^T k * scale) averages of v (Vaswani et al. 2017 eq. 1), channel-major: q, k, v and the result
    are (B, heads, d, N) for N positions; scale defaults to 1 / sqrt(d).

    float32 and float64 go to F.scaled_dot_product_attention. bf16 / fp16 use the explicit form (two batched
    matmuls and a softmax) when autograd is on, where on CPU the fused kernel's bf16 backward is 1.6-5x slower
    at N <= 1024, and without autograd up to N = 256, where it is 1.3x faster than the fused kernel.
    """
    scale = q.shape[-2] ** -0.5 if scale is None else scale
    if q.dtype in (torch.float32, torch.float64) or (not torch.is_grad_enabled() and q.shape[-1] > 256):
        q, k, v = (t.transpose(-1, -2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(-1, -2)
    # q is scaled before the product so fp16 scores cannot overflow where the scaled ones would not
    scores = torch.matmul((q if scale == 1.0 else q * scale).transpose(-1, -2), k)  # (B, heads, N_q, N_k)
    return torch.matmul(v, scores.softmax(dim=-1).transpose(-1, -2))


class TimestepMLP(nn.Module):
    """Sinusoid (B, base) -> Linear -> SiLU -> Linear -> (B, 4 * base) (DDPM's `temb` dense layers)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add (or scale-shift by) the time embedding, GroupNorm-SiLU-dropout-conv, + skip.

    Additive (DDPM): h = conv1(x) + W emb, then norm2(h). Scale-shift (ADM): norm2(h) * (1 + s) + b,
    with (s, b) = W emb. A 1x1 conv matches channels on the skip path when in != out.
    """

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig):
        super().__init__()
        self.scale_shift = cfg.time_conditioning == "scale_shift"
        self.norm1 = nn.GroupNorm(cfg.norm_groups, in_ch, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(cfg.time_embed_dim, out_ch * (2 if self.scale_shift else 1))
        self.norm2 = nn.GroupNorm(cfg.norm_groups, out_ch, eps=cfg.norm_eps)
        self.dropout_p = cfg.dropout
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, in_ch, H, W), emb (B, time_embed_dim) already passed through SiLU -> (B, out_ch, H, W)."""
        h = self.conv1(norm_silu(x, self.norm1))
        t = self.time_emb_proj(emb)[:, :, None, None]  # (B, out_ch or 2 out_ch, 1, 1)
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            norm2 = self.norm2
            h = F.group_norm(h, norm2.num_groups, norm2.weight, norm2.bias, norm2.eps)
            h = inplace_silu(torch.addcmul(shift, h, 1 + scale))
        else:
            h = norm_silu(add_into(h, t), self.norm2)
        h = self.conv2(dropout(h, self.dropout_p, self.training))
        return add_into(h, x if self.conv_shortcut is None else self.conv_shortcut(x))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with GroupNorm before and a residual after.

    Same maths as DDPM's `nin` q/k/v projections and diffusers' `Attention` with residual_connection;
    `to_out` is a list of one Linear so parameter names match diffusers (`to_out.0`).

    Computed as one 1x1 convolution for q, k and v (in the input's memory layout, so no transpose copies),
    with 1 / sqrt(d) folded into q's weights. With a single head the output projection is folded into v's:
    softmax rows sum to one, so W_o (V P^T) + b_o = ((W_o W_v) h + W_o b_v) P^T + b_o (same result up to
    rounding). That trades a C x C matmul per position (B * H * W of them) for one C x C x C weight product
    per call: a gain whenever B * H * W > C, as at DDPM's 16x16 attention (B * 256 positions, C = 256).
    """

    def __init__(self, channels: int, heads: int, cfg: UNetConfig, norm: bool = True):
        super().__init__()
        self.heads = heads
        self.group_norm = nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps) if norm else None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (3C, C) weight and (3C,) bias of q (scaled by 1 / sqrt(d)), k and v (times W_o if one head)."""
        scale = (self.to_q.weight.shape[0] // self.heads) ** -0.5
        value_weight, value_bias = self.to_v.weight, self.to_v.bias
        if self.heads == 1:
            out_weight = self.to_out[0].weight
            value_weight, value_bias = out_weight @ value_weight, out_weight @ value_bias
        return (torch.cat([self.to_q.weight * scale, self.to_k.weight, value_weight]),
                torch.cat([self.to_q.bias * scale, self.to_k.bias, value_bias]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W), in x's memory format."""
        B, C, H, W = x.shape
        h = x if self.group_norm is None else self.group_norm(x)
        weight, bias = self.projection()
        qkv = F.conv2d(h, weight[:, :, None, None], bias)  # (B, 3C, H, W), h's memory layout
        q, k, v = qkv.view(B, 3, self.heads, C // self.heads, H * W).unbind(1)  # each (B, heads, d, HW)
        h = attention(q, k, v, scale=1.0).reshape(B, C, H, W)
        out = self.to_out[0]
        if self.heads == 1:  # W_o is inside v: only its bias is left
            bias = out.bias.to(h.dtype)[:, None, None]
            h = h + bias if torch.is_grad_enabled() else h.add_(bias)  # the fused kernel saves h for backward
        else:
            h = F.conv2d(h, out.weight[:, :, None, None], out.bias)
        return add_into(h.contiguous(memory_format=_memory_format(x)), x)


class DownBlock(nn.Module):
    """One resolution level of the encoder: residual blocks (+ attention), then an optional downsample."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, attention: bool, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(in_ch if j == 0 else out_ch, out_ch, cfg)
                                     for j in range(cfg.num_res_blocks))
        self.attentions = nn.ModuleList(AttentionBlock(out_ch, cfg.heads(out_ch), cfg)
                                        for _ in range(cfg.num_res_blocks)) if attention else None
        # A ModuleList of one, so parameter names match diffusers (`downsamplers.0.conv`).
        self.downsamplers = nn.ModuleList([Downsample(out_ch, cfg.downsample_padding)]) if downsample else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor, skips: list,
                next_format: torch.memory_format) -> torch.Tensor:
        """Runs the level and appends every intermediate output to `skips` for the decoder; the downsampled
        output is stored in `next_format`, the next level's memory layout."""
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions is not None:
                h = self.attentions[j](h)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h).contiguous(memory_format=next_format)
            skips.append(h)
        return h


class UpBlock(nn.Module):
    """One resolution level of the decoder: num_res_blocks + 1 residual blocks, each fed the current
    features concatenated with one encoder skip (popped last-in first-out), then an optional upsample."""

    def __init__(self, in_ch: int, skip_chs: list, out_ch: int, cfg: UNetConfig, attention: bool, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock((in_ch if j == 0 else out_ch) + skip_ch, out_ch, cfg)
                                     for j, skip_ch in enumerate(skip_chs))
        self.attentions = nn.ModuleList(AttentionBlock(out_ch, cfg.heads(out_ch), cfg)
                                        for _ in skip_chs) if attention else None
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor, skips: list,
                next_format: torch.memory_format) -> torch.Tensor:
        """Runs the level, consuming its skips; the upsampled output is in `next_format` (next level's layout)."""
        for j, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
            if self.attentions is not None:
                h = self.attentions[j](h)
        if self.upsamplers is not None:
            # Change layout before upsampling: the input is a quarter of the output's size.
            h = self.upsamplers[0](h.contiguous(memory_format=next_format))
        return h


class MidBlock(nn.Module):
    """ResBlock, self-attention, ResBlock at the lowest resolution; its output is the h-space."""

    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(ch, ch, cfg), ResBlock(ch, ch, cfg)])
        self.attentions = nn.ModuleList([AttentionBlock(ch, cfg.heads(ch), cfg, norm=cfg.mid_attention_norm)]
                                        ) if cfg.mid_attention else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, emb)
        if self.attentions is not None:
            h = self.attentions[0](h)
        return self.resnets[1](h, emb)


class UNet(nn.Module):
    """Noise-prediction UNet: (x_t, t[, y]) -> eps (or [eps, variance interpolation] when learn_sigma).

    forward(x, timesteps, class_labels=None):
      x (B, in_channels, H, W) float, any range (x_t is roughly unit variance); H, W divisible by
      2^(len(channel_mult) - 1). timesteps: (B,) long or float, or a scalar broadcast to the batch.
      class_labels: (B,) long in [0, num_classes], where index num_classes is the null class (classifier-free
      guidance); None on a class-conditional model means all null. Returns (B, out_channels, H, W) in the
      weights' dtype (contiguous NCHW), out_channels = 2 * in_channels when cfg.learn_sigma else in_channels.
      A model cast with `.to(torch.bfloat16)` takes a float32 x and runs wholly in bf16 (as fast as autocast
      on this project's CPU; half the weight memory); autocast keeps float32 weights (for training).

    h-space: `model.mid_block_hook = fn` makes forward call `h = fn(h)` on the middle-block output
    (B, C_mid, h, w); fn may record h or return an edited copy (h + scale * direction). Default None.

    Memory format: `model.channels_last` None (default) picks the fastest layout on CPU per resolution level
    (see `activation_format`); True / False force channels_last / NCHW everywhere. Outputs depend on it only
    through rounding (1e-5 in float32; bf16 convolutions may round differently per layout).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        self.mid_block_hook = None
        self.channels_last = None
        widths = cfg.level_channels
        levels = len(widths)
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepMLP(cfg.base_channels, cfg.time_embed_dim)
        # Row num_classes is the null label (Ho & Salimans 2022); diffusers calls this num_class_embeds.
        self.class_embedding = (nn.Embedding(cfg.num_classes + 1, cfg.time_embed_dim)
                                if cfg.num_classes is not None else None)
        skip_chs = [widths[0]]
        self.down_blocks = nn.ModuleList()
        for level, width in enumerate(widths):
            in_ch = widths[max(level - 1, 0)]
            last = level == levels - 1
            self.down_blocks.append(DownBlock(in_ch, width, cfg, cfg.has_attention(level), downsample=not last))
            skip_chs += [width] * (cfg.num_res_blocks + (0 if last else 1))
        self.mid_block = MidBlock(widths[-1], cfg)
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            in_ch = widths[min(level + 1, levels - 1)]
            level_skips = [skip_chs.pop() for _ in range(cfg.num_res_blocks + 1)]
            self.up_blocks.append(UpBlock(in_ch, level_skips, widths[level], cfg, cfg.has_attention(level),
                                          upsample=level > 0))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, widths[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def activation_format(self, x: torch.Tensor, pixels: int) -> torch.memory_format:
        """Memory layout of the activations at a level with `pixels` = H * W, for a forward on input x.

        float32: channels_last. bf16 / fp16 (autocast or cast weights): NCHW when autograd is on (faster for
        training, measured); without autograd channels_last from 32x32 up (faster bf16 convs), NCHW below
        (channels_last GroupNorm is slow there).
        """
        if self.channels_last is not None:
            return torch.channels_last if self.channels_last else torch.contiguous_format
        low_precision = (torch.is_autocast_enabled(x.device.type)
                         or self.conv_in.weight.dtype in (torch.bfloat16, torch.float16))
        if low_precision and (torch.is_grad_enabled() or pixels < 1024):
            return torch.contiguous_format
        return torch.channels_last

    def embed(self, timesteps, class_labels, batch: int, device) -> torch.Tensor:
        """SiLU(time MLP(sinusoid(t)) + class embedding(y)) -> (B, time_embed_dim), shared by all blocks."""
        cfg = self.config
        t = torch.as_tensor(timesteps, device=device)
        t = t.expand(batch) if t.ndim == 0 else t
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or shape ({batch},), got {tuple(t.shape)}")
        sinusoid = timestep_embedding(t, cfg.base_channels, cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(sinusoid.to(self.conv_in.weight.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), cfg.num_classes, dtype=torch.long, device=device)
            emb = emb + self.class_embedding(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels given but the model is unconditional (config.num_classes is None)")
        return F.silu(emb)

    def forward(self, x: torch.Tensor, timesteps, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must be (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        emb = self.embed(timesteps, class_labels, x.shape[0], x.device)
        x = x.to(self.conv_in.weight.dtype)  # a float32 x_t runs through a model cast to bf16 / fp16
        levels = len(self.down_blocks)
        formats = [self.activation_format(x, x.shape[2] * x.shape[3] >> 2 * level) for level in range(levels)]
        h = self.conv_in(x.contiguous(memory_format=formats[0]))
        skips = [h]
        for level, block in enumerate(self.down_blocks):
            h = block(h, emb, skips, formats[min(level + 1, levels - 1)])
        h = self.mid_block(h, emb)
        if self.mid_block_hook is not None:
            h = self.mid_block_hook(h)
        for level, block in zip(reversed(range(levels)), self.up_blocks):
            h = block(h, emb, skips, formats[max(level - 1, 0)])
        return self.conv_out(norm_silu(h, self.conv_norm_out)).contiguous()


def save_unet(model: UNet, path) -> None:
    """Write the weights to `path` (.safetensors) with the UNetConfig as JSON in the file's metadata."""
    write_unet_weights(path, dataclasses.asdict(model.config), model.state_dict())


def load_unet(path, use_ema: bool = True, map_location="cpu") -> UNet:
    """Build a UNet and load its weights; every parameter must be present with the right shape.

    path: a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors or .bin, or a
    pipeline folder with unet/), our .safetensors from `save_unet`, a training checkpoint (.pt / .ckpt,
    format "ldm_lite.train.v1"; its EMA weights when use_ema and present) or a run dir holding checkpoint.pt.
    Raises ValueError naming missing, unexpected and wrongly shaped keys rather than loading partially.
    The model is returned in eval mode (no dropout); call .train() to keep training it.
    """
    fields, state_dict = read_unet_weights(path, use_ema=use_ema, map_location=map_location)
    model = UNet(unet_config_from_dict(fields))
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, state_dict, source=path)
    model.load_state_dict(state_dict)
    return model.eval()
