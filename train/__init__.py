"""`python -m train`: train a UNet (pixel or latent diffusion) from a TOML config; see `ldm_lite.training`."""
