"""Training noise statistics and min-SNR-gamma weights (formulas: /work/shared/REFERENCES.md "Training noise")."""
import math

import pytest
import torch

from ldm_lite.noise import add_offset_noise, min_snr_weights, perturb_noise, pyramid_noise, training_noise
from ldm_lite.schedules import alphas_cumprod_from_betas, make_betas, rescale_zero_terminal_snr, snr


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_plain_training_noise_is_randn_from_the_generator():
    assert torch.equal(training_noise((4, 3, 8, 8), _generator()), torch.randn((4, 3, 8, 8), generator=_generator()))


def test_offset_noise_raises_the_channel_mean_variance_by_s_squared():
    s, shape = 0.1, (4000, 3, 16, 16)
    plain = training_noise(shape, _generator(1))
    offset = training_noise(shape, _generator(1), offset_strength=s)
    channel_mean_var = offset.mean(dim=(2, 3)).var().item()
    expected = 1 / 256 + s ** 2  # 0.0139: the white part's mean has variance 1/(HW), the offset adds s^2
    # 12,000 channel means: the sample variance has relative std sqrt(2/12000) = 1.3%; allow 5%.
    assert channel_mean_var == pytest.approx(expected, rel=0.05)
    assert plain.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 256, rel=0.05)
    assert offset.var().item() == pytest.approx(1 + s ** 2, rel=0.01)
    # the offset is shared by all pixels of a channel: noise - its spatial mean is white noise
    centred = offset - offset.mean(dim=(2, 3), keepdim=True)
    assert centred.var().item() == pytest.approx(1 - 1 / 256, rel=0.01)


def test_add_offset_noise_formula():
    noise = torch.zeros(2, 3, 4, 4)
    out = add_offset_noise(noise, 0.5, _generator(3))
    offset = torch.randn((2, 3, 1, 1), generator=_generator(3))
    assert torch.allclose(out, 0.5 * offset.expand(2, 3, 4, 4))


def test_pyramid_noise_has_unit_std_and_strong_low_frequencies():
    noise = pyramid_noise((512, 3, 16, 16), discount=0.8, generator=_generator(2))
    per_sample_std = noise.std(dim=(1, 2, 3))
    assert torch.allclose(per_sample_std, torch.ones(512), atol=1e-5)
    # pooled over samples each element is roughly unit variance too (per-sample means vary a little)
    assert 0.95 < noise.var().item() < 1.15
    # multi-resolution: the per-channel mean varies far more than white noise's 1/(HW) = 0.0039
    assert noise.mean(dim=(2, 3)).var().item() > 20 / 256
    # neighbouring pixels are strongly correlated (white noise: 0)
    correlation = torch.corrcoef(torch.stack([noise[..., :, :-1].flatten(), noise[..., :, 1:].flatten()]))[0, 1]
    assert correlation > 0.3  # measured 0.41 at discount 0.8


def test_pyramid_noise_is_seeded():
    a = pyramid_noise((2, 3, 16, 16), generator=_generator(5))
    b = pyramid_noise((2, 3, 16, 16), generator=_generator(5))
    assert torch.equal(a, b) and not torch.equal(a, pyramid_noise((2, 3, 16, 16), generator=_generator(6)))


def test_input_perturbation_adds_gamma_scaled_noise():
    noise = torch.randn((1000, 3, 8, 8), generator=_generator(7))
    perturbed = perturb_noise(noise, 0.1, _generator(8))
    difference = perturbed - noise
    assert difference.std().item() == pytest.approx(0.1, rel=0.02)
    assert abs(torch.corrcoef(torch.stack([difference.flatten(), noise.flatten()]))[0, 1]) < 0.01


def _reference_min_snr(snr_values, gamma, prediction_type):
    """diffusers' train_text_to_image.py formula (valid for 0 < SNR < inf)."""
    clipped = torch.stack([snr_values, gamma * torch.ones_like(snr_values)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        return clipped / snr_values
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1)
    return clipped


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_reference_on_a_real_schedule(prediction_type):
    alphas_cumprod = alphas_cumprod_from_betas(make_betas("linear", 1000).double())
    values = snr(alphas_cumprod)
    weights = min_snr_weights(values, 5.0, prediction_type)
    assert torch.allclose(weights, _reference_min_snr(values, 5.0, prediction_type), rtol=1e-12)
    assert torch.isfinite(weights).all()


def test_min_snr_weight_values_and_guards():
    values = torch.tensor([0.0, 1.0, 5.0, 20.0, math.inf], dtype=torch.float64)
    assert min_snr_weights(values, 5.0, "epsilon").tolist() == [1.0, 1.0, 1.0, 0.25, 0.0]
    assert min_snr_weights(values, 5.0, "sample").tolist() == [0.0, 1.0, 5.0, 5.0, 5.0]
    assert min_snr_weights(values, 5.0, "v_prediction").tolist() == pytest.approx([0.0, 0.5, 5 / 6, 5 / 21, 0.0])


def test_min_snr_weights_finite_with_zero_terminal_snr():
    betas = rescale_zero_terminal_snr(make_betas("scaled_linear", 1000, 0.00085, 0.012))
    values = snr(alphas_cumprod_from_betas(betas.double()))
    assert values[-1] == 0
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        assert torch.isfinite(min_snr_weights(values, 5.0, prediction_type)).all()


def test_min_snr_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_snr_gamma"):
        min_snr_weights(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(torch.ones(3), 5.0, "x0")
