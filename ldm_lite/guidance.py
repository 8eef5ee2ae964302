"""Classifier-free guidance as a model wrapper (Ho & Salimans 2022, arXiv:2207.12598, eq. 6).

eps = eps_null + w (eps_cond - eps_null), with w = 1 the plain conditional model and w = 0 the unconditional
one. The wrapper is a model callable like the UNet itself, so any sampler drives it unchanged (the same pattern
as `ldm_lite.hspace.HSpaceProbe`).
"""
import torch

from ldm_lite.sampling import ModelWrapper


class ClassifierFreeGuidance(ModelWrapper):
    """model(x, t, labels) -> the guided output (B, C', H, W) of `unet`, a class-conditional model.

    unet: a model whose `config.num_classes` is its null label (an `ldm_lite` UNet trained with null labels).
    guidance: the weight w. One batched call evaluates the conditional and the null halves together.
    """

    def __init__(self, unet, guidance: float):
        null_label = getattr(getattr(unet, "config", None), "num_classes", None)
        if null_label is None:
            raise ValueError("classifier-free guidance needs a class-conditional model (config.num_classes)")
        super().__init__(unet)
        self.guidance, self.null_label = float(guidance), null_label

    def __call__(self, x, timesteps, class_labels=None):
        if class_labels is None:
            raise ValueError("classifier-free guidance needs class labels to guide towards")
        nulls = torch.full_like(class_labels, self.null_label)
        both = self.unet(torch.cat([x, x]), torch.cat([timesteps, timesteps]), torch.cat([class_labels, nulls]))
        conditional, unconditional = both.chunk(2)
        return unconditional + self.guidance * (conditional - unconditional)
