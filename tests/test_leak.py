"""ldm_lite.leak: signal-leak statistics vs an independent numpy/scipy reference, sampling, control, files."""
import warnings
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import scipy.fft
import torch
from PIL import Image

from ldm_lite.data import load_image_folder, to_float
from ldm_lite.leak import LeakStats

COCO128 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128"  # beside the repository
KINDS = ("pixel", "dct", "dct+pixel")


def correlated_data(num_images=400, channels=3, size=8, seed=0):
    """Images (N, C, H, W) in [-1, 1] with a per-image brightness shared by the channels (so the DC
    coefficients correlate across channels), a per-channel tint, and a smooth random pattern."""
    g = torch.Generator().manual_seed(seed)
    brightness = 0.4 * torch.randn(num_images, 1, 1, 1, generator=g, dtype=torch.float64)
    tint = 0.15 * torch.randn(num_images, channels, 1, 1, generator=g, dtype=torch.float64)
    pattern = torch.nn.functional.avg_pool2d(torch.randn(num_images, channels, size + 2, size + 2, generator=g,
                                                         dtype=torch.float64), 3, stride=1)
    return torch.tanh(brightness + tint + 0.5 * pattern + torch.tensor([0.2, -0.1, 0.0][:channels]).view(1, -1, 1, 1))


def reference_stats(x: np.ndarray, n_components: int) -> dict:
    """The paper's statistics computed with numpy/scipy: stable argsort of the radial distance, ortho DCT,
    vector layout component-major (index k * C + c), numpy.cov, unbiased variance."""
    num_images, channels, height, width = x.shape
    u, v = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    order = np.argsort(np.sqrt(u ** 2 + v ** 2), axis=None, kind="stable")[:n_components]
    us, vs = np.unravel_index(order, (height, width))
    coeffs = scipy.fft.dctn(x, axes=(-2, -1), norm="ortho")
    low = coeffs[:, :, us, vs]  # (N, C, n)
    kept = np.zeros_like(coeffs)
    kept[:, :, us, vs] = low
    remainder = x - scipy.fft.idctn(kept, axes=(-2, -1), norm="ortho")
    vector = low.transpose(0, 2, 1).reshape(num_images, n_components * channels)
    return {"low_mean": vector.mean(axis=0), "low_cov": np.cov(vector, rowvar=False),
            "remainder_mean": remainder.mean(axis=0), "remainder_var": remainder.var(axis=0, ddof=1),
            "pixel_mean": x.mean(axis=0), "pixel_var": x.var(axis=0, ddof=1), "frequencies": list(zip(us, vs))}


def low_basis(stats: LeakStats) -> np.ndarray:
    """Matrix (C*H*W, n*C) whose column k*C + c is the image of a unit coefficient at frequency k, channel c."""
    channels, height, width = stats.shape
    columns = []
    for u, v in stats.frequencies:
        for c in range(channels):
            coeffs = np.zeros(stats.shape)
            coeffs[c, u, v] = 1
            columns.append(scipy.fft.idctn(coeffs, axes=(-2, -1), norm="ortho").ravel())
    return np.stack(columns, axis=1)


def bonferroni_z(num_checks, false_alarm=1e-3):
    """Two-sided z bound so that num_checks checks all pass with probability 1 - false_alarm."""
    return NormalDist().inv_cdf(1 - false_alarm / (2 * num_checks))


# ----------------------------------------------------------------------------- fitting

@pytest.mark.parametrize("kind", KINDS)
def test_fit_matches_numpy_reference(kind):
    x = correlated_data()
    stats = LeakStats.fit(x, kind=kind, n_components=4)
    ref = reference_stats(x.numpy(), 4)
    assert stats.shape == (3, 8, 8) and stats.num_images == 400 and stats.shrinkage == 0.0
    tol = dict(atol=1e-10, rtol=0)  # float64 throughout; the brief asks 1e-5
    if kind == "pixel":
        assert stats.n_components == 0 and stats.low_mean is None
        np.testing.assert_allclose(stats.element_mean.numpy(), ref["pixel_mean"], **tol)
        np.testing.assert_allclose(stats.element_var.numpy(), ref["pixel_var"], **tol)
        return
    assert stats.frequencies == [(int(u), int(v)) for u, v in ref["frequencies"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    np.testing.assert_allclose(stats.low_mean.numpy(), ref["low_mean"], **tol)
    np.testing.assert_allclose(stats.low_cov.numpy(), ref["low_cov"], **tol)
    if kind == "dct":
        assert stats.element_mean is None
    else:
        np.testing.assert_allclose(stats.element_mean.numpy(), ref["remainder_mean"], **tol)
        np.testing.assert_allclose(stats.element_var.numpy(), ref["remainder_var"], **tol)
    # the brightness shared by the channels shows as a strong DC correlation between channels
    dc_cov = stats.low_cov[:3, :3]
    assert dc_cov[0, 1] / (dc_cov[0, 0] * dc_cov[1, 1]).sqrt() > 0.5


def test_fit_batches_streams_to_the_same_statistics():
    x = correlated_data(num_images=103)
    whole = LeakStats.fit(x, kind="dct+pixel", n_components=5)
    chunks = [x[:1], x[1:40], x[40:41], x[41:]]
    streamed = LeakStats.fit_batches(chunks, kind="dct+pixel", n_components=5)
    assert streamed.num_images == 103
    for name in ("element_mean", "element_var", "low_mean", "low_cov"):
        assert (getattr(streamed, name) - getattr(whole, name)).abs().max() < 1e-12, name


# ----------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("kind", KINDS)
def test_sampled_leaks_have_the_fitted_moments(kind):
    stats = LeakStats.fit(correlated_data(channels=2, size=6), kind=kind, n_components=4)
    n = 20_000
    samples = stats.sample(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert samples.shape == (n, 2, 6, 6)
    flat = samples.flatten(1).numpy()

    # expected per-element moments: mean = B mu + m, var = diag(B Sigma B^T) + v (B: low-frequency basis)
    mean, var = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
    if kind != "pixel":
        basis, mu, sigma = low_basis(stats), stats.low_mean.numpy(), stats.low_cov.numpy()
        mean += basis @ mu
        var += np.einsum("id,de,ie->i", basis, sigma, basis)
    if kind != "dct":
        mean += stats.element_mean.numpy().ravel()
        var += stats.element_var.numpy().ravel()
    checks = [(flat.mean(axis=0), mean, np.sqrt(var / n)), (flat.var(axis=0, ddof=1), var, var * np.sqrt(2 / (n - 1)))]

    if kind != "pixel":
        # low-frequency coefficients: the Gaussian plus, for dct+pixel, the remainder's share B^T r
        coeffs = flat @ basis  # basis columns are orthonormal, so this reads the coefficients
        low_mean, low_cov = mu.copy(), sigma.copy()
        if kind == "dct+pixel":
            low_mean += basis.T @ stats.element_mean.numpy().ravel()
            low_cov += basis.T @ (stats.element_var.numpy().ravel()[:, None] * basis)
        diag = np.diag(low_cov)
        cov_error = np.sqrt((np.outer(diag, diag) + low_cov ** 2) / (n - 1))
        checks += [(coeffs.mean(axis=0), low_mean, np.sqrt(diag / n)),
                   (np.cov(coeffs, rowvar=False), low_cov, cov_error)]
        if kind == "dct":  # nothing outside the modelled frequencies
            assert np.abs(flat - coeffs @ basis.T).max() < 1e-12
    z = bonferroni_z(sum(expected.size for _, expected, _ in checks))
    for measured, expected, error in checks:
        assert np.all(np.abs(measured - expected) <= z * error), np.max(np.abs(measured - expected) / error)


def test_sample_is_seeded_and_float32_by_default():
    stats = LeakStats.fit(correlated_data(num_images=50), kind="dct+pixel", n_components=3)
    a = stats.sample(4, generator=torch.Generator().manual_seed(7))
    b = stats.sample(4, generator=torch.Generator().manual_seed(7))
    c = stats.sample(4, generator=torch.Generator().manual_seed(8))
    assert a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- manual control

def test_with_components_conditions_the_gaussian_and_sets_values_exactly():
    stats = LeakStats.fit(correlated_data(), kind="dct+pixel", n_components=3)
    fixed = {(0, (0, 0)): -3.0, (2, (1, 0)): 0.8, (1, (3, 3)): 0.25}  # (3, 3) is not modelled: simply set
    controlled = stats.with_components(fixed)
    assert stats.fixed == {} and controlled.fixed == fixed
    samples = controlled.sample(5000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    coeffs = scipy.fft.dctn(samples.numpy(), axes=(-2, -1), norm="ortho")
    for (c, (u, v)), value in fixed.items():
        assert np.abs(coeffs[:, c, u, v] - value).max() < 1e-12

    # conditional Gaussian vs numpy's Schur complement; vector index k * C + c: (0, DC) -> 0, (2, (1, 0)) -> 8
    mu, sigma = stats.low_mean.numpy(), stats.low_cov.numpy()
    f, r = [0, 8], [i for i in range(9) if i not in (0, 8)]
    gain = sigma[np.ix_(r, f)] @ np.linalg.inv(sigma[np.ix_(f, f)])
    expected_mean = mu[r] + gain @ (np.array([-3.0, 0.8]) - mu[f])
    expected_cov = sigma[np.ix_(r, r)] - gain @ sigma[np.ix_(f, r)]
    mean, cov = controlled.low_frequency_gaussian()
    np.testing.assert_allclose(mean.numpy()[r], expected_mean, atol=1e-10, rtol=0)
    np.testing.assert_allclose(mean.numpy()[f], [-3.0, 0.8], atol=0, rtol=0)
    np.testing.assert_allclose(cov.numpy()[np.ix_(r, r)], expected_cov, atol=1e-10, rtol=0)
    assert np.all(cov.numpy()[f] == 0) and np.all(cov.numpy()[:, f] == 0)
    # a dark channel 0 darkens the correlated channels' DC (shared brightness), and samples follow
    assert expected_mean[0] < mu[1] and expected_mean[1] < mu[2]  # indices 1, 2 = DC of channels 1, 2
    dc = coeffs[:, [1, 2], 0, 0]  # includes the remainder's DC share, whose variance is the mean element variance
    remainder_var = stats.element_var.numpy()[[1, 2]].mean(axis=(-2, -1))
    error = np.sqrt((np.diag(expected_cov)[:2] + remainder_var) / len(dc))
    assert np.all(np.abs(dc.mean(axis=0) - expected_mean[:2]) <= bonferroni_z(2) * error)


@pytest.mark.parametrize("kind", KINDS)
def test_with_channel_mean_sets_the_sample_channel_mean_exactly(kind):
    stats = LeakStats.fit(correlated_data(num_images=100), kind=kind, n_components=3).with_channel_mean(1, 0.37)
    assert stats.fixed == {(1, (0, 0)): 0.37 * 8}  # DC = mean * sqrt(H W)
    samples = stats.sample(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert (samples[:, 1].mean(dim=(-2, -1)) - 0.37).abs().max() < 1e-13
    assert samples[:, 1].std() > 0.05  # the rest of the leak still varies
    brighter = stats.with_channel_mean(1, 0.9).sample(64, generator=torch.Generator().manual_seed(3),
                                                      dtype=torch.float64)
    assert (brighter[:, 1].mean(dim=(-2, -1)) - 0.9).abs().max() < 1e-13


# ----------------------------------------------------------------------------- files

@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path, kind):
    stats = LeakStats.fit(correlated_data(num_images=60), kind=kind, n_components=5, space="latent", resolution=64,
                          scaling_factor=0.18215).with_components({(2, (0, 1)): -1.25})
    stats.save(tmp_path / "leak.safetensors")
    loaded = LeakStats.load(tmp_path / "leak.safetensors")
    for name in ("kind", "shape", "n_components", "num_images", "space", "resolution", "scaling_factor",
                 "shrinkage", "fixed"):
        assert getattr(loaded, name) == getattr(stats, name), name
    for name in ("element_mean", "element_var", "low_mean", "low_cov"):
        original, restored = getattr(stats, name), getattr(loaded, name)
        assert (original is None and restored is None) or (restored.dtype == torch.float64
                                                            and torch.equal(original, restored)), name
    seeded = [s.sample(3, torch.Generator().manual_seed(0)) for s in (stats, loaded)]
    assert torch.equal(*seeded)


def test_load_rejects_other_safetensors_files(tmp_path):
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a signal-leak statistics file"):
        LeakStats.load(tmp_path / "other.safetensors")


# ----------------------------------------------------------------------------- errors and edge cases

def test_rank_deficient_covariance_warns_and_is_shrunk():
    x = correlated_data(num_images=5)  # D = 3 components x 3 channels = 9 > N - 1 = 4
    with pytest.warns(UserWarning, match="rank-deficient"):
        stats = LeakStats.fit(x, kind="dct+pixel", n_components=3)
    sample_cov = reference_stats(x.numpy(), 3)["low_cov"]
    assert np.linalg.matrix_rank(sample_cov) == 4
    assert 0 < stats.shrinkage <= 1
    np.testing.assert_allclose(np.diag(stats.low_cov.numpy()), np.diag(sample_cov), rtol=1e-12)  # variances kept
    off = ~np.eye(9, dtype=bool)
    np.testing.assert_allclose(stats.low_cov.numpy()[off], (1 - stats.shrinkage) * sample_cov[off], atol=1e-14)
    assert torch.linalg.eigvalsh(stats.low_cov).min() > 0  # full rank now
    assert torch.isfinite(stats.sample(8, torch.Generator().manual_seed(0))).all()
    with warnings.catch_warnings():  # N = D + 1 is full rank: no warning, no shrinkage
        warnings.simplefilter("error")
        assert LeakStats.fit(correlated_data(num_images=10), kind="dct", n_components=3).shrinkage == 0.0


def test_bad_arguments_raise_clear_errors():
    x = correlated_data(num_images=20, size=4)
    with pytest.raises(ValueError, match="kind must be one of"):
        LeakStats.fit(x, kind="fourier")
    for bad in (0, 17, 2.5):
        with pytest.raises(ValueError, match="n_components must be"):
            LeakStats.fit(x, kind="dct+pixel", n_components=bad)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        LeakStats.fit(x[0], kind="pixel")
    with pytest.raises(ValueError, match="float"):
        LeakStats.fit((x * 127.5 + 127.5).to(torch.uint8), kind="pixel")
    with pytest.raises(ValueError, match="at least 2 images"):
        LeakStats.fit(x[:1], kind="pixel")
    with pytest.raises(ValueError, match="share"):
        LeakStats.fit_batches([x, x[:, :2]], kind="pixel")
    stats = LeakStats.fit(x, kind="dct", n_components=2)
    with pytest.raises(ValueError, match="outside channels"):
        stats.with_components({(3, (0, 0)): 1.0})
    with pytest.raises(ValueError, match="outside channels"):
        stats.with_components({(0, (4, 0)): 1.0})
    with pytest.raises(ValueError, match=r"\(channel, \(u, v\)\)"):
        stats.with_components({0: 1.0})
    with pytest.raises(ValueError, match="n must be"):
        stats.sample(0)
    with pytest.raises(ValueError, match="has no low-frequency"):
        LeakStats.fit(x, kind="pixel").low_frequency_gaussian()


def test_check_shape_names_expected_and_actual():
    stats = LeakStats.fit(correlated_data(num_images=20, size=4), kind="pixel", resolution=4)
    stats.check_shape((3, 4, 4))
    stats.check_shape((7, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(3, 4, 4\).*\(2, 4, 4, 4\)"):
        stats.check_shape((2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(3, 4, 4\).*\(1, 3, 8, 8\)"):
        stats.check_shape((1, 3, 8, 8))


# ----------------------------------------------------------------------------- image folders

class TinyVAE(torch.nn.Module):
    """Stand-in with the VAE interface fit_folder uses: to_latents(images in [-1, 1]) and scaling_factor."""
    scaling_factor = 0.5

    def __init__(self):
        super().__init__()
        self.project = torch.nn.Conv2d(3, 4, kernel_size=4, stride=4)
        torch.nn.init.constant_(self.project.weight, 1 / 48)
        torch.nn.init.zeros_(self.project.bias)

    def to_latents(self, images):
        return self.project(images) * self.scaling_factor


def write_images(folder: Path, count: int) -> None:
    g = torch.Generator().manual_seed(0)
    folder.mkdir()
    for i in range(count):
        pixels = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i:02d}.png")


def test_fit_folder_streams_images_and_latents(tmp_path):
    write_images(tmp_path / "images", 7)
    stats = LeakStats.fit_folder(tmp_path / "images", 16, batch_size=3, kind="dct+pixel", n_components=2,
                                 progress=False)
    images = to_float(load_image_folder(tmp_path / "images", 16, progress=False).images)
    expected = LeakStats.fit(images, kind="dct+pixel", n_components=2)
    assert (stats.space, stats.resolution, stats.scaling_factor, stats.num_images) == ("pixel", 16, None, 7)
    assert (stats.low_cov - expected.low_cov).abs().max() < 1e-10
    assert (stats.element_var - expected.element_var).abs().max() < 1e-10

    vae = TinyVAE()
    latent = LeakStats.fit_folder(tmp_path / "images", 16, vae=vae, batch_size=4, kind="pixel", progress=False)
    assert (latent.space, latent.scaling_factor, latent.shape) == ("latent", 0.5, (4, 4, 4))
    with torch.no_grad():
        latents = vae.to_latents(images)
    assert (latent.element_mean - latents.double().mean(dim=0)).abs().max() < 1e-6  # float32 encoder


@pytest.mark.skipif(not COCO128.is_dir(), reason=f"real-data test needs {COCO128}")
def test_fit_folder_on_coco128():
    stats = LeakStats.fit_folder(COCO128, 64, batch_size=32, kind="dct+pixel", n_components=3, progress=False)
    assert stats.num_images >= 100 and stats.shape == (3, 64, 64) and stats.shrinkage == 0.0
    dc_var = stats.low_cov.diagonal()[:3]  # DC of each channel
    assert (dc_var > 0).all()
    channel_means = stats.low_mean[:3] / 64  # DC / sqrt(H W)
    assert ((channel_means > -1) & (channel_means < 1)).all()
    # the DC carries the per-image brightness spread that the per-element remainder cannot
    assert (dc_var > stats.element_var.mean(dim=(-2, -1))).all()
