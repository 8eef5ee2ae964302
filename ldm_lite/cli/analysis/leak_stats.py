"""`python -m analysis leak-stats --data DIR --out stats.safetensors`: fit signal-leak statistics
(Everaert et al. 2024, arXiv:2309.15842) on an image folder, in pixel space or in a VAE's latent space.
The file feeds `python -m sample --leak` (and `ldm_lite.sampling.initial_noise`)."""
from PIL import Image

from ldm_lite.checks import output_file
from ldm_lite.data import list_images
from ldm_lite.leak import KINDS, LeakStats
from ldm_lite.models.vae_loading import load_vae


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="statistics file to write (.safetensors)")
    parser.add_argument("--vae", metavar="PATH_OR_VARIANT", help="fit on the latents of this VAE (weights file or "
                        "folder in any layout ldm_lite reads, or a preset name for a random VAE); default: pixels")
    parser.add_argument("--resolution", type=int, help="images are resized (shorter side) and centre-cropped to "
                        "this square size; default: the shorter side of the first image")
    parser.add_argument("--kind", choices=KINDS, default="dct+pixel", help="leak model: per-element Gaussian, "
                        "low-frequency DCT Gaussian, or both (the paper's model)")
    parser.add_argument("--n-components", type=int, default=3, help="number of lowest DCT frequencies per channel "
                        "with a full covariance (kinds dct, dct+pixel)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (memory only)")
    parser.add_argument("--device", default="cpu", help="device of the VAE")


def run(args):
    out = output_file(args.out, suffix=".safetensors")
    resolution = args.resolution or _first_image_side(args.data)
    if resolution < 1:
        raise ValueError(f"--resolution must be >= 1, got {resolution}")
    vae = None if args.vae is None else load_vae(args.vae).to(args.device)
    if vae is not None and resolution % vae.downscale:
        raise ValueError(f"--resolution must be a multiple of the VAE's downscale factor {vae.downscale}, "
                         f"got {resolution}")
    stats = LeakStats.fit_folder(args.data, resolution, vae=vae, batch_size=args.batch_size, kind=args.kind,
                                 n_components=args.n_components)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats.save(out)
    print(f"wrote {out}: {stats}")


def _first_image_side(folder) -> int:
    """Shorter side of the first image under `folder` (sorted order), the default resolution."""
    paths = list_images(folder)
    if not paths:
        raise ValueError(f"no images under {str(folder)!r}")
    with Image.open(paths[0]) as image:
        return min(image.size)
