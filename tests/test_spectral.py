"""ldm_lite.spectral: DCT parity with scipy, band definitions, SNR theory, measured vs theoretical correlation."""
import math
from statistics import NormalDist

import numpy as np
import pytest
import scipy.fft
import torch

from ldm_lite import spectral


def linear_alphas_cumprod(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02):
    """DDPM's linear schedule built here in float64 (Ho et al. 2020), independent of ldm_lite.schedules."""
    betas = np.linspace(beta_start, beta_end, num_train_timesteps)
    return torch.from_numpy(np.cumprod(1 - betas))


def bonferroni_z(num_checks, false_alarm=1e-3):
    """Two-sided z bound so that num_checks independent checks all pass with prob. 1 - false_alarm."""
    return NormalDist().inv_cdf(1 - false_alarm / (2 * num_checks))


# ----------------------------------------------------------------------------- DCT

@pytest.mark.parametrize("shape", [(8, 8), (2, 3, 5, 7), (4, 16, 12), (1, 1, 1, 9)])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_dct2_matches_scipy(shape, dtype, tolerance):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = scipy.fft.dctn(x.numpy(), norm="ortho", axes=(-2, -1))
    coeffs = spectral.dct2(x.to(dtype))
    assert coeffs.dtype == dtype and coeffs.shape == x.shape
    np.testing.assert_allclose(coeffs.double().numpy(), expected, atol=tolerance, rtol=0)
    inverse = scipy.fft.idctn(x.numpy(), norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(spectral.idct2(x.to(dtype)).double().numpy(), inverse, atol=tolerance, rtol=0)


def test_idct2_inverts_dct2_and_matrix_is_orthonormal():
    x = torch.randn(3, 2, 6, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert (spectral.idct2(spectral.dct2(x)) - x).abs().max() < 1e-13
    assert (spectral.dct2(spectral.idct2(x)) - x).abs().max() < 1e-13
    matrix = spectral.dct_matrix(10, torch.float64)
    assert (matrix @ matrix.T - torch.eye(10, dtype=torch.float64)).abs().max() < 1e-14
    # DC is sqrt(H W) times the mean; a constant image has no other coefficient
    constant = torch.full((6, 10), 0.3, dtype=torch.float64)
    coeffs = spectral.dct2(constant)
    assert abs(coeffs[0, 0] - 0.3 * math.sqrt(60)) < 1e-13
    assert coeffs.flatten()[1:].abs().max() < 1e-13


def test_dct_matrix_is_cached_per_size_dtype_device():
    assert spectral.dct_matrix(7, torch.float64) is spectral.dct_matrix(7, torch.float64, "cpu")
    assert spectral.dct_matrix(7, torch.float32) is not spectral.dct_matrix(7, torch.float64)


def test_dct2_rejects_integer_input():
    with pytest.raises(ValueError, match="floating"):
        spectral.dct2(torch.zeros(4, 4, dtype=torch.uint8))


def test_dct_basis_is_idct_of_one_hot():
    one_hot = torch.zeros(5, 7, dtype=torch.float64)
    one_hot[2, 3] = 1
    assert (spectral.dct_basis(2, 3, 5, 7) - spectral.idct2(one_hot)).abs().max() < 1e-15


# ----------------------------------------------------------------------------- bands

def test_band_counts_by_hand_on_4x4():
    # radial index on 4x4:  0 1 2 3 / 1 1 2 3 / 2 2 2 3 / 3 3 3 4   (sqrt 18 = 4.24)
    assert spectral.radial_bands(4, 4).tolist() == [[0, 1, 2, 3], [1, 1, 2, 3], [2, 2, 2, 3], [3, 3, 3, 4]]
    assert spectral.band_counts(spectral.radial_bands(4, 4)).tolist() == [1, 3, 5, 6, 1]
    assert spectral.band_counts(spectral.octave_bands(4, 4)).tolist() == [1, 3, 11, 1]  # {0}, {1}, {2,3}, {4}
    assert spectral.band_counts(spectral.equal_width_bands(4, 4, 2)).tolist() == [9, 7]  # indices {0,1,2}, {3,4}


@pytest.mark.parametrize("height, width", [(32, 32), (8, 13), (1, 6)])
def test_bands_match_brute_force(height, width):
    index = np.array([[math.isqrt(u * u + v * v) for v in range(width)] for u in range(height)])
    assert spectral.radial_index(height, width).tolist() == index.tolist()
    octave = np.array([[0 if k == 0 else int(k).bit_length() for k in row] for row in index])
    assert spectral.octave_bands(height, width).tolist() == octave.tolist()
    counts = spectral.band_counts(spectral.radial_bands(height, width))
    assert counts.sum() == height * width and (counts > 0).all()
    for num_bands in (1, 3, int(index.max()) + 1):
        counts = spectral.band_counts(spectral.equal_width_bands(height, width, num_bands))
        assert len(counts) == num_bands and counts.sum() == height * width and (counts > 0).all()


def test_equal_width_bands_rejects_too_many_bands():
    with pytest.raises(ValueError, match="num_bands"):
        spectral.equal_width_bands(4, 4, 6)  # only 5 radial indices
    with pytest.raises(ValueError, match="num_bands"):
        spectral.equal_width_bands(4, 4, 0)


def test_lowest_frequencies_order():
    assert spectral.lowest_frequencies(12, 8, 8) == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (1, 2), (2, 1),
                                                     (2, 2), (0, 3), (3, 0), (1, 3)]
    # same as a stable numpy argsort of the distance map, for a non-square grid too
    height, width = 5, 9
    u, v = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    order = np.argsort(np.sqrt(u ** 2 + v ** 2), axis=None, kind="stable")
    expected = [tuple(int(i) for i in np.unravel_index(k, (height, width))) for k in order]
    assert spectral.lowest_frequencies(height * width, height, width) == expected
    with pytest.raises(ValueError, match="n must be"):
        spectral.lowest_frequencies(0, 4, 4)
    with pytest.raises(ValueError, match="n must be"):
        spectral.lowest_frequencies(17, 4, 4)


def test_band_power_is_mean_squared_coefficient_per_band():
    x = torch.randn(6, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    bands = spectral.octave_bands(8, 8)
    coeffs = scipy.fft.dctn(x.double().numpy(), norm="ortho", axes=(-2, -1))
    power = spectral.band_power(x, bands)
    assert power.shape == (2, 5)  # radial indices 0..9 on 8x8: {0}, {1}, {2,3}, {4..7}, {8,9}
    for band in range(5):
        mask = (bands == band).numpy()
        np.testing.assert_allclose(power[:, band].numpy(), (coeffs[:, :, mask] ** 2).mean(axis=(0, 2)), rtol=1e-12)


# ----------------------------------------------------------------------------- SNR theory

def test_band_snr_closed_form_and_offset_noise():
    alphas_cumprod = linear_alphas_cumprod()
    power = torch.tensor([[50.0, 2.0, 0.01]], dtype=torch.float64)  # (C=1, B=3)
    snr = spectral.band_snr(alphas_cumprod, power)
    assert snr.shape == (1000, 1, 3)
    ab = alphas_cumprod.numpy()[:, None, None]
    np.testing.assert_allclose(snr.numpy(), ab * power.numpy() / (1 - ab), rtol=1e-12)
    # offset noise s adds s^2 H W to the DC coefficient's noise power, shared over its band
    bands = spectral.equal_width_bands(8, 8, 3)
    dc_count = int((bands == 0).sum())
    noise_power = spectral.band_noise_power(bands, offset_noise=0.1)
    np.testing.assert_allclose(noise_power.numpy(), [1 + 0.01 * 64 / dc_count, 1, 1], rtol=1e-14)
    np.testing.assert_allclose(spectral.band_snr(alphas_cumprod, power, noise_power).numpy(),
                               ab * power.numpy() / ((1 - ab) * noise_power.numpy()), rtol=1e-12)
    assert torch.equal(spectral.band_snr(torch.tensor([1.0, 0.0]), torch.tensor([2.0]))[:, 0],
                       torch.tensor([math.inf, 0.0], dtype=torch.float64))
    first = spectral.snr_at(alphas_cumprod, power, 999)
    np.testing.assert_allclose(first.numpy(), ab[999] * power.numpy() / (1 - ab[999]), rtol=1e-12)


def test_destruction_timesteps_brute_force():
    alphas_cumprod = linear_alphas_cumprod()
    power = torch.tensor([[1e4, 300.0, 10.0, 1.0, 0.05], [0.5, 5.0, 1e5, 1e-5, 2e3]], dtype=torch.float64)
    snr = spectral.band_snr(alphas_cumprod, power)
    destroyed = spectral.destruction_timesteps(snr)
    ab = alphas_cumprod.tolist()
    for c in range(2):
        for b in range(5):
            p = float(power[c, b])
            # closed form: destroyed once ab_t < 1 / (1 + P_b); brute force over t
            expected = next((t for t in range(1000) if ab[t] * p / (1 - ab[t]) < 1), 1000)
            assert int(destroyed[c, b]) == expected
            assert expected == next((t for t in range(1000) if ab[t] < 1 / (1 + p)), 1000)
    assert int(destroyed[1, 2]) == 1000  # P = 1e5 survives the linear schedule (SNR at t=999 is ~4)
    assert int(destroyed[1, 3]) == 0


# ----------------------------------------------------------------------------- measured vs theoretical correlation

def conditional_standard_error(power, alpha_bar, noise_power, num_samples):
    """Std of the pooled uncentred correlation over the noise, given x0 (delta method).

    With s^2 = ab, sigma^2 = (1 - ab) N and per-sample power P of the fixed x0:
    Var(r) = sigma^4 (sigma^2 + s^2 P / 2) / (n (s^2 P + sigma^2)^3).
    """
    signal = alpha_bar * power
    noise = (1 - alpha_bar) * noise_power
    return (noise ** 2 * (noise + signal / 2) / (num_samples * (signal + noise) ** 3)).sqrt()


def synthetic_images(num_images, channels, size, dc_mean, seed):
    """Gaussian data with a known radial spectrum: coefficient (u, v) of channel c ~ N(m, A_c / (1 + k)^2),
    k the radial index; only DC has a mean m (dc_mean[c]). Returns x0 (N, C, H, W) and the true power (C, B)."""
    bands = spectral.radial_bands(size, size)
    amplitude = torch.tensor([40.0, 4.0][:channels], dtype=torch.float64)
    variance = amplitude[:, None, None] / (1 + bands.double()) ** 2  # (C, H, W)
    generator = torch.Generator().manual_seed(seed)
    coeffs = torch.randn(num_images, channels, size, size, generator=generator, dtype=torch.float64) * variance.sqrt()
    coeffs[:, :, 0, 0] += torch.tensor(dc_mean, dtype=torch.float64)
    true_power = spectral.band_mean(variance, bands)
    true_power[:, 0] += torch.tensor(dc_mean, dtype=torch.float64) ** 2
    return spectral.idct2(coeffs), true_power, bands


@pytest.mark.parametrize("offset_noise", [0.0, 0.1])
def test_measured_correlation_matches_theory(offset_noise):
    size, num_images = 16, 400
    x0, true_power, bands = synthetic_images(num_images, 2, size, dc_mean=[3.0, -1.0], seed=3)
    alphas_cumprod = linear_alphas_cumprod()
    timesteps = [0, 50, 200, 400, 600, 800, 999]
    result = spectral.measure_band_correlation(x0, alphas_cumprod, timesteps, bands,
                                               generator=torch.Generator().manual_seed(4), offset_noise=offset_noise)
    num_bands = int(bands.max()) + 1
    assert result["correlation"].shape == result["theory"].shape == (len(timesteps), 2, num_bands)
    counts = spectral.band_counts(bands).double()
    noise_power = spectral.band_noise_power(bands, offset_noise)
    z = bonferroni_z(result["correlation"].numel() + true_power.numel())

    # the data's power agrees with the known spectrum: Var(c^2) = 2 v^2 + 4 m^2 v for c ~ N(m, v)
    mean_sq = torch.tensor([3.0, -1.0], dtype=torch.float64)[:, None] ** 2 * (torch.arange(num_bands) == 0)
    variance = true_power - mean_sq
    power_error = ((2 * variance ** 2 + 4 * mean_sq * variance) / (num_images * counts)).sqrt()
    assert ((result["power"] - true_power).abs() <= z * power_error).all()

    # measured correlation vs sqrt(S / (1 + S)), within the noise-induced sampling error
    ab = alphas_cumprod[result["timesteps"]].reshape(-1, 1, 1)
    error = conditional_standard_error(result["power"], ab, noise_power, num_images * counts)
    deviation = (result["correlation"] - result["theory"]).abs()
    assert (deviation <= z * error).all(), float((deviation / error).max())
    # against the theory from the true spectrum, x0's own sampling error adds (d theory / d P)^2 Var(P)
    true_snr = spectral.band_snr(alphas_cumprod[result["timesteps"]], true_power, noise_power)
    slope = true_snr / true_power / (2 * true_snr.sqrt() * (1 + true_snr) ** 1.5)  # dS/dP * d sqrt(S/(1+S))/dS
    total_error = (error ** 2 + (slope * power_error) ** 2).sqrt()
    deviation = (result["correlation"] - spectral.expected_correlation(true_snr)).abs()
    assert (deviation <= z * total_error).all(), float((deviation / total_error).max())

def test_offset_noise_hides_the_dc_band_sooner():
    x0, _, bands = synthetic_images(300, 1, 8, dc_mean=[2.0], seed=5)
    alphas_cumprod = linear_alphas_cumprod()
    kwargs = dict(timesteps=[500], bands=bands)
    plain = spectral.measure_band_correlation(x0, alphas_cumprod, generator=torch.Generator().manual_seed(6), **kwargs)
    offset = spectral.measure_band_correlation(x0, alphas_cumprod, generator=torch.Generator().manual_seed(6),
                                               offset_noise=0.5, **kwargs)
    # DC noise power 1 + 0.25 * 64 = 17: the DC correlation drops, the other bands are untouched
    assert float(offset["snr"][0, 0, 0]) == pytest.approx(float(plain["snr"][0, 0, 0]) / 17, rel=1e-12)
    assert offset["correlation"][0, 0, 0] < plain["correlation"][0, 0, 0] - 0.1
    assert torch.equal(offset["snr"][0, 0, 1:], plain["snr"][0, 0, 1:])
