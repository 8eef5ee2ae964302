"""Schedules and DDPM/DDIM schedulers against closed forms, with no reference library needed: known alpha_bar
points, the zero-SNR rescale, spacings, the signal-leak table, oracle DDIM recovering x0, the previous-timestep
rule, and input validation. The diffusers parity grid is in test_schedulers.py."""
import math

import numpy as np
import pytest
import torch

from ldm_lite.schedulers import DDIMScheduler, DDPMScheduler
from ldm_lite.schedules import (make_betas, make_timesteps, max_quadratic_steps, rescale_zero_terminal_snr,
                                schedule_table, signal_at_first_step)

PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SPACINGS = ["leading", "linspace", "trailing"]


def fake_model(x, t, channels_out=None):
    """Deterministic stand-in for a network: a smooth function of x_t and t."""
    return 0.9 * torch.tanh(0.8 * x) + 0.1 * math.cos(float(t) / 97.0) * torch.sin(3 * x)


def test_ddim_eta1_at_zero_snr_is_finite():
    sched = DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    sched.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    for t in sched.timesteps:
        x = sched.step(fake_model(x, t), t, x, eta=1.0, generator=gen).prev_sample
        assert torch.isfinite(x).all(), int(t)


def test_ddim_previous_timestep_from_list():
    """Where diffusers' DDIM strides by T // N (wrong for linspace and non-integer trailing), ours steps to the
    next listed timestep. Documented difference, not parity."""
    for spacing, steps in [("linspace", 7), ("trailing", 7), ("linspace", 50), ("trailing", 333)]:
        ours = DDIMScheduler(timestep_spacing=spacing)
        ours.set_timesteps(steps)
        listed = ours.timesteps.tolist()
        for i, t in enumerate(listed):
            expected = listed[i + 1] if i + 1 < len(listed) else -1
            assert ours.previous_timestep(t) == expected
        ref_prev = [t - 1000 // steps for t in listed]
        assert ref_prev[:-1] != listed[1:], "this case was meant to show a difference"
    # The step really uses it: a oracle step from t lands exactly on the forward marginal at the listed prev.
    ours = DDIMScheduler(timestep_spacing="linspace", clip_sample=False)
    ours.set_timesteps(7)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g,
                                                                                      dtype=torch.float64)
    t, prev = int(ours.timesteps[1]), int(ours.timesteps[2])
    xt = ours.add_noise(x0, eps, torch.tensor([t]))
    out = ours.step(eps, t, xt).prev_sample
    assert torch.allclose(out, ours.add_noise(x0, eps, torch.tensor([prev])), atol=1e-6)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_eta0_oracle_recovers_x0(prediction, spacing):
    """Closed form: with the true eps / v / x0 at every step, deterministic DDIM inverts the forward process."""
    sched = DDIMScheduler(prediction_type=prediction, timestep_spacing=spacing, clip_sample=False,
                          beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(25)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    ab = sched.alphas_cumprod.double()
    x = sched.add_noise(x0, eps, sched.timesteps[:1])
    for t in sched.timesteps:
        oracle = {"epsilon": eps, "sample": x0, "v_prediction": ab[t].sqrt() * eps - (1 - ab[t]).sqrt() * x0}
        x = sched.step(oracle[prediction], t, x).prev_sample
    assert (x - x0).abs().max().item() < 1e-5


def test_alpha_bar_known_points():
    """Closed-form facts, independent of diffusers: REFERENCES.md 'Signal left at the start'."""
    def sqrt_ab(name, start, end, t, zero_snr=False):
        betas = make_betas(name, 1000, start, end)
        betas = rescale_zero_terminal_snr(betas) if zero_snr else betas
        return signal_at_first_step(torch.cumprod(1 - betas, 0), torch.tensor([t]))
    assert sqrt_ab("scaled_linear", 0.00085, 0.012, 999) == pytest.approx(0.06826, abs=1e-5)
    assert sqrt_ab("scaled_linear", 0.00085, 0.012, 981) == pytest.approx(0.0760, abs=1e-4)
    assert sqrt_ab("linear", 1e-4, 0.02, 999) == pytest.approx(0.00635, abs=1e-5)
    assert sqrt_ab("squaredcos_cap_v2", 0, 0, 999) == pytest.approx(4.9e-5, abs=1e-6)
    assert sqrt_ab("scaled_linear", 0.00085, 0.012, 999, zero_snr=True) == 0.0
    # linear: product of (1 - beta) in float64 numpy, independently
    numpy_ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    ours = torch.cumprod(1 - make_betas("linear", 1000, 1e-4, 0.02).double(), 0).numpy()
    np.testing.assert_allclose(ours, numpy_ab, rtol=1e-5)
    # cosine: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), up to the 0.999 cap
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ab = torch.cumprod(1 - make_betas("squaredcos_cap_v2", 1000).double(), 0)
    for t in (0, 100, 500, 900):
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)


def test_zero_snr_rescale_properties():
    betas = rescale_zero_terminal_snr(make_betas("scaled_linear", 1000, 0.00085, 0.012))
    ab = torch.cumprod(1 - betas.double(), 0)
    original = torch.cumprod(1 - make_betas("scaled_linear", 1000, 0.00085, 0.012).double(), 0)
    assert betas[-1].item() == pytest.approx(1.0)
    assert ab[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert ab[0].item() == pytest.approx(original[0].item(), rel=1e-6)


def test_timestep_spacings_match_reference_lists():
    assert make_timesteps(50, 1000, "leading", 1)[[0, -1]].tolist() == [981, 1]
    assert make_timesteps(50, 1000, "trailing")[[0, -1]].tolist() == [999, 19]
    assert make_timesteps(50, 1000, "linspace")[[0, -1]].tolist() == [999, 0]
    for spacing in SPACINGS:
        ts = make_timesteps(333, 1000, spacing)
        assert len(ts) == 333 and (ts[:-1] > ts[1:]).all()


@pytest.mark.parametrize("T, N, offset", [(1000, 20, 0), (1000, 29, 1), (1000, 5, 0), (100, 9, 0), (4000, 57, 0)])
def test_quadratic_spacing_is_the_ddim_papers_closed_form(T, N, offset):
    """Song et al. 2021, App. D.2 and their code: int(linspace(0, sqrt(0.8 T), N) ** 2), descending, + offset;
    t0 = 0.8 T, where sqrt(alpha_bar) = 0.039 on the linear schedule at T = 1000."""
    expected = (np.linspace(0, np.sqrt(T * 0.8), N) ** 2).astype(int)[::-1] + offset
    assert make_timesteps(N, T, "quadratic", offset).tolist() == expected.tolist()
    assert make_timesteps(N, T, "quadratic", offset)[0] == int(0.8 * T) + offset
    for cls in (DDIMScheduler, DDPMScheduler):
        scheduler = cls(num_train_timesteps=T, timestep_spacing="quadratic", steps_offset=offset)
        scheduler.set_timesteps(N)
        assert scheduler.timesteps.tolist() == expected.tolist()
    ddim = DDIMScheduler(timestep_spacing="quadratic")
    ddim.set_timesteps(20)
    assert ddim.timesteps[:3].tolist() == [800, 718, 640]
    assert signal_at_first_step(ddim.alphas_cumprod, ddim.timesteps) == pytest.approx(0.039, abs=5e-4)


def test_quadratic_spacing_refuses_steps_that_repeat_timesteps():
    """floor(sqrt(0.8 T)) + 1 steps at most: with one more, int() maps the first two points to 0."""
    assert max_quadratic_steps(1000) == 29 and max_quadratic_steps(100) == 9
    assert len(set(make_timesteps(29, 1000, "quadratic").tolist())) == 29
    assert len(set((np.linspace(0, np.sqrt(800), 30) ** 2).astype(int).tolist())) < 30  # the closed form repeats
    with pytest.raises(ValueError, match=r"quadratic spacing repeats timesteps beyond 29 steps of T = 1000"):
        make_timesteps(30, 1000, "quadratic")


def test_schedule_table_facts():
    rows = {(r["schedule"], r["spacing"]): r for r in schedule_table(50)}
    assert rows[("scaled_linear", "trailing")]["signal_at_first_step"] == pytest.approx(0.0683, abs=1e-4)
    assert rows[("scaled_linear", "leading")]["first_timestep"] == 981
    assert rows[("linear", "linspace")]["signal_at_first_step"] == pytest.approx(0.00635, abs=1e-5)
    assert rows[("scaled_linear_zero_snr", "trailing")]["signal_at_first_step"] == 0.0
    assert rows[("scaled_linear_zero_snr", "trailing")]["terminal_snr"] == 0.0


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_bad_input_errors(cls):
    with pytest.raises(ValueError, match="beta_schedule"):
        cls(beta_schedule="cosine")
    with pytest.raises(ValueError, match="timestep_spacing"):
        cls(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="prediction_type"):
        cls(prediction_type="eps")
    sched = cls()
    for bad in (0, 1001, -3):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(bad)
    sched.set_timesteps(10)
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="not in the current list"):
        sched.step(x, 505, x)
    with pytest.warns(UserWarning, match="SNR 0"):
        cls(rescale_betas_zero_snr=True, prediction_type="epsilon")


def test_ddpm_bad_variance_type():
    with pytest.raises(ValueError, match="variance_type"):
        DDPMScheduler(variance_type="fixed_medium")
