"""Images <-> diffusion latents through a VAE, in batches: the one encode and decode loop of the toolkit.

Latents are `vae.to_latents(images)`: the posterior mode, shifted and scaled by the VAE's factors (Rombach et
al. 2022, arXiv:2112.10752, sec. 3); `vae.from_latents` inverts it.
"""
import torch
from tqdm.auto import tqdm

from ldm_lite.data import to_float


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 32, progress: bool = False,
                   desc: str = "encoding") -> torch.Tensor:
    """Images (N, 3, H, W), uint8 or float in [-1, 1], -> latents (N, C_lat, H/f, W/f) float32 on the CPU.

    Each batch runs on the VAE's device and dtype."""
    parameter = next(vae.parameters())
    chunks = []
    for chunk in tqdm(images.split(batch_size), desc=desc, disable=not progress, leave=False):
        chunk = to_float(chunk) if chunk.dtype == torch.uint8 else chunk
        chunks.append(vae.to_latents(chunk.to(parameter.device, parameter.dtype)).float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Latents (N, C_lat, h, w) -> images (N, 3, f h, f w) float32 on the CPU, roughly in [-1, 1]."""
    parameter = next(vae.parameters())
    return torch.cat([vae.from_latents(chunk.to(parameter.device, parameter.dtype)).float().cpu()
                      for chunk in latents.split(batch_size)])
