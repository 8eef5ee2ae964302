"""Reading PyTorch pickle weight files safely; shared by the UNet and VAE loaders and by `ldm_lite.runs`. Also
`save_safetensors`, which writes safetensors files with the usual permissions.

`read_training_checkpoint` is the one reader of ldm_lite training checkpoints (format TRAIN_FORMAT): the UNet
loader, the run loader and resuming a run all go through it.
"""
import os
import pickle
import re
from pathlib import Path

import torch


def torch_load_weights(file: Path, map_location="cpu"):
    """torch.load(weights_only=True), memory-mapped when the file allows it (only the tensors used get read)."""
    try:
        try:
            return torch.load(file, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(file, map_location=map_location, weights_only=True)   # legacy (non-zip) pickle
    except pickle.UnpicklingError as error:
        reason = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n|$)", str(error))
        reason = reason[1] if reason else str(error).splitlines()[0]
        if "global" not in reason.lower():
            raise ValueError(f"{file}: not a readable PyTorch weight file ({reason})") from None
        raise ValueError(f"{file}: refused by torch.load(weights_only=True): it holds more than tensors and plain "
                         f"containers ({reason}), so "
                         f"reading it would mean running code from the file. Use a .safetensors copy of these "
                         f"weights instead (it can hold tensors only).") from None
    except Exception as error:
        raise ValueError(f"{file}: not a readable PyTorch weight file ({type(error).__name__}: {error})") from None


TRAIN_FORMAT = "ldm_lite.train.v1"


def read_training_checkpoint(file: Path, required=("unet_config", "model"), map_location="cpu") -> dict:
    """A training checkpoint (dict) of format TRAIN_FORMAT holding the `required` entries.

    ValueError, one line, for a corrupt or foreign file, another format, or a missing entry.
    """
    checkpoint = torch_load_weights(Path(file), map_location)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != TRAIN_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{str(file)!r} is not an ldm_lite training checkpoint (format {found!r}, expected "
                         f"{TRAIN_FORMAT!r})")
    missing = sorted(set(required) - set(checkpoint))
    if missing:
        raise ValueError(f"checkpoint {str(file)!r} lacks {missing}: it is incomplete or was not written by ldm_lite")
    return checkpoint


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors' save_file, then the mode a plain open() gives (0666 less the umask): save_file itself
    creates every file as -rw------- (owner only)."""
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
