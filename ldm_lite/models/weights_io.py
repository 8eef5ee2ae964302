"""Reading PyTorch pickle weight files safely; shared by the UNet and VAE loaders."""
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
