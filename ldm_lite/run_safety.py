"""What keeps a run folder whole: one writer at a time (`FolderLock`), and a stop on Ctrl-C or `kill` that
first saves the work (`StopRequest`).

The lock is an exclusive `fcntl.flock` on `LOCK_FILE` in the folder. The kernel releases it when the process
ends, however it ends (kill -9 included), so a lock left by a dead process never blocks. The file holds the
holder's pid and host, read only to name the holder when a second run is refused.
"""
import fcntl
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from ldm_lite.checks import output_folder

LOCK_FILE = ".lock"


class FolderLock:
    """Exclusive use of `folder` (created) while the `with` block runs; a ValueError naming the holder when
    another process has it. `enabled=False` takes nothing (the non-zero ranks of a torchrun job)."""

    def __init__(self, folder, enabled: bool = True, flag: str = "--out"):
        self.folder, self.enabled, self.flag, self.file = Path(folder), enabled, flag, None

    def __enter__(self) -> "FolderLock":
        if not self.enabled:
            return self
        output_folder(self.folder, self.flag).mkdir(parents=True, exist_ok=True)
        file = open(self.folder / LOCK_FILE, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise ValueError(f"{str(self.folder)!r} is in use by {holder}; wait for it to finish or choose another "
                             f"{self.flag}") from None
        file.truncate(0)
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self.file = file
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


class StopRequest:
    """While the `with` block runs, SIGINT (Ctrl-C) and SIGTERM (kill) only set `signal_name`: the training loop
    finishes its step, saves a checkpoint and stops. A second signal raises KeyboardInterrupt at once. Outside
    the main thread signals cannot be caught, and nothing changes."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_name, self.previous = None, {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def _handle(self, number, frame) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(number).name}: stopped at once, without saving")
        self.signal_name = signal.Signals(number).name
        print(f"\n{self.signal_name}: finishing this step and saving a checkpoint (again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}
