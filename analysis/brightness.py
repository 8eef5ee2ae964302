"""`python -m analysis brightness --samples DIR_OR_NPZ --data synthetic|cifar10:ROOT|FOLDER --out DIR`: per-image
brightness (per channel and luminance) of samples vs data: W1 distance, KS statistic, std ratio (below 1:
squeezed toward mid-grey), a histogram overlay (brightness.png) and brightness.csv.

Also home of the --samples loader shared with the spectrum command.
"""
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_lite.data import list_images, load_image, to_float
from ldm_lite.metrics import brightness_report, format_table
from ldm_lite.plots import plot_brightness, write_csv

from analysis.bands import add_data_arguments, load_data, positive

NPZ_KEYS = ("samples", "images", "arr_0")


def add_samples_argument(parser):
    parser.add_argument("--samples", required=True, metavar="DIR_OR_NPZ",
                        help="generated images: a folder from `python -m sample` (its manifest.json lists them) or "
                             "of image files, or a .npz (key samples, images or arr_0: uint8 (N, H, W, 3) or "
                             "(N, 3, H, W), or float (N, C, H, W) in [-1, 1])")


def load_samples(path, resolution: int | None = None) -> torch.Tensor:
    """Samples (N, C, H, W) float in [-1, 1] from a folder of images or a .npz (see `add_samples_argument`).

    Folder images are resized and center-cropped to `resolution` (their own size when None); grid.png is skipped.
    """
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise ValueError(f"--samples file {str(path)!r} does not exist")
        return _from_array(path)
    if not path.is_dir():
        raise ValueError(f"--samples must be a folder of images or a .npz file; {str(path)!r} does not exist")
    manifest = path / "manifest.json"
    if manifest.is_file():
        files = [path / name for name in json.loads(manifest.read_text()).get("images", [])]
    else:
        files = [p for p in list_images(path) if p.name != "grid.png"]
    if len(files) < 2:
        raise ValueError(f"--samples folder {str(path)!r} holds {len(files)} image(s); need at least 2")
    if resolution is None:
        with Image.open(files[0]) as first:
            resolution = min(first.size)
    return to_float(torch.stack([load_image(p, resolution) for p in files]))


def _from_array(path: Path) -> torch.Tensor:
    with np.load(path) as archive:
        key = next((k for k in NPZ_KEYS if k in archive.files), None)
        if key is None:
            raise ValueError(f"{path} has none of the arrays {NPZ_KEYS} (found {archive.files})")
        array = torch.from_numpy(archive[key])
    if array.ndim != 4:
        raise ValueError(f"{path}[{key!r}] must be 4-D (N, H, W, 3) or (N, C, H, W), got shape {tuple(array.shape)}")
    if array.dtype == torch.uint8:
        if array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
            array = array.permute(0, 3, 1, 2)
        return array.float() / 127.5 - 1.0
    return array.float()


def load_pair(args) -> tuple:
    """(samples, data) as float (N, C, R, R); data at the samples' resolution unless --resolution is given."""
    if args.resolution is not None:
        positive(args.resolution, "--resolution")
    samples = load_samples(args.samples, args.resolution)
    resolution = args.resolution or samples.shape[-1]
    data = load_data(args.data, resolution, args.num_images, args.seed)
    if samples.shape[1:] != data.shape[1:]:
        raise ValueError(f"samples are {tuple(samples.shape[1:])} but data are {tuple(data.shape[1:])}; "
                         "pass --resolution to resize both")
    return samples, data


def add_arguments(parser):
    add_samples_argument(parser)
    add_data_arguments(parser, resolution_default=None, num_images=2048)
    parser.add_argument("--out", default="runs/analysis/brightness", help="output folder")


def run(args):
    samples, data = load_pair(args)
    report = brightness_report(samples, data)
    out = Path(args.out)
    figure = plot_brightness(report, out / "brightness.png")
    table = write_csv(report["rows"], out / "brightness.csv")
    print(f"per-image brightness, {len(samples)} samples vs {len(data)} data images ({args.data}):")
    print(format_table(report["rows"]))
    print(f"wrote {figure.name}, {table.name} to {out}")
