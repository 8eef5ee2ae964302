"""The latent cache of a latent-diffusion run: the training images encoded once by the VAE, kept in a safetensors
file (<run.out>/latents.safetensors or latent.cache) that records what it was made from, so it is rebuilt only
when the VAE, its factors or the images change."""
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ldm_lite import runs
from ldm_lite.config import Config
from ldm_lite.data import InMemoryImages
from ldm_lite.distributed import World
from ldm_lite.latents import encode_latents
from ldm_lite.models.vae_loading import load_vae

LATENT_CACHE_FORMAT = "ldm_lite.latents.v1"


def cached_latents(dataset: InMemoryImages, config: Config, run_dir: Path, world: World):
    """(dataset of VAE latents, VAE): encode the images once and keep the latents in a safetensors cache.

    The cache records the VAE identity (architecture, scaling and weights), the scaling/shift factors and a
    hash of the images; it is rebuilt only when one of these changes. With random_flip the mirrored images
    are encoded too, since the latent of a mirrored image is not exactly the mirrored latent.
    """
    vae = load_vae(config.latent.vae, dtype=torch.float32).to(world.device).eval()
    path = Path(config.latent.cache) if config.latent.cache else run_dir / "latents.safetensors"
    key = {"format": LATENT_CACHE_FORMAT, "vae": vae.identity(), "scaling_factor": repr(vae.scaling_factor),
           "shift_factor": repr(vae.shift_factor), "images": runs.tensor_digest(dataset.images),
           "mirrored": str(config.data.random_flip)}
    if world.is_main and not _cache_matches(path, key):
        tensors = {"latents": _encode(vae, dataset.images, config, world, "encoding latents"),
                   "labels": dataset.labels}
        if config.data.random_flip:
            tensors["mirrored"] = _encode(vae, dataset.images.flip(-1), config, world, "encoding mirrored")
        path.parent.mkdir(parents=True, exist_ok=True)
        with runs.written_then_renamed(path) as partial:
            save_file(tensors, str(partial), metadata={**key, "class_names": json.dumps(dataset.class_names)})
    if world.size > 1:
        dist.barrier()
    with safe_open(str(path), framework="pt") as file:
        mirrored = file.get_tensor("mirrored") if config.data.random_flip else None
        latents = InMemoryImages(file.get_tensor("latents"), file.get_tensor("labels"), dataset.class_names, mirrored)
    return latents, vae


def _cache_matches(path: Path, key: dict) -> bool:
    """Whether the latent cache at `path` holds `key`'s latents; False when it is missing or stale.

    A file there that is not an ldm_lite latent cache (no format tag, or the keys of earlier caches) is never
    replaced: latent.cache may point anywhere, so a typo must not overwrite someone's file.
    """
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
    except Exception:
        metadata = None
    legacy = metadata is not None and {"vae", "images", "mirrored"} <= set(metadata) and "format" not in metadata
    if metadata is None or not (metadata.get("format") == LATENT_CACHE_FORMAT or legacy):
        raise ValueError(f"latent.cache {str(path)!r} exists and is not an ldm_lite latent cache; refusing to "
                         "overwrite it (choose another latent.cache path or delete the file)")
    return all(metadata.get(k) == v for k, v in key.items() if k != "format")


def _encode(vae, images: torch.Tensor, config: Config, world: World, desc: str) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> scaled latents (N, C_lat, H/f, W/f) float32 (posterior mode)."""
    return encode_latents(vae, images, config.latent.encode_batch_size, config.run.progress and world.is_main, desc)
