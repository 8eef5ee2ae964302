"""Denoising networks. `unet` holds the DDPM/ADM UNet; `unet_loading` reads and writes its weight files."""
from ldm_lite.models.unet import UNet, UNetConfig, load_unet, save_unet, unet_config_from_dict, unet_preset

__all__ = ["UNet", "UNetConfig", "load_unet", "save_unet", "unet_config_from_dict", "unet_preset"]
