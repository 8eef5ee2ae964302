"""The architecture of a `UNet` (`UNetConfig`) and its named presets, apart from the network so that configs,
resume checks and exports can read one without building layers."""
import dataclasses
from dataclasses import dataclass

TIME_CONDITIONINGS = ("additive", "scale_shift")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a `UNet`. All sizes are in channels or pixels.

    channel_mult[i] * base_channels is the width of resolution level i (level 0 = full resolution);
    attention_resolutions lists the feature-map sizes (in pixels, for inputs of `sample_size`) that get
    self-attention after each residual block. Heads: `head_channels` channels per head when set, else
    `num_heads` heads. `downsample_padding` 0 pads right/bottom by one then convolves with stride 2 (DDPM's
    TensorFlow layout); 1 pads symmetrically (ADM). `flip_sin_to_cos` and `freq_shift` select the
    sinusoid layout: DDPM uses (False, 1), ADM (True, 0). `mid_attention_norm` False drops the GroupNorm
    of the middle attention (diffusers does so for scale-shift models).
    """
    in_channels: int = 3
    sample_size: int = 32
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    head_channels: int | None = None
    mid_attention: bool = True
    mid_attention_norm: bool = True
    dropout: float = 0.0
    norm_groups: int = 32
    norm_eps: float = 1e-6
    time_conditioning: str = "additive"
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    downsample_padding: int = 0
    num_classes: int | None = None
    learn_sigma: bool = False

    def __post_init__(self):
        # Frozen dataclass: coerce lists (from JSON/TOML) to tuples so configs compare and hash by value.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        if self.time_conditioning not in TIME_CONDITIONINGS:
            raise ValueError(f"time_conditioning must be one of {TIME_CONDITIONINGS}, got {self.time_conditioning!r}")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding must be 0 or 1, got {self.downsample_padding}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for width in self.level_channels:
            if width % self.norm_groups:
                raise ValueError(f"norm_groups={self.norm_groups} must divide every level width {self.level_channels}")
            if width % (self.head_channels or self.num_heads):
                raise ValueError(f"head_channels / num_heads must divide every level width {self.level_channels}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.base_channels

    def heads(self, channels: int) -> int:
        return channels // self.head_channels if self.head_channels else self.num_heads

    def has_attention(self, level: int) -> bool:
        return self.sample_size // 2 ** level in self.attention_resolutions


PRESETS = {
    # Ho et al. 2020, CIFAR-10: 35,746,307 parameters in the diffusers layout (google/ddpm-cifar10-32).
    "ddpm_cifar10": UNetConfig(dropout=0.1),
    # Same shape at half width: about 9M parameters, trains in a CPU afternoon at 32x32.
    "small": UNetConfig(base_channels=64, dropout=0.1),
    # Tests and demo: 1.1M parameters; attention at 8x8 (level 1 at 16x16, level 2 at 32x32).
    "tiny": UNetConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
                       head_channels=32, norm_groups=8),
}


def unet_preset(name: str, **overrides) -> UNetConfig:
    """The named preset ("ddpm_cifar10", "small", "tiny") with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; choose from {sorted(PRESETS)}")
    return unet_config_from_dict({**dataclasses.asdict(PRESETS[name]), **overrides})


def unet_config_from_dict(d: dict) -> UNetConfig:
    """Rebuild a UNetConfig from `dataclasses.asdict(config)` (or JSON of it); unknown keys raise ValueError."""
    names = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown UNetConfig fields {unknown}; allowed: {sorted(names)}")
    return UNetConfig(**d)
