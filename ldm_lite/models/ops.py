"""Operations the UNet (`unet.py`) and the autoencoder (`vae.py`) share: in-place SiLU, GroupNorm + SiLU, the
stride-2 downsampling conv and the nearest-neighbour 2x upsampling conv.

Every image-shaped tensor is (B, C, H, W). Each op returns its result in its input's dtype and memory layout
(NCHW or channels_last), so the callers' layout choices (see `UNet.activation_format` and vae.py's module
docstring) carry through unchanged.
"""
import torch
import torch.nn.functional as F
from torch import nn


def inplace_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU(x) = x * sigmoid(x) (Elfwing et al. 2018, arXiv:1702.03118), written into x when autograd does not
    need x, else out of place. Any shape; same dtype, shape and layout as x.

    In place saves one activation-sized allocation per call (on CPU also the page faults of fresh memory).
    SiLU's backward reads its input, so a tensor that requires grad is never overwritten; that test also covers
    sampling (no_grad / inference_mode outputs never require grad) and frozen weights with autograd on.
    Only for an x nothing else reads afterwards, e.g. a fresh GroupNorm output.
    """
    return F.silu(x, inplace=not x.requires_grad)


def norm_silu(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """SiLU(GroupNorm(x)) (Wu & He 2018, arXiv:1803.08494) with `norm`'s parameters: (B, C, H, W) -> same.

    The SiLU runs in place on the fresh normalised tensor when autograd allows (see `inplace_silu`).
    """
    return inplace_silu(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps))


class Downsample(nn.Module):
    """Stride-2 3x3 conv, (B, C, H, W) -> (B, C, H / 2, W / 2) for even H, W.

    padding 0: pad right and bottom by one (F.pad (0, 1, 0, 1)), then convolve without padding: the layout of
    DDPM's TensorFlow code and of the CompVis autoencoder, whose weights expect it. padding 1: symmetric
    padding inside the conv (ADM). The parameters are `conv.weight`, `conv.bias` (diffusers / CompVis names).
    """

    def __init__(self, channels: int, padding: int = 0):
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"padding must be 0 or 1, got {padding}")
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


# Nearest 2x upsampling then a 3x3 conv (padding 1) equals a stride-2 transposed conv with a 4x4 kernel: output
# row 2i reads source rows (i - 1, i, i) through taps (w0, w1, w2), row 2i + 1 reads (i, i, i + 1), so along
# each axis the transposed kernel's taps are (w2, w1 + w2, w0 + w1, w0). Row t of _UPSAMPLE_TAPS says which 3x3
# taps sum into transposed tap t. 16 instead of 36 multiply-adds per input pixel and channel pair, and no
# upsampled copy of the input.
_UPSAMPLE_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def upsample_kernel(weight: torch.Tensor) -> torch.Tensor:
    """3x3 conv weight (C_out, C_in, 3, 3) -> conv_transpose2d weight (C_in, C_out, 4, 4), NCHW-contiguous.

    Summed in float32 at least (float64 stays float64), then cast back to weight's dtype, so a bf16 / fp16 kernel
    is rounded once (an einsum in bf16 rounds its intermediate product too: 8% of entries came out off by an ulp
    or more). Differentiable, so gradients reach the 3x3 weight.
    """
    wide = weight.to(torch.promote_types(weight.dtype, torch.float32))
    taps = _UPSAMPLE_TAPS.to(device=weight.device, dtype=wide.dtype)
    return torch.einsum("uk,oikl,vl->iouv", taps, wide, taps).to(weight.dtype)


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1) as one stride-2 transposed
    conv (see `upsample_kernel`; Dumoulin & Visin 2016, arXiv:1603.07285, sec. 4).

    x (B, C_in, H, W); weight (C_out, C_in, 3, 3); bias (C_out,) or None -> (B, C_out, 2H, 2W) in x's dtype and
    memory layout (the kernel is a fresh NCHW tensor, so PyTorch follows x's layout). Chosen over the sub-pixel
    form (four 2x2 phase convs, Shi et al. 2016, arXiv:1609.05158) by CPU timings at both models' shapes, float32
    and bf16 (a shared 2-core machine, so +-10%). Speed-up over it at the UNet's shapes (batch 64, 256 channels,
    4-16 pixels): 1.0-1.7x without autograd, 0.85-1.45x with it (bf16 NCHW); at the SD decoder's (batch 1,
    512 / 256 channels, 32-128 pixels): 0.95-1.0x at 32 pixels, about 1.1x above.
    """
    kernel = upsample_kernel(weight).to(x.dtype)
    return F.conv_transpose2d(x, kernel, None if bias is None else bias.to(x.dtype), stride=2, padding=1)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv, computed by `upsample_conv`: (B, C, H, W) -> (B, C, 2H, 2W).

    The parameters are `conv.weight`, `conv.bias` (diffusers / CompVis names) of the 3x3 conv.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv(x, self.conv.weight, self.conv.bias)
