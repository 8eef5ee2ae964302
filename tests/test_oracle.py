"""The exact Gaussian-mixture denoiser (ldm_lite.oracle) against closed form and numerical integration, float64.
Independent of diffusers."""
import math

import numpy as np
import pytest
import torch

from ldm_lite.oracle import GaussianMixtureDenoiser, alpha_bar_at, brightness_mixture, mixture_posterior_mean
from ldm_lite.schedulers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from ldm_lite.schedules import alphas_cumprod_from_betas, make_betas, rescale_zero_terminal_snr

pytestmark = pytest.mark.usefixtures("one_thread")

SCALED_LINEAR = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _alphas_cumprod(zero_snr=False):
    betas = make_betas(num_train_timesteps=1000, **SCALED_LINEAR)
    return alphas_cumprod_from_betas(rescale_zero_terminal_snr(betas) if zero_snr else betas)


def _gaussian_oracle(prediction_type="epsilon", std=0.4, zero_snr=False):
    mean = 0.5 * torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return GaussianMixtureDenoiser(mean, std, alphas_cumprod=_alphas_cumprod(zero_snr),
                                   prediction_type=prediction_type), mean[0]


@pytest.mark.parametrize("t", [0, 1, 250, 981, 999])
def test_single_gaussian_posterior_mean_is_the_closed_form(t):
    """E[x0 | x_t] = m + a s^2 / (a^2 s^2 + b^2) (x_t - a m) for x0 ~ N(m, s^2 I), to float64 rounding."""
    oracle, mean = _gaussian_oracle("sample", std=0.4)
    x_t = 2 * torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ab = oracle.alphas_cumprod[t]
    a, b2 = ab.sqrt(), 1 - ab
    expected = mean + a * 0.16 / (a ** 2 * 0.16 + b2) * (x_t - a * mean)
    assert torch.allclose(oracle(x_t, t), expected, rtol=0, atol=1e-12)
    assert oracle(x_t, t).dtype == torch.float64


def test_zero_snr_gives_the_data_mean_and_eps_equal_to_the_sample():
    oracle, mean = _gaussian_oracle("sample", zero_snr=True)
    x_t = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(oracle(x_t, 999), mean.expand_as(x_t), atol=1e-15)
    oracle.prediction_type = "epsilon"
    assert torch.allclose(oracle(x_t, 999), x_t, atol=1e-15)


def _two_component_reference(x_t, ab, means, stds, weights, step=0.04, half_width=8.0):
    """E[x0 | x_t] by trapezoidal integration over a 2-D grid of x0 (D = 2), independent of the closed form."""
    grid = np.arange(-half_width, half_width + step / 2, step)
    u, v = np.meshgrid(grid, grid, indexing="ij")
    x0 = np.stack([u, v], axis=-1)  # (G, G, 2)
    prior = sum(w * np.exp(-((x0 - m) ** 2).sum(-1) / (2 * s ** 2)) / (2 * np.pi * s ** 2)
                for m, s, w in zip(means, stds, weights))
    likelihood = np.exp(-((x_t - np.sqrt(ab) * x0) ** 2).sum(-1) / (2 * (1 - ab)))
    density = prior * likelihood
    return (density[..., None] * x0).sum((0, 1)) / density.sum()


@pytest.mark.parametrize("ab", [0.9, 0.5, 0.1, 0.01])
def test_two_component_posterior_mean_against_numerical_integration(ab):
    means = [np.array([-1.0, 0.5]), np.array([1.2, -0.3])]
    stds, weights = [0.5, 0.8], [0.3, 0.7]
    model_means = torch.tensor(np.stack(means)).reshape(2, 1, 1, 2)
    points = torch.tensor([[0.0, 0.0], [0.9, 0.4], [-1.5, 1.0], [2.0, -2.0]], dtype=torch.float64)
    ours = mixture_posterior_mean(points.reshape(4, 1, 1, 2), torch.full((4,), ab, dtype=torch.float64),
                                  model_means, torch.tensor(stds, dtype=torch.float64),
                                  torch.tensor(weights, dtype=torch.float64))
    for point, value in zip(points.numpy(), ours.reshape(4, 2).numpy()):
        reference = _two_component_reference(point, ab, means, stds, weights)
        np.testing.assert_allclose(value, reference, rtol=0, atol=1e-11)  # measured: <= 4e-13


def test_responsibilities_stay_finite_far_from_the_data():
    oracle = brightness_mixture(_alphas_cumprod(), shape=(3, 8, 8), prediction_type="sample")
    x_t = torch.full((2, 3, 8, 8), 1e3, dtype=torch.float64)
    x_t[1] *= -1
    out = oracle(x_t, 10)
    assert torch.isfinite(out).all()
    # far out, the nearest component takes all the weight: its single-Gaussian posterior mean
    ab = oracle.alphas_cumprod[10]
    a, s2 = ab.sqrt(), 0.01
    for sample, level in ((0, 0.6), (1, -0.6)):
        expected = level + a * s2 / (a ** 2 * s2 + 1 - ab) * (x_t[sample] - a * level)
        assert torch.allclose(out[sample], expected, atol=1e-9)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_are_the_same_posterior(prediction_type):
    oracle = brightness_mixture(_alphas_cumprod(), shape=(3, 4, 4), prediction_type=prediction_type)
    x_t = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor([0, 10, 300, 600, 900, 999])
    ab = oracle.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    a, b = ab.sqrt(), (1 - ab).sqrt()
    posterior = oracle.posterior_mean(x_t, ab.flatten())
    out = oracle(x_t, t)
    x0 = {"epsilon": (x_t - b * out) / a, "v_prediction": a * x_t - b * out, "sample": out}[prediction_type]
    assert torch.allclose(x0, posterior, atol=1e-10)
    if prediction_type == "v_prediction":  # v = a eps - b x0 with eps = (x_t - a x0) / b
        assert torch.allclose(out, a * (x_t - a * posterior) / b - b * posterior, atol=1e-12)


def test_class_labels_select_a_component_and_the_null_label_the_mixture():
    oracle = brightness_mixture(_alphas_cumprod(), shape=(3, 4, 4), prediction_type="sample")
    x_t = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ab = oracle.alphas_cumprod[400]
    a = ab.sqrt()
    out = oracle(x_t, 400, torch.tensor([0, 1, 2, 3]))
    for k, level in enumerate((-0.6, 0.0, 0.6)):
        expected = level + a * 0.01 / (a ** 2 * 0.01 + 1 - ab) * (x_t[k] - a * level)
        assert torch.allclose(out[k], expected, atol=1e-12)
    assert torch.allclose(out[3], oracle(x_t[3:], 400)[0], atol=0)
    assert oracle.config.num_classes == 3 and oracle.config.in_channels == 3 and oracle.config.sample_size == 4
    with pytest.raises(ValueError, match="class labels"):
        oracle(x_t, 400, torch.tensor([0, 1, 2, 4]))


def test_fractional_timesteps_interpolate_log_sigma():
    table = _alphas_cumprod()
    integers = torch.arange(1000)
    assert torch.equal(alpha_bar_at(integers, table), table.double())  # bit for bit at integers
    t = np.array([0.25, 10.5, 500.75, 998.999, 999.0])
    log_sigma = 0.5 * np.log((1 - table.double().numpy()) / table.double().numpy())
    expected = 1 / (1 + np.exp(2 * np.interp(t, np.arange(1000), log_sigma)))
    np.testing.assert_allclose(alpha_bar_at(torch.tensor(t), table).numpy(), expected, rtol=1e-12)
    # zero terminal SNR: log sigma is +inf at T - 1, so alpha_bar is 0 at and just below it
    zero_snr = alpha_bar_at(torch.tensor([998.5, 999.0]), _alphas_cumprod(zero_snr=True))
    assert zero_snr.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="timesteps"):
        alpha_bar_at(torch.tensor([1000.0]), table)


COSINE = dict(beta_schedule="squaredcos_cap_v2")


@pytest.mark.parametrize("cls, karras, schedule, interpolation", [
    (EulerDiscreteScheduler, False, COSINE, "linear"), (EulerAncestralDiscreteScheduler, False, COSINE, "linear"),
    (EulerDiscreteScheduler, True, SCALED_LINEAR, "log_linear")])
def test_the_exact_denoiser_sees_the_samplers_own_sigma(cls, karras, schedule, interpolation):
    """Euler and Euler ancestral interpolate sigma linearly at fractional linspace timesteps; Karras timesteps come
    from log sigma. With the sampler's `timestep_interpolation`, alpha_bar_at gives 1 / (1 + sigma^2) of the
    sampler's own sigma table (measured within 3e-7 relative, the float32 tables); at 50 steps the other
    interpolation is off by more than 1e-5 (measured 5.6e-4 for cosine linspace, 3.7e-5 for Karras)."""
    scheduler = cls(**schedule, **({"use_karras_sigmas": True} if karras else {}))
    scheduler.set_timesteps(50)
    assert scheduler.timestep_interpolation == interpolation
    samplers = 1 / (1 + scheduler.sigmas[:-1].double() ** 2)
    oracle = brightness_mixture(scheduler.alphas_cumprod, shape=(1, 2, 2), prediction_type="sample",
                                interpolation_type=scheduler.timestep_interpolation)
    seen = alpha_bar_at(scheduler.timesteps, oracle.alphas_cumprod, oracle.interpolation_type)
    torch.testing.assert_close(seen, samplers, rtol=1e-6, atol=0)
    other = alpha_bar_at(scheduler.timesteps, oracle.alphas_cumprod,
                         "log_linear" if interpolation == "linear" else "linear")
    assert ((other - samplers).abs() / samplers).max() > 1e-5


def test_fractional_timesteps_reach_the_model():
    """A model called at a fractional t sees alpha_bar interpolated in log sigma (not truncated to an integer)."""
    oracle, _ = _gaussian_oracle("sample")
    x_t = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ab = alpha_bar_at(torch.tensor([500.5]), oracle.alphas_cumprod)
    assert torch.allclose(oracle(x_t, torch.tensor([500.5, 500.5])), oracle.posterior_mean(x_t, ab.expand(2)),
                          atol=0)
    assert not torch.allclose(oracle(x_t, 500.5), oracle(x_t, 500), atol=1e-6)


def test_float32_input_gives_float32_output_close_to_float64():
    oracle = brightness_mixture(_alphas_cumprod(), shape=(3, 4, 4))
    x_t = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out32 = oracle(x_t.float(), 700)
    assert out32.dtype == torch.float32
    assert torch.allclose(out32.double(), oracle(x_t, 700), atol=1e-5)


def test_data_draws_match_the_exact_statistics():
    means = torch.tensor([-1.0, 0.5, 2.0]).reshape(3, 1, 1, 1) * torch.linspace(0.5, 1.5, 8).reshape(1, 2, 2, 2)
    oracle = GaussianMixtureDenoiser(means, [0.3, 0.6, 0.2], [0.5, 0.3, 0.2], alphas_cumprod=_alphas_cumprod())
    n = 40000
    images, components = oracle.sample_data(n, torch.Generator().manual_seed(7), dtype=torch.float64)
    frequencies = torch.bincount(components, minlength=3).double() / n
    assert torch.allclose(frequencies, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=0.01)  # 4 SE
    variance = oracle.data_variance()
    standard_error = (variance / n).sqrt()
    assert ((images.mean(0) - oracle.data_mean()).abs() < 4 * standard_error).all()
    assert ((images.var(0) / variance - 1).abs() < 0.05).all()
    # closed form of the mixture variance, by hand for one element
    m = means[:, 0, 0, 0].double()
    w, s = torch.tensor([0.5, 0.3, 0.2]).double(), torch.tensor([0.3, 0.6, 0.2]).double()
    assert variance[0, 0, 0].item() == pytest.approx(float((w * (s ** 2 + m ** 2)).sum() - (w * m).sum() ** 2))
    brightness_mean, brightness_std = oracle.brightness_statistics()
    brightness = images.mean((1, 2, 3))
    assert brightness.mean().item() == pytest.approx(brightness_mean, abs=4 * brightness_std / math.sqrt(n))
    assert brightness.std().item() == pytest.approx(brightness_std, rel=0.02)


def test_brightness_mixture_statistics():
    oracle = brightness_mixture(_alphas_cumprod(), shape=(3, 16, 16))
    mean, std = oracle.brightness_statistics()
    assert mean == pytest.approx(0.0, abs=1e-15)
    assert std == pytest.approx(math.sqrt(2 / 3 * 0.36 + 0.01 / 768), rel=1e-12)
    assert torch.allclose(oracle.data_variance(), torch.full((3, 16, 16), 2 / 3 * 0.36 + 0.01, dtype=torch.float64))


def test_signal_leak_squeezes_brightness_from_pure_noise():
    """The lessons' demonstration: the exact denoiser sampled with DDIM from pure noise under the leaky
    scaled_linear schedule (50 leading steps from t = 981, sqrt(ab) = 0.076) squeezes the data's brightness std
    (measured ratio 0.875); started from the true marginal at t = 981 it keeps it (1.002); with zero terminal SNR
    (trailing, v-prediction) pure noise is the true marginal and the spread is kept (0.987). With 256 images the
    ratio's standard error is about 0.022 (three equal brightness levels: Var(s^2) = (mu_4 - sigma^4) / n)."""
    def brightness_std_ratio(zero_snr, start_from_data):
        kwargs = dict(SCALED_LINEAR, clip_sample=False, rescale_betas_zero_snr=zero_snr,
                      prediction_type="v_prediction" if zero_snr else "epsilon",
                      timestep_spacing="trailing" if zero_snr else "leading", steps_offset=0 if zero_snr else 1)
        scheduler = DDIMScheduler(**kwargs)
        scheduler.set_timesteps(50)
        oracle = brightness_mixture(scheduler.alphas_cumprod, prediction_type=kwargs["prediction_type"])
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(256, 3, 16, 16, generator=generator, dtype=torch.float64)
        if start_from_data:
            x = scheduler.add_noise(oracle.sample_data(256, generator, torch.float64)[0], x, scheduler.timesteps[:1])
        for t in scheduler.timesteps:
            x = scheduler.step(oracle(x, t), t, x).prev_sample
        return x.mean((1, 2, 3)).std().item() / oracle.brightness_statistics()[1]
    assert 0.75 < brightness_std_ratio(zero_snr=False, start_from_data=False) < 0.92
    assert brightness_std_ratio(zero_snr=False, start_from_data=True) == pytest.approx(1.0, abs=0.05)
    assert brightness_std_ratio(zero_snr=True, start_from_data=False) == pytest.approx(1.0, abs=0.05)


def test_sampling_loop_drives_the_oracle():
    """ldm_lite.sampling.sample reads the shape from model.config and calls model(x, timesteps, labels)."""
    from ldm_lite.sampling import sample
    scheduler = DDIMScheduler(clip_sample=False, **SCALED_LINEAR)
    oracle = brightness_mixture(scheduler.alphas_cumprod, shape=(3, 8, 8))
    images = sample(oracle, scheduler, 4, num_inference_steps=5, class_labels=torch.tensor([0, 2, 3, 3]),
                    progress=False)
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
    assert images[0].mean() < -0.4 and images[1].mean() > 0.4  # dark and bright components asked for


def test_bad_arguments():
    table = _alphas_cumprod()
    with pytest.raises(ValueError, match="shape"):
        GaussianMixtureDenoiser([0.0, 1.0], 0.1, alphas_cumprod=table)
    with pytest.raises(ValueError, match="positive weights"):
        GaussianMixtureDenoiser([0.0, 1.0], 0.1, [1.0, 0.0], alphas_cumprod=table, shape=(1, 2, 2))
    with pytest.raises(ValueError, match="prediction_type"):
        GaussianMixtureDenoiser([0.0], 0.1, alphas_cumprod=table, shape=(1, 2, 2), prediction_type="eps")
