"""ldm_lite.metrics: W1 / KS against scipy.stats, brightness and spectrum on constructed cases, the band analysis,
and exposure bias (eps-norm, delta_t, eps-scale scan) on oracle models whose behaviour is known exactly."""
import math

import pytest
import scipy.stats
import torch

from ldm_lite import DDIMScheduler, DDPMScheduler, exposure, metrics, spectral
from ldm_lite.oracle import GaussianMixtureDenoiser
from ldm_lite.schedules import named_alphas_cumprod


pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------- W1 and KS


def _samples(case):
    g = torch.Generator().manual_seed(case)
    if case == 0:  # same size, continuous
        return torch.randn(300, generator=g), 0.5 + 1.3 * torch.randn(300, generator=g)
    if case == 1:  # different sizes and spreads
        return torch.randn(57, generator=g), 2 * torch.rand(1000, generator=g)
    if case == 2:  # many ties (discrete values), shared between the samples
        return torch.randint(0, 5, (200,), generator=g).float(), torch.randint(1, 7, (333,), generator=g).float()
    return torch.tensor([0.25]), torch.tensor([-1.0, 3.0])  # tiny


@pytest.mark.parametrize("case", range(4))
def test_wasserstein_and_ks_match_scipy(case):
    a, b = _samples(case)
    expected_w1 = scipy.stats.wasserstein_distance(a.numpy(), b.numpy())
    expected_ks = scipy.stats.ks_2samp(a.numpy(), b.numpy()).statistic
    assert metrics.wasserstein_1d(a, b) == pytest.approx(expected_w1, rel=1e-12, abs=1e-12)
    assert metrics.ks_statistic(a, b) == pytest.approx(expected_ks, rel=1e-12, abs=1e-12)
    assert metrics.wasserstein_1d(a, a) == 0.0 and metrics.ks_statistic(a, a) == 0.0


def test_wasserstein_of_a_shift_is_the_shift():
    a = torch.randn(500, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert metrics.wasserstein_1d(a, a + 0.37) == pytest.approx(0.37, abs=1e-12)


# ----------------------------------------------------------------------------- brightness


def brightness_images(brightness, seed=0, size=8):
    """Images (N, 3, size, size): zero-mean pattern per image plus a per-image, per-channel brightness (N, 3)."""
    g = torch.Generator().manual_seed(seed)
    pattern = 0.1 * torch.randn(len(brightness), 3, size, size, generator=g, dtype=torch.float64)
    pattern -= pattern.mean(dim=(2, 3), keepdim=True)
    return brightness[:, :, None, None] + pattern


def test_image_brightness_channel_means_and_luminance():
    colours = torch.tensor([[0.5, -0.5, 0.0], [1.0, 1.0, 1.0], [-1.0, 0.2, 0.6]], dtype=torch.float64)
    values = metrics.image_brightness(brightness_images(colours))
    for c, name in enumerate("RGB"):
        torch.testing.assert_close(values[name], colours[:, c], atol=1e-12, rtol=0)
    torch.testing.assert_close(values["luminance"], colours @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64),
                               atol=1e-12, rtol=0)
    # uint8 in [0, 255] is read as (v / 127.5 - 1)
    as_uint8 = metrics.image_brightness(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8))
    assert as_uint8["R"].tolist() == [1.0, 1.0]
    latent = metrics.image_brightness(torch.ones(2, 4, 4, 4))
    assert list(latent) == ["c0", "c1", "c2", "c3", "mean"]


def test_brightness_report_detects_a_squeeze_toward_grey():
    g = torch.Generator().manual_seed(1)
    data_brightness = torch.rand(400, 3, generator=g, dtype=torch.float64) * 1.6 - 0.8
    data = brightness_images(data_brightness, seed=2)
    samples = brightness_images(0.5 * data_brightness[:250], seed=3)  # same brightness, squeezed by half
    report = metrics.brightness_report(samples, data)
    assert [row["quantity"] for row in report["rows"]] == ["R", "G", "B", "luminance"]
    for row in report["rows"]:
        a, b = report["samples"][row["quantity"]].numpy(), report["data"][row["quantity"]].numpy()
        ratio = a.std(ddof=1) / b.std(ddof=1)
        assert row["std_ratio"] == pytest.approx(ratio, rel=1e-12)
        assert row["wasserstein"] == pytest.approx(scipy.stats.wasserstein_distance(a, b), rel=1e-12)
        assert row["ks"] == pytest.approx(scipy.stats.ks_2samp(a, b).statistic, rel=1e-12)
    rgb = report["rows"][:3]
    # squeezing by 0.5 halves the std (up to the subset of 250 of the 400 brightness values: +-10 %)
    assert all(0.4 < row["std_ratio"] < 0.6 for row in rgb)
    assert all(row["ks"] > 0.15 for row in rgb)  # the distributions differ clearly
    same = metrics.brightness_report(data, data)
    assert all(row["std_ratio"] == 1.0 and row["wasserstein"] == 0.0 for row in same["rows"])


# ----------------------------------------------------------------------------- spectrum


def test_radial_power_spectrum_of_basis_images_and_parseval():
    size = 8
    images = torch.stack([torch.stack([spectral.dct_basis(u, v, size, size)] * 3) for u, v in [(0, 3), (2, 2)]])
    power = metrics.radial_power_spectrum(images)  # (K,)
    counts = spectral.band_counts(spectral.radial_index(size, size)).double()
    expected = torch.zeros_like(power)
    expected[3] += 0.5 / counts[3]  # (0, 3): radius 3; one of the two images
    expected[2] += 0.5 / counts[2]  # (2, 2): radius floor(2.83) = 2
    torch.testing.assert_close(power, expected, atol=1e-14, rtol=0)
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    energy = x.pow(2).sum(dim=(2, 3)).mean()
    assert float((metrics.radial_power_spectrum(x) * counts).sum()) == pytest.approx(float(energy), rel=1e-12)


def test_spectrum_report_log_ratio():
    data = torch.randn(20, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    report = metrics.spectrum_report(2 * data, data)  # power x4 in every band
    torch.testing.assert_close(report["log10_ratio"], torch.full_like(report["samples"], math.log10(4)))
    assert [row["k_min"] for row in report["rows"]] == [0, 1, 2, 4, 8, 16]
    assert all(row["log10_ratio"] == pytest.approx(math.log10(4)) for row in report["rows"])
    with pytest.raises(ValueError, match="same"):
        metrics.spectrum_report(data[:, :, :8, :8], data)


# ----------------------------------------------------------------------------- band analysis


def test_band_analysis_numbers():
    from ldm_lite.data import synthetic_brightness, to_float
    x0 = to_float(synthetic_brightness(256, 16, seed=0).images)
    schedules = named_alphas_cumprod(["linear", "scaled_linear_zero_snr"])
    result = metrics.band_analysis(x0, schedules=schedules, offset_noise=0.1,
                                   generator=torch.Generator().manual_seed(0))
    octaves = spectral.octave_bands(16, 16)
    power = spectral.band_power(x0, octaves)
    torch.testing.assert_close(result["power"][:3], power)
    torch.testing.assert_close(result["power"][3], power.mean(dim=0))
    assert result["channels"] == ["R", "G", "B", "all"]
    linear = schedules["linear"]
    # leak: leading spacing with offset 1 starts at 981; SNR = ab P / (1 - ab) with white noise
    leak = result["leak"]["linear", "leading", "white"]
    assert leak["t0"] == 981
    torch.testing.assert_close(leak["snr"], linear[981] * result["power"] / (1 - linear[981]))
    # offset noise raises the DC noise power from 1 to 1 + s^2 H W (the DC band holds one coefficient)
    offset = result["leak"]["linear", "leading", "offset 0.1"]["snr"]
    torch.testing.assert_close(offset[:, 0], leak["snr"][:, 0] / (1 + 0.01 * 256))
    torch.testing.assert_close(offset[:, 1:], leak["snr"][:, 1:])
    # zero terminal SNR with trailing spacing starts at t = 999, where nothing is left
    assert result["leak"]["scaled_linear_zero_snr", "trailing", "white"]["snr"].abs().max() == 0
    # destruction: first t where SNR < 1; DC of this bright/dark data survives longest; offset noise shortens DC
    destruction = result["destruction"]["linear", "white"]
    snr = result["snr"]["linear"]
    for c in range(4):
        for b in range(6):
            t = int(destruction[c, b])
            assert snr[t, c, b] < 1 and (t == 0 or snr[t - 1, c, b] >= 1)
    assert int(destruction[3, 0]) == int(destruction[3].max())
    assert result["destruction"]["linear", "offset 0.1"][3, 0] < destruction[3, 0]
    # measured correlation follows sqrt(S / (1 + S)); its sampling error is at most ~1 / sqrt(m) for m = 256 x
    # (coefficients in the band) pooled values: allow 5 standard errors
    correlation = result["correlation"]
    tolerance = 5 / (256 * result["band_counts"].double()).sqrt()
    assert ((correlation["correlation"] - correlation["theory"]).abs() < tolerance).all()
    tables = metrics.band_tables(result)
    assert len(tables["power"]) == 4 * 6
    assert len(tables["leak"]) == 4 * 6 * 2 * 3 * 2  # channels x bands x schedules x spacings x noises
    assert len(tables["correlation"]) == 12 * 3 * 6


# ----------------------------------------------------------------------------- exposure bias on oracles

MU, SIGMA, SHAPE, N = 0.3, 0.5, (3, 8, 8), 512


def gaussian_data(n=N, seed=1234):
    """x0 ~ N(MU, SIGMA^2) per element, (n, 3, 8, 8) float32."""
    return MU + SIGMA * torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


class GaussianOracle:
    """The exact E[eps | x_t] for x0 ~ N(mu, s^2) per element.

    eps and x_t = sqrt(ab) x0 + sqrt(1 - ab) eps are jointly Gaussian with Cov(eps, x_t) = sqrt(1 - ab) and
    Var(x_t) = V = ab s^2 + 1 - ab, so E[eps | x_t] = sqrt(1 - ab) / V * (x_t - sqrt(ab) mu): linear in x_t.
    """

    def __init__(self, alphas_cumprod, mu=MU, sigma=SIGMA):
        self.alphas_cumprod, self.mu, self.sigma = alphas_cumprod.double(), mu, sigma

    def variance(self, t):
        ab = self.alphas_cumprod[t]
        return ab * self.sigma ** 2 + 1 - ab

    def __call__(self, x, timesteps, class_labels=None):
        ab = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        variance = self.variance(timesteps).view(-1, 1, 1, 1)
        return ((1 - ab).sqrt() / variance * (x.double() - ab.sqrt() * self.mu)).float()


class KnownX0Oracle:
    """Predicts the noise exactly because it knows the x0 behind each row of the batch (no prediction error, the
    e_t = 0 case of Ning et al. sec. 4): eps = scale * (x_t - sqrt(ab) x0) / sqrt(1 - ab)."""

    def __init__(self, alphas_cumprod, x0, scale=1.0):
        self.alphas_cumprod, self.x0, self.scale = alphas_cumprod.double(), x0.double(), scale

    def __call__(self, x, timesteps, class_labels=None):
        assert x.shape == self.x0.shape, "run with batch_size >= len(x0): rows must line up with x0"
        ab = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return (self.scale * (x.double() - ab.sqrt() * self.x0) / (1 - ab).sqrt()).float()


def make_scheduler(name, steps):
    scheduler = (DDIMScheduler if name == "ddim" else DDPMScheduler)(clip_sample=False)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_no_prediction_error_gives_zero_delta_and_matching_eps_norms(sampler):
    x0 = gaussian_data()
    scheduler = make_scheduler(sampler, 20)
    result = exposure.exposure_bias(KnownX0Oracle(scheduler.alphas_cumprod, x0), scheduler, x0, batch_size=N,
                                   progress=False)
    # sigma_hat_t / sqrt(1 - ab_t): sampling error of a std over 512 samples averaged over 192 elements is ~0.2 %
    # (DDPM); DDIM replays the same eps exactly. 1.5 % bounds both, so delta_t <= (0.015 sqrt(1 - ab_t))^2.
    ratio = result["residual_std"] / result["target_std"]
    assert (ratio - 1).abs().max() < 0.015, ratio
    assert (result["delta"] <= (0.015 * result["target_std"]) ** 2).all()
    # eps-norm: mean of 512 per-image norms (relative std 1 / sqrt(2 * 192) each) -> ~0.3 % per curve
    eps_ratio = result["eps_norm_sampling"] / result["eps_norm_forward"]
    assert (eps_ratio - 1).abs().max() < 0.015, eps_ratio
    assert result["eps_norm_forward"].mean() == pytest.approx(math.sqrt(3 * 8 * 8), rel=0.01)  # ||N(0, I_192)||
    # delta of an ideal sampler that forgot x0: std sqrt(1 - ab + 2 ab s^2) per element
    ab = result["alphas_cumprod"]
    expected_reference = ((1 - ab + 2 * ab * SIGMA ** 2).sqrt() - (1 - ab).sqrt()) ** 2
    torch.testing.assert_close(result["delta_reference"].sqrt(), expected_reference.sqrt(), atol=0.01, rtol=0.03)


def affine_step(scheduler, oracle, t):
    """The oracle's step is affine per element: x_prev - sqrt(ab_prev) mu = gain (x_t - sqrt(ab_t) mu) + std z.
    Read gain and std off scheduler.step (the sampler under test is not re-derived here)."""
    ab = float(scheduler.alphas_cumprod[t].double())
    x = (math.sqrt(ab) * MU + torch.tensor([0.0, 1.0])).view(2, 1, 1, 1)
    timesteps = torch.full((2,), t)

    def step(noise):
        kwargs = {"variance_noise": torch.full_like(x, noise)} if isinstance(scheduler, DDPMScheduler) else {}
        return scheduler.step(oracle(x, timesteps), t, x, **kwargs).prev_sample.double().flatten()

    quiet, noisy = step(0.0), step(1.0)
    return float(quiet[1] - quiet[0]), float(noisy[0] - quiet[0])


def predicted_chain(scheduler, oracle):
    """Exact per-element moments along the discrete chain started at x_T = sqrt(ab_T) x0 + sqrt(1 - ab_T) eps:
    Var(x_hat_t) and Cov(x_hat_t, x0) propagate through the affine steps. Returns (eps-norm ratio sampling /
    forward = sqrt(Var / V_t), std of x_hat_t - sqrt(ab_t) x0) per sampled timestep."""
    timesteps = scheduler.timesteps.tolist()
    ab0 = float(scheduler.alphas_cumprod[timesteps[0]].double())
    variance, covariance = ab0 * SIGMA ** 2 + 1 - ab0, math.sqrt(ab0) * SIGMA ** 2
    ratios, residual_stds = [], []
    for t in timesteps:
        ab = float(scheduler.alphas_cumprod[t].double())
        ratios.append(math.sqrt(variance / float(oracle.variance(t))))
        residual_stds.append(math.sqrt(variance - 2 * math.sqrt(ab) * covariance + ab * SIGMA ** 2))
        gain, std = affine_step(scheduler, oracle, t)
        variance, covariance = gain ** 2 * variance + std ** 2, gain * covariance
    return torch.tensor(ratios, dtype=torch.float64), torch.tensor(residual_stds, dtype=torch.float64)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_exact_posterior_mean_oracle_matches_the_predicted_chain(sampler):
    """With the exact E[eps | x_t] the curves follow the discrete chain's exact moments. Two effects make them
    leave the forward values, and both are reproduced: 20 coarse steps shrink the variance (eps-norm ratio < 1
    at the end), and a chain started from ab_T ~ 4e-5 forgets x0, so delta_t climbs to its reference value
    (2 s^2 = 0.5 at t = 0) instead of staying at 0."""
    x0 = gaussian_data()
    scheduler = make_scheduler(sampler, 20)
    oracle = GaussianOracle(scheduler.alphas_cumprod)
    result = exposure.exposure_bias(oracle, scheduler, x0, batch_size=N, progress=False)
    ratio, residual_std = predicted_chain(scheduler, oracle)
    measured_ratio = result["eps_norm_sampling"] / result["eps_norm_forward"]
    # sampling error: ~0.3 % on the eps-norm ratio, ~0.2 % on the residual std; 2 % tolerance
    torch.testing.assert_close(measured_ratio, ratio, rtol=0.02, atol=0)
    torch.testing.assert_close(result["residual_std"], residual_std, rtol=0.02, atol=0)
    assert ratio[-1] < 0.9  # the prediction really departs from 1: the comparison above is not vacuous
    assert result["delta"][-1] > 0.25 and result["delta_reference"][-1] == pytest.approx(0.49, abs=0.03)


def test_eps_scale_scan_finds_the_planted_scale():
    x0 = gaussian_data(128, seed=7)
    scheduler = make_scheduler("ddim", 10)
    oracle = KnownX0Oracle(scheduler.alphas_cumprod, x0, scale=1.05)  # overestimates the noise by 5 %
    scan = exposure.scan_eps_scale(oracle, scheduler, x0, [1.0, 1.025, 1.05, 1.075, 1.1], batch_size=128,
                                  progress=False)
    assert scan["best"] == 1.05
    gaps = dict(zip(scan["candidates"], scan["gap"]))
    assert gaps[1.05] < 0.01 and min(gaps[1.0], gaps[1.1]) > 0.03, gaps
    with pytest.raises(ValueError, match="candidates"):
        exposure.scan_eps_scale(oracle, scheduler, x0, [], progress=False)


def test_eps_norm_of_v_prediction_model_is_converted():
    """A v-prediction oracle gives the same eps-norm as its epsilon twin: the output goes through the adapter."""
    x0 = gaussian_data(64, seed=3)
    eps_scheduler, v_scheduler = make_scheduler("ddim", 5), DDIMScheduler(clip_sample=False,
                                                                          prediction_type="v_prediction")
    v_scheduler.set_timesteps(5)
    eps_model = KnownX0Oracle(eps_scheduler.alphas_cumprod, x0)

    def v_model(x, timesteps, labels=None):
        ab = eps_scheduler.alphas_cumprod[timesteps].double().view(-1, 1, 1, 1)
        return (ab.sqrt() * eps_model(x, timesteps).double() - (1 - ab).sqrt() * x0.double()).float()

    seeded = dict(generator=torch.Generator().manual_seed(0), batch_size=64, progress=False)
    expected = exposure.forward_eps_norm(eps_model, eps_scheduler, x0, **seeded)["eps_norm"]
    seeded["generator"] = torch.Generator().manual_seed(0)
    got = exposure.forward_eps_norm(v_model, v_scheduler, x0, **seeded)["eps_norm"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_per_bucket_matches_the_gaussian_mmse(prediction_type):
    """Gaussian data N(0, s^2 I) and its exact denoiser: per element the posterior error of x0 is
    s^2 b^2 / (a^2 s^2 + b^2); eps errs by a/b times it and v by 1/b. One timestep per bucket (T = 10)."""
    scheduler = DDPMScheduler(num_train_timesteps=10, beta_start=0.05, beta_end=0.4, prediction_type=prediction_type)
    s = 0.5
    oracle = GaussianMixtureDenoiser(torch.zeros(1, 3, 8, 8), s, alphas_cumprod=scheduler.alphas_cumprod,
                                     prediction_type=prediction_type)
    x0 = oracle.sample_data(512, torch.Generator().manual_seed(0), torch.float64)[0]
    result = metrics.loss_per_bucket(oracle, scheduler, x0, num_buckets=10, generator=torch.Generator().manual_seed(1))
    ab = scheduler.alphas_cumprod.double()
    x0_mse = s ** 2 * (1 - ab) / (ab * s ** 2 + 1 - ab)
    assert result["edges"].tolist() == list(range(11))
    assert result["centres"].tolist() == list(range(10))
    torch.testing.assert_close(result["x0_mse"], x0_mse, rtol=0.03, atol=0)
    torch.testing.assert_close(result["eps_mse"], x0_mse * ab / (1 - ab), rtol=0.03, atol=0)
    torch.testing.assert_close(result["v_mse"], x0_mse / (1 - ab), rtol=0.03, atol=0)
    own = {"epsilon": "eps_mse", "v_prediction": "v_mse", "sample": "x0_mse"}[prediction_type]
    assert torch.equal(result["loss"], result[own])
    # standard error of a mean of 512 per-image means of 192 squared Gaussians: loss * sqrt(2 / 192 / 512)
    torch.testing.assert_close(result["loss_stderr"], result["loss"] * math.sqrt(2 / 192 / 512), rtol=0.25, atol=0)


def test_loss_per_bucket_buckets_and_the_untrained_zero_model():
    """A model that always outputs 0 as an eps-predictor: eps error = eps, so eps_mse = E[eps^2] = 1 in every
    bucket (up to sampling), whatever the data; buckets split T = 1000 into equal ranges."""
    scheduler = DDPMScheduler()
    x0 = torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    zero = lambda x, t, labels: torch.zeros_like(x)  # noqa: E731
    result = metrics.loss_per_bucket(zero, scheduler, x0, num_buckets=4, repeats=2,
                                      generator=torch.Generator().manual_seed(0))
    assert result["edges"].tolist() == [0, 250, 500, 750, 1000]
    assert result["centres"].tolist() == [124.5, 374.5, 624.5, 874.5]
    torch.testing.assert_close(result["loss"], torch.ones(4, dtype=torch.float64), rtol=0.05, atol=0)
    with pytest.raises(ValueError, match="num_buckets"):
        metrics.loss_per_bucket(zero, scheduler, x0, num_buckets=0)
