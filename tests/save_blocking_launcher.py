"""Test helper for the kill-during-save test: `python tests/save_blocking_launcher.py STEP TRAIN_ARGS...` runs the
train command, but the checkpoint save of step STEP writes 4 KiB of the file, touches `save_blocked` in the run
folder and sleeps, so the test can SIGKILL the process in the middle of a save. It patches torch.save, which
`ldm_lite.runs.atomic_save` calls, in this child process only."""
import io
import sys
import time
from pathlib import Path

import torch

from ldm_lite.cli import run_main
from ldm_lite.cli.train import main

BLOCK_STEP = int(sys.argv[1])
real_save = torch.save


def blocking_save(payload, file, *args, **kwargs):
    if isinstance(payload, dict) and payload.get("step") == BLOCK_STEP:
        buffer = io.BytesIO()
        real_save(payload, buffer, *args, **kwargs)
        file.write(buffer.getvalue()[:4096])
        file.flush()
        (Path(file.name).parent / "save_blocked").touch()
        time.sleep(3600)
    return real_save(payload, file, *args, **kwargs)


torch.save = blocking_save
sys.exit(run_main(main, sys.argv[2:]))
