"""Data loading: image folders (RGB conversion, resize + crop, labels, corrupt files), synthetic data, batching."""
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image

from ldm_lite.data import (CIFAR10_CLASSES, InMemoryImages, brightness_terciles, folder_labels, iter_image_folder,
                           list_images, load_cifar10, load_dataset, load_image, load_image_folder, save_image_grid,
                           lesson_images, synthetic_brightness, to_float, to_uint8)

CIFAR_JPEG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg" / "train"


def _save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def test_list_images_is_recursive_sorted_and_filters_extensions(tmp_path):
    for name in ["b/2.png", "a/1.JPG", "a/sub/0.jpeg", "c.bmp", "notes.txt", ".hidden/x.png", "a/.x.png"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a/1.JPG", "a/sub/0.jpeg", "b/2.png", "c.bmp"]


def test_list_images_rejects_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list_images(tmp_path / "nope")


@pytest.mark.parametrize("mode, colour, expected", [
    ("L", 100, (100, 100, 100)),
    ("RGBA", (255, 0, 0, 128), (255, 0, 0)),
    ("RGB", (10, 20, 30), (10, 20, 30)),
])
def test_load_image_converts_to_rgb(tmp_path, mode, colour, expected):
    path = _save(tmp_path / "x.png", Image.new(mode, (12, 12), colour))
    image = load_image(path, 8)
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
    assert image.reshape(3, -1).unique(dim=1).flatten().tolist() == list(expected)


def test_load_image_converts_palette_images(tmp_path):
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 0, 200, 50] + [0] * 762)
    image = load_image(_save(tmp_path / "p.png", palette), 8)
    assert image[:, 0, 0].tolist() == [0, 200, 50]


def test_load_image_resizes_shorter_side_and_center_crops(tmp_path):
    # 40 x 20 image whose column x has value 6 x: resized to 20 x 10, output column j averages original
    # columns 2j and 2j + 1 (value 12 j + 3); the centre crop keeps j = 5..14, values 63 .. 171.
    columns = torch.arange(40, dtype=torch.uint8).mul(6).view(1, 40).expand(20, 40)
    path = _save(tmp_path / "wide.png", Image.fromarray(columns.numpy(), mode="L"))
    image = load_image(path, 10)
    assert image.shape == (3, 10, 10)
    row = image[0, 5].float()
    assert (row.diff() > 0).all()  # still increasing left to right
    assert row.tolist() == pytest.approx([12 * j + 3 for j in range(5, 15)], abs=1.0)


def test_random_crop_is_seeded_and_varies(tmp_path):
    columns = torch.arange(40, dtype=torch.uint8).mul(6).view(1, 40).expand(20, 40)
    path = _save(tmp_path / "wide.png", Image.fromarray(columns.numpy(), mode="L"))
    crops = [load_image(path, 20, center_crop=False, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    again = load_image(path, 20, center_crop=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(crops[0], again)
    left_values = {int(c[0, 0, 0]) for c in crops}
    assert len(left_values) > 2  # different offsets
    assert all(c.shape == (3, 20, 20) for c in crops)


def test_iter_image_folder_labels_batches_and_counts_corrupt_files(tmp_path, capsys):
    for cls, value in (("dogs", 200), ("cats", 50)):
        for i in range(3):
            _save(tmp_path / cls / f"{i}.png", Image.new("RGB", (8, 8), (value,) * 3))
    (tmp_path / "cats" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "dogs" / "broken.png").write_bytes(b"\x89PNG garbage")
    batches = list(iter_image_folder(tmp_path, 4, batch_size=4))
    assert capsys.readouterr().err == (f"warning: skipped unreadable image '{tmp_path}/cats/broken.jpg' (cannot "
                                       f"identify image file '{tmp_path}/cats/broken.jpg') and 1 more under "
                                       f"'{tmp_path}'\n")
    assert [len(x) for x, _ in batches] == [4, 2]
    images, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]  # "cats" < "dogs"
    assert images[:3].eq(50).all() and images[3:].eq(200).all()


def test_flat_folder_has_label_zero(tmp_path):
    for i in range(3):
        _save(tmp_path / f"{i}.png", Image.new("RGB", (8, 8)))
    (labels,) = [y for _, y in iter_image_folder(tmp_path, 8, batch_size=10)]
    assert labels.tolist() == [0, 0, 0]
    assert folder_labels(tmp_path, list_images(tmp_path))[1] == ("",)


def test_to_float_and_back():
    images = torch.tensor([0, 127, 128, 255], dtype=torch.uint8)
    floats = to_float(images)
    assert floats.tolist() == pytest.approx([-1.0, 127 / 127.5 - 1, 128 / 127.5 - 1, 1.0], abs=1e-7)
    assert torch.equal(to_uint8(floats), images)


def test_synthetic_data_spans_brightness_with_tercile_labels():
    data = synthetic_brightness(3000, 16, seed=0)
    assert data.images.shape == (3000, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.class_names == ("dark", "mid", "bright")
    means = to_float(data.images).mean(dim=(1, 2, 3))
    # Labels are brightness terciles of U(-0.9, 0.9): class means -0.6, 0, 0.6, boundaries at +-0.3.
    for label, expected in enumerate((-0.6, 0.0, 0.6)):
        chosen = means[data.labels == label]
        assert abs(chosen.mean().item() - expected) < 0.03
        assert 900 < len(chosen) < 1100
    assert means[data.labels == 0].max() < -0.29 and means[data.labels == 2].min() > 0.29
    assert means.min() < -0.88 and means.max() > 0.88  # near-black to near-white
    assert data.images.min() > 0 and data.images.max() < 255  # nothing clips
    assert to_float(data.images).std(dim=(2, 3)).mean() > 0.05  # images have structure, not flat fields
    assert torch.equal(synthetic_brightness(3000, 16, seed=0).images, data.images)


def test_brightness_terciles_split_by_quantiles():
    levels = torch.tensor([200, 10, 100, 250, 30, 120], dtype=torch.uint8)
    data = InMemoryImages(levels.view(6, 1, 1, 1).expand(6, 3, 2, 2).contiguous(), torch.zeros(6, dtype=torch.long),
                          ("",))
    relabelled = brightness_terciles(data)
    assert relabelled.labels.tolist() == [2, 0, 1, 2, 0, 1] and relabelled.class_names == ("dark", "mid", "bright")
    assert relabelled.images is data.images


def test_in_memory_batch_flips_where_asked():
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).view(2, 3, 2, 2)
    data = InMemoryImages(images, torch.tensor([0, 1]), ("a", "b"))
    batch, labels = data.batch(torch.tensor([1, 0]), flip=torch.tensor([True, False]))
    assert torch.equal(batch[0], images[1].flip(-1)) and torch.equal(batch[1], images[0])
    assert labels.tolist() == [1, 0]
    mirrored = InMemoryImages(images, torch.tensor([0, 1]), ("a", "b"), mirrored=images + 100)
    batch, _ = mirrored.batch(torch.tensor([0, 1]), flip=torch.tensor([True, False]))
    assert torch.equal(batch[0], images[0] + 100) and torch.equal(batch[1], images[1])


def test_load_dataset_rejects_unknown_sources(tmp_path):
    with pytest.raises(ValueError, match="synthetic"):
        load_dataset(str(tmp_path / "missing"), 8)
    with pytest.raises(ValueError, match="download"):
        load_cifar10(tmp_path, 32, download=False)


def test_save_image_grid(tmp_path):
    images = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 3, 4, 4)
    save_image_grid(images, tmp_path / "grid.png", nrow=3)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * 6 + 2, 2 * 6 + 2)
    assert grid.getpixel((2, 2)) == (0, 0, 0) and grid.getpixel((2 + 6 * 1, 2 + 6)) == (255, 255, 255)


def test_save_image_grid_scale_repeats_pixels(tmp_path):
    images = torch.tensor([[-1.0, 1.0], [1.0, -1.0]]).expand(1, 3, 2, 2)  # a 2x2 checkerboard
    save_image_grid(images, tmp_path / "grid.png", nrow=1, scale=3)
    grid = torch.from_numpy(numpy.array(Image.open(tmp_path / "grid.png")))[..., 0]
    assert grid.shape == (2 * 3 + 4, 2 * 3 + 4)
    inner = grid[2:8, 2:8]
    expected = torch.tensor([[0, 255], [255, 0]], dtype=torch.uint8).repeat_interleave(3, 0).repeat_interleave(3, 1)
    assert torch.equal(inner, expected)
    with pytest.raises(ValueError, match="scale"):
        save_image_grid(images, tmp_path / "bad.png", scale=0)


@pytest.mark.skipif(not CIFAR_JPEG.is_dir(), reason=f"CIFAR-10 JPEG folder {CIFAR_JPEG} not present")
def test_cifar10_jpeg_folder_loads_with_class_labels():
    data = load_image_folder(CIFAR_JPEG, 32, max_images=40, progress=False)
    assert data.images.shape == (40, 3, 32, 32)
    assert data.class_names == CIFAR10_CLASSES
    assert data.labels.bincount().tolist() == [4] * 10  # spread evenly over the 10 class folders


def test_lesson_images_fall_back_to_the_embedded_images(tmp_path):
    images, source = lesson_images(5, 8, data_root=tmp_path / "missing")
    assert images.shape == (5, 3, 8, 8) and "synthetic" in source
    assert images.min() >= -1 and images.max() <= 1


def test_lesson_images_read_a_cifar_folder(tmp_path):
    folder = tmp_path / "cifar10-jpeg" / "test" / "cat"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 255)).save(folder / f"{i:04d}.png")
    images, source = lesson_images(2, 16, data_root=tmp_path)
    assert images.shape == (2, 3, 16, 16) and "CIFAR-10" in source
    # files 0 and 3 (spread evenly): red 0 and 180 -> -1 and 180 / 127.5 - 1
    assert images[:, 0, 0, 0].tolist() == pytest.approx([-1.0, 180 / 127.5 - 1], abs=1e-6)
    assert images[:, 2].eq(1.0).all()
