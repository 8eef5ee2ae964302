"""Classifier-free guidance as a model wrapper (Ho & Salimans 2022, arXiv:2207.12598, eq. 6).

eps = eps_null + w (eps_cond - eps_null), with w = 1 the plain conditional model and w = 0 the unconditional
one. The wrapper is a model callable like the UNet itself, so any sampler drives it unchanged (the same pattern
as `ldm_lite.hspace.HSpaceProbe`).

- Learned variance: a model with 2C output channels (Nichol & Dhariwal 2021) has only its first C channels
  guided; the variance channels are the conditional output's, as GLIDE (arXiv:2112.10741) and DiT
  (arXiv:2212.09748) do.
- Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
  arXiv:2305.08891, sec. 3.4): the guided output is rescaled to the standard deviation of the
  conditional one, mixed by phi: out = phi (std_cond / std_guided) guided + (1 - phi) guided, std over each
  sample's (C, H, W). It undoes the over-exposure that large w gives on a zero-terminal-SNR schedule; the paper
  uses phi = 0.7.
"""
import torch

from ldm_lite.sampling import ModelWrapper


class ClassifierFreeGuidance(ModelWrapper):
    """model(x, t, labels) -> the guided output (B, C', H, W) of `unet`, a class-conditional model.

    unet: a model whose `config.num_classes` is its null label (an `ldm_lite` UNet trained with null labels).
    guidance: the weight w. rescale: phi of guidance rescale (0: off). One batched call evaluates the
    conditional and the null halves together. With C' = 2C (learned variance), channels C .. 2C - 1 are the
    conditional output's, unguided.
    """

    def __init__(self, unet, guidance: float, rescale: float = 0.0):
        null_label = getattr(getattr(unet, "config", None), "num_classes", None)
        if null_label is None:
            raise ValueError("classifier-free guidance needs a class-conditional model (config.num_classes)")
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale phi must be in [0, 1], got {rescale}")
        super().__init__(unet)
        self.guidance, self.rescale, self.null_label = float(guidance), float(rescale), null_label

    def __call__(self, x, timesteps, class_labels=None):
        """x: (B, C, H, W); timesteps: (B,); class_labels: (B,) long. Returns (B, C or 2C, H, W)."""
        if class_labels is None:
            raise ValueError("classifier-free guidance needs class labels to guide towards")
        nulls = torch.full_like(class_labels, self.null_label)
        both = self.unet(torch.cat([x, x]), torch.cat([timesteps, timesteps]), torch.cat([class_labels, nulls]))
        conditional, unconditional = both.chunk(2)
        channels = x.shape[1]
        guided = self._guide(conditional[:, :channels], unconditional[:, :channels])
        if conditional.shape[1] == channels:
            return guided
        return torch.cat([guided, conditional[:, channels:]], dim=1)  # the learned variance, unguided

    def _guide(self, conditional, unconditional):
        """Ho & Salimans eq. 6, then Lin et al.'s rescale (module docstring); (B, C, H, W) each."""
        guided = unconditional + self.guidance * (conditional - unconditional)
        if self.rescale == 0.0:
            return guided
        return rescale_guidance(guided, conditional, self.rescale)


def rescale_guidance(guided, conditional, phi: float):
    """Lin et al. 2023 (arXiv:2305.08891) sec. 3.4: phi guided std(conditional) / std(guided) + (1 - phi) guided,
    std per sample over all but the batch dimension; guided, conditional: (B, ...)."""
    dims = list(range(1, guided.ndim))
    factor = conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return phi * (guided * factor) + (1 - phi) * guided
