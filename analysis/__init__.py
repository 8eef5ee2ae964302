"""`python -m analysis COMMAND`: the measurement commands; see `ldm_lite.cli.analysis`."""
