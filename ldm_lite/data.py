"""Image data: folders of images, CIFAR-10, and an embedded synthetic brightness dataset.

Every loader returns uint8 images (N, 3, R, R) in [0, 255] plus int64 labels (N,); `to_float`
maps them to the model's range [-1, 1]. Small datasets live in memory (`InMemoryImages`) and
are batched with on-the-fly horizontal flips, without DataLoader workers.

Labels: image folders are labelled ImageFolder style (index of the first-level subfolder in
sorted order, 0 when the folder is flat); CIFAR-10 by its 10 classes; the synthetic data by its
brightness tercile (0 dark, 1 mid, 2 bright).
"""
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SYNTHETIC_CLASSES = ("dark", "mid", "bright")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ----------------------------------------------------------------------------- image files

def list_images(root) -> list[Path]:
    """All image files under `root` (recursive), sorted by path; hidden files and folders skipped."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a directory")
    paths = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def folder_labels(root, paths: list[Path]) -> tuple[torch.Tensor, tuple[str, ...]]:
    """ImageFolder-style labels (N,) int64 and class names for `paths` under `root`.

    The class of an image is its first-level subfolder; classes are numbered in sorted order.
    Images directly in `root` form the class "" (so a flat folder has one class, label 0).
    """
    root = Path(root)
    names = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in paths]
    classes = tuple(sorted(set(names)))
    index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([index[n] for n in names], dtype=torch.long), classes


def load_image(path, resolution: int, center_crop: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One image as uint8 (3, R, R) in [0, 255].

    Grayscale, RGBA (alpha dropped) and palette images are converted to RGB; the shorter side is
    resized to R (bilinear, antialiased), then the square is cut from the centre, or at a random
    offset drawn from `generator` when `center_crop` is False.
    """
    with Image.open(path) as image:
        if image.mode == "P":  # palette images may carry transparency; go through RGBA to keep colours
            image = image.convert("RGBA")
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        if size != (width, height):
            image = image.resize(size, Image.BILINEAR)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size[1], size[0], 3)
    return crop(pixels.permute(2, 0, 1), resolution, center_crop, generator).contiguous()


def crop(image: torch.Tensor, resolution: int, center: bool = True,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Square crop (C, R, R) of an image (C, H, W) with H, W >= R: centred, or at a random offset."""
    height, width = image.shape[-2:]
    if center:
        top, left = (height - resolution) // 2, (width - resolution) // 2
    else:
        top = int(torch.randint(height - resolution + 1, (), generator=generator))
        left = int(torch.randint(width - resolution + 1, (), generator=generator))
    return image[..., top:top + resolution, left:left + resolution]


def read_images(paths, resolution: int, center_crop: bool = True, generator: torch.Generator | None = None,
                progress: bool = False, skipped: list | None = None) -> tuple[torch.Tensor, list]:
    """(uint8 (N, 3, R, R), indices of the paths read) for image files; the one reading policy of the toolkit.

    Unreadable files are skipped: when `skipped` is a list they are appended to it (the caller reports them),
    otherwise one warning counts them. ValueError when none is readable. See `load_image` for the resizing.
    """
    from tqdm.auto import tqdm
    paths = list(paths)
    images, kept, failed = [], [], []
    for i, path in enumerate(tqdm(paths, desc="loading images", disable=not progress, unit="img", leave=False)):
        try:
            images.append(load_image(path, resolution, center_crop, generator))
            kept.append(i)
        except (OSError, ValueError, SyntaxError) as error:  # PIL raises these for truncated/corrupt files
            failed.append((Path(path), error))
    if skipped is not None:
        skipped.extend(failed)
    elif failed:
        _warn_skipped(failed, Path(paths[0]).parent)
    if not images:
        if skipped is not None:
            return torch.empty(0, 3, resolution, resolution, dtype=torch.uint8), []
        raise ValueError(f"no readable images among {len(paths)} file(s) (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return torch.stack(images), kept


def _warn_skipped(failed: list, where) -> None:
    """One line on stderr naming the first unreadable file and why (a plain line, not a UserWarning pointing
    into the progress bar's code)."""
    path, error = failed[0]
    more = f" and {len(failed) - 1} more under {str(where)!r}" if len(failed) > 1 else ""
    reason = " ".join(str(error).split()) or type(error).__name__
    print(f"warning: skipped unreadable image {str(path)!r} ({reason}){more}", file=sys.stderr)


def iter_image_folder(root, resolution: int, batch_size: int, center_crop: bool = True,
                      generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches (uint8 (B, 3, R, R), int64 labels (B,)) over every image under `root`, in sorted order.

    The last batch may be smaller. Unreadable files are skipped; one warning at the end counts them
    (`read_images`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = list_images(root)
    labels, _ = folder_labels(root, paths)
    failed, images, kept_labels = [], torch.empty(0, 3, resolution, resolution, dtype=torch.uint8), labels[:0]
    for start in range(0, len(paths), batch_size):
        batch, kept = read_images(paths[start:start + batch_size], resolution, center_crop, generator, skipped=failed)
        images, kept_labels = torch.cat([images, batch]), torch.cat([kept_labels, labels[start:start + batch_size][kept]])
        while len(images) >= batch_size:  # refill to full batches across skipped files
            yield images[:batch_size], kept_labels[:batch_size]
            images, kept_labels = images[batch_size:], kept_labels[batch_size:]
    if len(images):
        yield images, kept_labels
    if failed:
        _warn_skipped(failed, root)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1], same shape."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (clamped) -> uint8 in [0, 255], same shape."""
    return images.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- in-memory datasets

@dataclass(frozen=True)
class InMemoryImages:
    """A small dataset held in memory.

    images: uint8 (N, C, R, R) in [0, 255] (or float latents (N, C, h, w) for latent diffusion);
    labels: int64 (N,); class_names: one name per label value; mirrored: optional (N, C, H, W) to use for
    flipped samples instead of mirroring `images` (latents of the mirrored images, which are not exactly
    the mirrored latents).
    """
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    mirrored: torch.Tensor | None = None

    def __post_init__(self):
        if self.images.ndim != 4 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"images must be (N, C, H, W) and labels (N,), got {tuple(self.images.shape)} "
                             f"and {tuple(self.labels.shape)}")
        if len(self) == 0:
            raise ValueError("the dataset is empty")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def batch(self, indices: torch.Tensor, flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) and labels (B,) at `indices` (B,); where the bool mask `flip` (B,) is set,
        the image is mirrored left-right."""
        images = self.images[indices]
        if flip is not None:
            mirrored = images.flip(-1) if self.mirrored is None else self.mirrored[indices]
            images = torch.where(flip.view(-1, 1, 1, 1), mirrored, images)
        return images, self.labels[indices]


def synthetic_brightness(num_images: int = 4096, resolution: int = 16, seed: int = 0) -> InMemoryImages:
    """Procedural images whose mean brightness spans near-black to near-white, labelled by tercile.

    Each image has a mean value b ~ U(-0.9, 0.9) (in [-1, 1] units) plus a zero-mean pattern (tinted
    stripes and a soft blob) scaled to stay inside [-0.95, 0.95], so nothing clips and the image mean is b
    up to uint8 rounding. Label: 0 dark (b < -0.3), 1 mid, 2 bright (b > 0.3); the dark / bright class
    means are about -0.6 / +0.6. Deterministic in `seed`.
    """
    if num_images < 1 or resolution < 1:
        raise ValueError(f"num_images and resolution must be >= 1, got {num_images} and {resolution}")
    g = torch.Generator().manual_seed(seed)
    n = num_images
    brightness = torch.rand(n, generator=g) * 1.8 - 0.9
    coords = torch.linspace(-1, 1, resolution)
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # (R, R)
    angle = torch.rand(n, 1, 1, generator=g) * torch.pi
    frequency = 1 + torch.rand(n, 1, 1, generator=g) * 3
    stripes = torch.sin(frequency * torch.pi * (x * angle.cos() + y * angle.sin()))  # (N, R, R)
    centre = torch.rand(n, 2, 1, 1, generator=g) * 1.2 - 0.6
    blob = torch.exp(-((x - centre[:, 0]) ** 2 + (y - centre[:, 1]) ** 2) / 0.2)  # (N, R, R)
    tint = torch.rand(n, 3, 2, generator=g) * 2 - 1  # per-channel weights of stripes and blob
    pattern = tint[..., 0, None, None] * stripes[:, None] + tint[..., 1, None, None] * blob[:, None]  # (N, 3, R, R)
    pattern = pattern - pattern.mean(dim=(1, 2, 3), keepdim=True)
    peak = pattern.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    headroom = (0.95 - brightness.abs()).view(n, 1, 1, 1)
    images = brightness.view(n, 1, 1, 1) + pattern * (headroom / peak)
    labels = (brightness > -0.3).long() + (brightness > 0.3).long()
    return InMemoryImages(to_uint8(images), labels, SYNTHETIC_CLASSES)


def brightness_terciles(dataset: InMemoryImages) -> InMemoryImages:
    """The same images relabelled by mean brightness: 0 dark, 1 mid, 2 bright, split at the 1/3 and 2/3
    quantiles of the per-image mean over (C, H, W), so the three classes have (nearly) equal sizes."""
    means = to_float(dataset.images).mean(dim=(1, 2, 3))
    low, high = torch.quantile(means, torch.tensor([1 / 3, 2 / 3]))
    labels = (means > low).long() + (means > high).long()
    return InMemoryImages(dataset.images, labels, SYNTHETIC_CLASSES, dataset.mirrored)


def load_image_folder(root, resolution: int, center_crop: bool = True, max_images: int = 0,
                      progress: bool = True, seed: int = 0) -> InMemoryImages:
    """Every image under `root` in memory, labelled ImageFolder style; with `max_images` > 0, that many
    images spread evenly over the sorted list (so every class keeps its share). Without `center_crop`,
    each image is cropped once at a random offset drawn from `seed`. Unreadable files are skipped with
    one warning that counts them."""
    paths = list_images(root)
    labels, class_names = folder_labels(root, paths)
    if 0 < max_images < len(paths):
        keep = torch.linspace(0, len(paths) - 1, max_images).round().long()
        paths, labels = [paths[i] for i in keep.tolist()], labels[keep]
    if not paths:
        raise ValueError(f"no images under {str(root)!r} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    images, kept = read_images(paths, resolution, center_crop, torch.Generator().manual_seed(seed), progress)
    return InMemoryImages(images, labels[kept], class_names)


def load_cifar10(root, resolution: int = 32, train: bool = True, download: bool = False) -> InMemoryImages:
    """CIFAR-10 through torchvision's python-pickle files under `root`; downloads only if `download`."""
    import torchvision
    try:
        dataset = torchvision.datasets.CIFAR10(str(root), train=train, download=download)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise ValueError(f"CIFAR-10 not found under {str(root)!r}; pass --data.download=true to download it "
                         f"({error})") from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
    if resolution != images.shape[-1]:
        images = resize_uint8(images, resolution)
    return InMemoryImages(images, torch.tensor(dataset.targets, dtype=torch.long), tuple(dataset.classes))


def resize_uint8(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Square uint8 images (N, C, S, S) -> (N, C, R, R), bilinear with antialiasing."""
    resized = torch.nn.functional.interpolate(images.float(), size=(resolution, resolution), mode="bilinear",
                                              antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def load_dataset(source: str, resolution: int, center_crop: bool = True, download: bool = False,
                 synthetic_size: int = 4096, seed: int = 0, max_images: int = 0,
                 progress: bool = True) -> InMemoryImages:
    """A dataset by its spec: "synthetic", "cifar10:ROOT" (torchvision files) or an image folder path.

    `seed` draws the synthetic images and the random crops of an image folder (not the training order)."""
    if source == "synthetic":
        return synthetic_brightness(synthetic_size, resolution, seed)
    if source.startswith("cifar10:"):
        return load_cifar10(source.split(":", 1)[1], resolution, download=download)
    if not Path(source).is_dir():
        raise ValueError(f"data source must be 'synthetic', 'cifar10:ROOT' or an existing image folder, "
                         f"got {source!r}")
    return load_image_folder(source, resolution, center_crop, max_images, progress, seed)


def save_image_grid(images: torch.Tensor, path, nrow: int = 8, scale: int = 1) -> None:
    """Write images (N, 3, H, W) in [-1, 1] as one PNG grid with `nrow` images per row, 2-pixel gaps.
    scale: nearest-neighbour upscaling of each image, so 16x16 samples stay visible on a screen."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    n, channels, height, width = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.zeros(channels, rows * (height + 2) + 2, nrow * (width + 2) + 2, dtype=torch.uint8)
    for i, image in enumerate(to_uint8(images.detach().cpu())):
        top, left = 2 + (i // nrow) * (height + 2), 2 + (i % nrow) * (width + 2)
        grid[:, top:top + height, left:left + width] = image
    if channels == 1:
        grid = grid.expand(3, -1, -1)
    Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()).save(path)


def shared_data_dir() -> Path:
    """../shared/data beside the repository holding this package (found from it, never an absolute path)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def lesson_images(n: int, resolution: int, data_root=None, seed: int = 0) -> tuple[torch.Tensor, str]:
    """n pictures (n, 3, R, R) float in [-1, 1] and a description of where they came from.

    Looks in `data_root` (default `shared_data_dir()`) for cifar10-jpeg/test, then coco128, taking n images
    spread evenly over the sorted file list; without either, the embedded `synthetic_brightness` images.
    """
    root = Path(data_root) if data_root is not None else shared_data_dir()
    for sub, name in (("cifar10-jpeg/test", "CIFAR-10 test pictures"), ("coco128", "COCO pictures")):
        folder = root / sub
        if folder.is_dir():
            paths = list_images(folder)
            if paths:
                keep = torch.linspace(0, len(paths) - 1, min(n, len(paths))).round().long().tolist()
                images, _ = read_images([paths[i] for i in keep], resolution)
                return to_float(images), f"{len(images)} {name} from {sub} at {resolution}x{resolution}"
    images = synthetic_brightness(n, resolution, seed).images
    return to_float(images), f"{n} embedded synthetic images at {resolution}x{resolution} (no ../shared/data)"
