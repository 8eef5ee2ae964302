"""`python -m sample`: a shim for `ldm_lite.cli.sample` (installed as `ldm-sample`)."""
from ldm_lite.cli.sample import entry_point

if __name__ == "__main__":
    entry_point()
