"""`python -m analysis`: a shim for `ldm_lite.cli.analysis` (installed as `ldm-analysis`)."""
from ldm_lite.cli.analysis import entry_point

if __name__ == "__main__":
    entry_point()
