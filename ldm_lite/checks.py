"""Checks a command makes before it starts its work: the paths it writes and the formats of the files it reads.

One rule: every command checks its output path (a folder that can be written, not a file where a folder is
meant) and every input file's format before the work, so a typo costs a one-line error instead of a
traceback after minutes of computing. Each check raises a ValueError whose message names the flag and path.
"""
import json
import math
import struct
import tempfile
from pathlib import Path

SAFETENSORS_HEADER_LIMIT = 100_000_000  # the safetensors library refuses larger headers too


def output_folder(path, flag: str = "--out") -> Path:
    """Check, creating nothing, that the folder `path` can be made and written: its nearest existing ancestor is
    a folder in which a file can be created.

    ValueError when `path` is an existing file, lies under a file, or cannot be written (read-only file system,
    /proc, no permission).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file; a folder is meant (choose another {flag})")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {str(path)!r} cannot be made: {str(existing)!r} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {str(path)!r} cannot be written: {error.strerror or error} in "
                         f"{str(existing)!r}") from None
    return path


def output_file(path, flag: str = "--out", suffix: str | None = None) -> Path:
    """Check that the file `path` can be written: not a folder, the right suffix, a folder that can be made."""
    path = Path(path)
    if suffix is not None and path.suffix != suffix:
        raise ValueError(f"{flag} must end in {suffix}, got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; a file name is meant")
    try:
        output_folder(path.parent, flag)
    except ValueError:
        raise ValueError(f"{flag} {str(path)!r} cannot be written: {str(path.parent)!r} is not a writable "
                         "folder") from None
    return path


def safetensors_file(path) -> Path:
    """Check that `path` is a whole safetensors file: an 8-byte header length, a JSON header, and exactly the
    bytes the header describes. ValueError naming the file for a pickle named .safetensors, a truncated
    download or any other foreign file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, SAFETENSORS_HEADER_LIMIT):
            raise ValueError(f"{str(path)!r} is not a readable safetensors file (a PyTorch pickle or another "
                             "format?)")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{str(path)!r} is not a readable safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r} is not a readable safetensors file (its header is not a JSON object)")
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        state = "truncated" if size < expected else "damaged"
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: it is {state} (it holds {size} bytes, "
                         f"its header describes {expected})")
    return path


def finite(value: float, name: str) -> float:
    """`value` itself, or a ValueError naming `name` when it is NaN or infinite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def comma_list(text: str, kind, name: str) -> list:
    """A comma-separated option ('1,1.005,1.01') as a list of `kind`, in order; ValueError naming the option for
    an entry that is not a `kind` or not finite."""
    try:
        values = [kind(item.strip()) for item in str(text).split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None
    if not all(math.isfinite(value) for value in values if isinstance(value, float)):
        raise ValueError(f"{name} must hold finite numbers, got {text!r}")
    return values
