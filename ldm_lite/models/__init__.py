"""Networks. `unet`: the DDPM/ADM denoising UNet (`unet_config`: its architecture and presets); `vae`: the Stable
Diffusion autoencoder; the `*_loading` modules beside them read and write their weight files."""
from ldm_lite.models.unet import UNet, load_unet, save_unet
from ldm_lite.models.unet_config import UNetConfig, unet_config_from_dict, unet_preset
from ldm_lite.models.vae import AutoencoderKL
from ldm_lite.models.vae_loading import load_vae

__all__ = ["UNet", "UNetConfig", "load_unet", "save_unet", "unet_config_from_dict", "unet_preset",
           "AutoencoderKL", "load_vae"]
