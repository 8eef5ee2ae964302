"""h-space of a diffusion UNet: the middle-block output as a semantic latent space.

Kwon et al. 2023, "Diffusion Models Already Have a Semantic Latent Space" (arXiv:2210.10960) show that adding a
direction to h (the bottleneck activation, e.g. 512 x 8 x 8) at the early sampling steps edits attributes of
the image; Haas et al. 2024, "Discovering Interpretable Directions in h-space of Diffusion Models"
(arXiv:2310.09912) find such directions without supervision by PCA over many sampled h.

The tools here never copy the sampling loop. `HSpaceProbe` wraps a UNet into the model callable that
`ldm_lite.sampling.sample` expects: on each call it notes the timestep, installs the UNet's
`mid_block_hook` for that call, and the hook records h and/or adds an offset to it. Edits replay the same
x_T and the same generator seed, so the sampling noise is identical and only the edit differs.

Shapes: h is (B, C_mid, h, w); a captured set is (S, N, C_mid, h, w) for S recorded timesteps and N samples.
PCA per timestep works on vectors of D = C_mid * h * w values; the joint PCA over all timesteps on each sample's
concatenation of its S h-vectors (S * D values), so one direction moves h at every step together.
"""
import dataclasses
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .sampling import ModelWrapper, sample


@dataclass(frozen=True)
class HEdit:
    """An offset added to h during sampling.

    offset: (C_mid, h, w) added at every timestep in `timesteps`, or a dict {timestep: (C_mid, h, w)} for
    per-timestep offsets (timesteps missing from the dict are left alone).
    timesteps: the sampled timesteps (ints) to edit; None edits all of them.
    """
    offset: torch.Tensor | dict
    timesteps: frozenset | None = None

    def offset_at(self, timestep: int):
        if self.timesteps is not None and timestep not in self.timesteps:
            return None
        return self.offset.get(timestep) if isinstance(self.offset, dict) else self.offset


class HSpaceProbe(ModelWrapper):
    """Model callable for `sample` that records and/or edits the UNet's middle-block output h.

    unet: a module with a `mid_block_hook` attribute (an `ldm_lite` UNet). record: keep h (as float32 on the
    CPU) at the timesteps in `record_timesteps` (all when None). edit: an `HEdit` or None.
    After sampling, `captured()` returns the recorded h per timestep.
    """

    def __init__(self, unet, *, record: bool = False, record_timesteps=None, edit: HEdit | None = None):
        if not hasattr(unet, "mid_block_hook"):
            raise ValueError("unet must have a `mid_block_hook` attribute (an ldm_lite UNet)")
        super().__init__(unet)
        self.record, self.edit = record, edit
        self.record_timesteps = None if record_timesteps is None else {int(t) for t in record_timesteps}
        self.records: dict[int, list] = {}
        self._timestep = None

    def __call__(self, x, timesteps, class_labels=None):
        timesteps = torch.as_tensor(timesteps)
        self._timestep = int(timesteps.flatten()[0])  # `sample` calls with one timestep for the whole batch
        previous, self.unet.mid_block_hook = self.unet.mid_block_hook, self._hook
        try:
            return self.unet(x, timesteps, class_labels)
        finally:
            self.unet.mid_block_hook = previous

    def _hook(self, h):
        t = self._timestep
        if self.record and (self.record_timesteps is None or t in self.record_timesteps):
            self.records.setdefault(t, []).append(h.detach().float().cpu())
        offset = self.edit.offset_at(t) if self.edit is not None else None
        if offset is None:
            return h
        return h + offset.to(h.device, h.dtype)

    def captured(self) -> dict:
        """{"timesteps": (S,) in sampling order, "h": (S, N, C_mid, h, w)} of everything recorded so far."""
        if not self.records:
            raise ValueError("nothing recorded: create the probe with record=True and sample with it")
        timesteps = list(self.records)
        return {"timesteps": torch.tensor(timesteps), "h": torch.stack([torch.cat(self.records[t]) for t in timesteps])}


def capture_h(unet, scheduler, n: int, *, num_inference_steps: int | None = None, record_timesteps=None,
              seed: int = 0, batch_size: int = 64, **sample_kwargs) -> dict:
    """Sample n images and record h along the way: {"timesteps" (S,), "h" (S, n, C_mid, h, w), "samples"}.

    record_timesteps limits the memory (S x n x D floats); other keywords go to `sample`. Under classifier-free
    guidance the recorded batch is doubled (conditional then unconditional halves).
    """
    probe = HSpaceProbe(unet, record=True, record_timesteps=record_timesteps)
    samples = sample(probe, scheduler, n, num_inference_steps=num_inference_steps, seed=seed,
                     batch_size=batch_size, **sample_kwargs)
    return {**probe.captured(), "samples": samples}


# ----------------------------------------------------------------------------- PCA


@dataclass(frozen=True)
class PCA:
    """Principal directions of h vectors.

    mean (D,); directions (k, D) orthonormal rows, sorted by variance; std (k,) the standard deviation of the
    projections (so `std[i] * directions[i]` is one std along component i); explained (k,) the fraction of
    the total variance; shape (C_mid, h, w) to turn a direction back into an h offset, or (S, C_mid, h, w) for
    a joint PCA over the S `timesteps`.
    """
    mean: torch.Tensor
    directions: torch.Tensor
    std: torch.Tensor
    explained: torch.Tensor
    shape: tuple
    timesteps: tuple | None = None

    def offset(self, component: int, scale: float) -> torch.Tensor:
        """`scale` standard deviations along `component`, as an h offset of `shape`."""
        if not 0 <= component < len(self.directions):
            raise ValueError(f"component must be in [0, {len(self.directions)}), got {component}")
        return (scale * self.std[component] * self.directions[component]).reshape(self.shape)


PCA_METHODS = ("auto", "svd", "lowrank")


def pca(h: torch.Tensor, num_components: int, method: str = "auto", seed: int = 0) -> PCA:
    """PCA of h vectors (N, ...) (each row flattened to D values), float64 internally.

    method "svd": exact SVD of the centred (N, D) matrix; "lowrank": torch.pca_lowrank (randomised, seeded by
    `seed`, 4 power iterations); "auto": svd when min(N, D) <= 4096. Sign convention: the largest-magnitude entry
    of every direction is positive.
    """
    if method not in PCA_METHODS:
        raise ValueError(f"method must be one of {PCA_METHODS}, got {method!r}")
    if h.ndim < 2 or h.shape[0] < 2:
        raise ValueError(f"h must be (N, ...) with N >= 2, got shape {tuple(h.shape)}")
    x = h.reshape(h.shape[0], -1).double()
    if not 1 <= num_components <= min(x.shape):
        raise ValueError(f"num_components must be in [1, {min(x.shape)}] for {x.shape[0]} vectors of size "
                         f"{x.shape[1]}, got {num_components}")
    mean = x.mean(dim=0)
    centred = x - mean
    if method == "svd" or (method == "auto" and min(x.shape) <= 4096):
        _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
        directions = vh[:num_components]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, singular, v = torch.pca_lowrank(centred, q=min(num_components + 10, *x.shape), center=False, niter=4)
        directions = v.T[:num_components]
    largest = directions.abs().argmax(dim=1)
    directions = directions * directions.gather(1, largest[:, None]).sign()
    total = centred.pow(2).sum()
    variance = singular[:num_components].pow(2)
    return PCA(mean=mean, directions=directions, std=(variance / (x.shape[0] - 1)).sqrt(),
               explained=variance / total, shape=tuple(h.shape[1:]))


def pca_all_timesteps(captured: dict, num_components: int) -> PCA:
    """Joint PCA over all timesteps (Haas et al. 2024, sec. 3): each sample is the concatenation of its h at the S
    recorded timesteps, so a direction holds one (C_mid, h, w) slice per timestep and the timestep-to-timestep
    change of h (the same for every sample) drops out with the mean. Returns a PCA of shape (S, C_mid, h, w)."""
    h = captured["h"]  # (S, N, C_mid, h, w)
    joint = pca(h.transpose(0, 1), num_components)  # N vectors of S * D values
    return dataclasses.replace(joint, timesteps=tuple(captured["timesteps"].tolist()))


def pca_per_timestep(captured: dict, num_components: int) -> dict:
    """{timestep: PCA} over the N samples of each recorded timestep. Signs are aligned along sampling order
    (each direction has a positive dot product with the same component at the previous timestep), so an edit
    applied over several steps pushes one way."""
    result, previous = {}, None
    for t, h in zip(captured["timesteps"].tolist(), captured["h"]):
        current = pca(h, num_components)
        if previous is not None:
            flip = (current.directions * previous.directions).sum(dim=1).sign()
            flip[flip == 0] = 1
            current = dataclasses.replace(current, directions=current.directions * flip[:, None])
        result[t] = previous = current
    return result


def pca_edit(directions, component: int, scale: float, timesteps=None) -> HEdit:
    """HEdit moving h by `scale` standard deviations along `component` of a PCA: one of `pca` (the same offset at
    every edited step), `pca_all_timesteps` (its slice for each step) or a {timestep: PCA} dict from
    `pca_per_timestep`. timesteps: ints to edit, None for all."""
    timesteps = None if timesteps is None else frozenset(int(t) for t in timesteps)
    if isinstance(directions, dict):
        return HEdit({t: p.offset(component, scale) for t, p in directions.items()}, timesteps)
    offset = directions.offset(component, scale)
    if directions.timesteps is not None:
        return HEdit(dict(zip(directions.timesteps, offset)), timesteps)
    return HEdit(offset, timesteps)


def sample_with_edit(unet, scheduler, x_T: torch.Tensor, edit: HEdit | None, *, seed: int = 0,
                     batch_size: int = 64, **sample_kwargs) -> torch.Tensor:
    """Samples (N, C, H, W) from x_T (N, C, H, W) with `edit` applied to h; the step noise is seeded with `seed`
    every call, so two calls differ only by their edits."""
    probe = HSpaceProbe(unet, edit=edit)
    return sample(probe, scheduler, len(x_T), shape=tuple(x_T.shape[1:]), x_T=x_T,
                  seed=seed, batch_size=batch_size, **sample_kwargs)


def edit_grid(unet, scheduler, directions, components, scales, x_T: torch.Tensor, *, timesteps=None, seed: int = 0,
              progress: bool = True, **sample_kwargs) -> torch.Tensor:
    """Edited samples (len(components), len(scales), N, C, H, W): row i moves h along principal component
    components[i], column j by scales[j] standard deviations, at the sampled `timesteps` (None: all).
    directions: a PCA or a {timestep: PCA} dict. Scale 0 gives the unedited samples."""
    runs = len(components) * sum(scale != 0 for scale in scales) + (0 in scales)
    bar = tqdm(total=runs, desc="h-space edits", disable=not progress, leave=False)

    def run(edit):
        bar.update(1)
        return sample_with_edit(unet, scheduler, x_T, edit, seed=seed, progress=False, **sample_kwargs)

    unedited = run(None) if 0 in scales else None  # shared by every row
    grid = torch.stack([torch.stack([unedited if scale == 0 else run(pca_edit(directions, component, scale, timesteps))
                                     for scale in scales]) for component in components])
    bar.close()
    return grid
