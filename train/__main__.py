"""`python -m train`: a shim for `ldm_lite.cli.train` (installed as `ldm-train`)."""
from ldm_lite.cli.train import entry_point

if __name__ == "__main__":
    entry_point()
