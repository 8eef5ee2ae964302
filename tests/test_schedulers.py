"""Schedules and DDPM/DDIM schedulers: parity with diffusers on a grid of configurations, closed-form checks,
and input validation. Tolerance: max abs difference <= 1e-5 (float32) on every step of every trajectory."""
import itertools
import json
import math
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm_lite.schedulers import DDIMScheduler, DDPMScheduler  # noqa: E402
from ldm_lite.schedules import (make_betas, make_timesteps)

TOL = 1e-5
SCHEDULES = [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 1e-4, 0.02),
             ("sigmoid", 1e-4, 0.02)]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SPACINGS = ["leading", "linspace", "trailing"]
X0_LIMITS = [dict(clip_sample=False), dict(clip_sample=True, clip_sample_range=1.5),
             dict(clip_sample=False, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)]
STEP_COUNTS = [7, 50, 333, 10]


def fake_model(x, t, channels_out=None):
    """Deterministic stand-in for a network: a smooth function of x_t and t. (B, C, H, W) -> (B, C_out, H, W)."""
    out = 0.9 * torch.tanh(0.8 * x) + 0.1 * math.cos(float(t) / 97.0) * torch.sin(3 * x)
    if channels_out == 2 * x.shape[1]:  # learned variance: second half in (-1, 1) or a positive variance
        out = torch.cat([out, torch.tanh(x.flip(-1))], dim=1)
    return out


def _grid():
    """Full product of schedule x prediction x spacing x x0-limit; offsets, zero-SNR and step counts rotate
    deterministically so every value of every factor appears with every spacing."""
    rows = []
    for i, (schedule, prediction, spacing, limit) in enumerate(
            itertools.product(SCHEDULES, PREDICTIONS, SPACINGS, range(len(X0_LIMITS)))):
        rows.append(dict(schedule=schedule, prediction=prediction, spacing=spacing, limit=limit,
                         steps_offset=i % 2, zero_snr=(i // 2) % 2 == 1, steps=STEP_COUNTS[(i // 4) % 4]))
    return rows


def _kwargs(row):
    name, start, end = row["schedule"]
    return dict(beta_schedule=name, beta_start=start, beta_end=end, prediction_type=row["prediction"],
                timestep_spacing=row["spacing"], steps_offset=row["steps_offset"],
                rescale_betas_zero_snr=row["zero_snr"], **X0_LIMITS[row["limit"]])


def _make_pair(ours_cls, ref_cls, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = ours_cls(**kwargs)
        if kwargs["beta_schedule"] == "sigmoid" and ref_cls is diffusers.DDIMScheduler:
            # diffusers' DDIM lacks `sigmoid`; feed it diffusers DDPM's betas (checked equal to ours elsewhere)
            ref_betas = diffusers.DDPMScheduler(**{k: v for k, v in kwargs.items() if k != "set_alpha_to_one"}).betas
            ref = ref_cls(**{**kwargs, "beta_schedule": "linear", "trained_betas": ref_betas.tolist()})
            if kwargs["rescale_betas_zero_snr"]:
                ref.alphas_cumprod = ours.alphas_cumprod.clone()
        else:
            ref = ref_cls(**kwargs)
    return ours, ref


def _run_pair(ours, ref, steps, step_kwargs, model=fake_model, channels_out=3, seed=0):
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    y = x.clone()
    gen_ours, gen_ref = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    for t in ours.timesteps:
        a = ours.step(model(x, t, channels_out), t, x, generator=gen_ours, **step_kwargs)
        b = ref.step(model(y, t, channels_out), t, y, generator=gen_ref, **step_kwargs)
        if not torch.isfinite(b.prev_sample).all():
            pytest.fail(f"reference produced non-finite values at t={int(t)}: grid row is ill-posed")
        assert (a.prev_sample - b.prev_sample).abs().max().item() <= TOL, f"prev_sample differs at t={int(t)}"
        assert (a.pred_original_sample - b.pred_original_sample).abs().max().item() <= TOL, f"x0 differs at t={int(t)}"
        x, y = a.prev_sample, b.prev_sample


def _diffusers_ddim_agrees(timesteps, T, N):
    """diffusers' DDIM steps to t - T // N; that equals the next listed timestep only on uniform lists."""
    stride = T // N
    nxt = timesteps[1:].tolist() + [-1]
    return all((t - stride == p) or (p == -1 and t - stride < 0) for t, p in zip(timesteps.tolist(), nxt))


def _ill_posed(row, first_t):
    # zero terminal SNR with epsilon prediction at t = T - 1: x0 = (x - eps) / 0 (we warn; diffusers gives inf)
    return row["zero_snr"] and row["prediction"] == "epsilon" and first_t == 999


GRID = _grid()


DDPM_GRID = [row for row in GRID
             if not _ill_posed(row, int(make_timesteps(row["steps"], 1000, row["spacing"], row["steps_offset"])[0]))]


@pytest.mark.parametrize("row", DDPM_GRID, ids=lambda r: "-".join(str(v) if not isinstance(v, tuple) else v[0]
                                                                   for v in r.values()))
def test_ddpm_parity(row):
    ours, ref = _make_pair(DDPMScheduler, diffusers.DDPMScheduler, _kwargs(row))
    _run_pair(ours, ref, row["steps"], {})


def _ddim_reference_valid(row, eta):
    """Rows where diffusers' DDIM is a valid reference. Left out: spacings where it strides by T // N
    (test_ddim_previous_timestep_from_list), epsilon at SNR 0, and eta = 1 at SNR 0 where it takes the sqrt of a
    rounding-negative 1 - ab_prev - sigma^2 and returns NaN (test_ddim_eta1_at_zero_snr_is_finite)."""
    timesteps = make_timesteps(row["steps"], 1000, row["spacing"], row["steps_offset"])
    first = int(timesteps[0])
    return (_diffusers_ddim_agrees(timesteps, 1000, row["steps"]) and not _ill_posed(row, first)
            and not (row["zero_snr"] and eta == 1.0 and first == 999))


DDIM_GRID = [(row, eta) for row in GRID for eta in (0.0, 0.5, 1.0) if _ddim_reference_valid(row, eta)]


@pytest.mark.parametrize("row,eta", DDIM_GRID, ids=lambda v: "-".join(
    str(x) if not isinstance(x, tuple) else x[0] for x in v.values()) if isinstance(v, dict) else f"eta{v}")
def test_ddim_parity(row, eta):
    ours, ref = _make_pair(DDIMScheduler, diffusers.DDIMScheduler, {**_kwargs(row), "set_alpha_to_one": eta != 0.5})
    _run_pair(ours, ref, row["steps"], {"eta": eta})


def test_ddim_parity_cases_cover_every_factor():
    """The skips above must leave every value of every factor covered by at least one DDIM parity run."""
    ran = [row for row, eta in DDIM_GRID]
    assert {eta for row, eta in DDIM_GRID} == {0.0, 0.5, 1.0}
    for key in ("schedule", "prediction", "limit", "steps_offset", "zero_snr", "steps"):
        assert {str(r[key]) for r in ran} == {str(r[key]) for r in GRID}, key
    assert {r["spacing"] for r in ran} == {"leading", "trailing"}  # linspace agrees with diffusers at no such N


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned", "learned_range"])
@pytest.mark.parametrize("steps", [1000, 50, 7])
def test_ddpm_variance_types_parity(variance_type, steps):
    kwargs = dict(beta_schedule="linear", variance_type=variance_type, clip_sample=True)
    ours, ref = DDPMScheduler(**kwargs), diffusers.DDPMScheduler(**kwargs)
    learned = variance_type.startswith("learned")

    def positive_variance_model(x, t, channels_out=None):  # "learned": the second half is the variance itself
        return torch.cat([fake_model(x, t), 0.01 * torch.sigmoid(x)], dim=1)

    model = positive_variance_model if variance_type == "learned" else fake_model
    _run_pair(ours, ref, steps, {}, model=model, channels_out=6 if learned else 3)


def test_full_chain_without_set_timesteps_matches_diffusers():
    ours, ref = DDPMScheduler(), diffusers.DDPMScheduler()
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    y = x.clone()
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for t in range(999, -1, -1):
        x = ours.step(fake_model(x, t), t, x, generator=g1).prev_sample
        y = ref.step(fake_model(y, t), t, y, generator=g2).prev_sample
    assert (x - y).abs().max().item() <= TOL


def test_variance_noise_argument_equals_generator_draw():
    ours = DDIMScheduler()
    ours.set_timesteps(20)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = ours.timesteps[3]
    a = ours.step(fake_model(x, t), t, x, eta=1.0, generator=torch.Generator().manual_seed(9)).prev_sample
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    b = ours.step(fake_model(x, t), t, x, eta=1.0, variance_noise=z).prev_sample
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        ours.step(fake_model(x, t), t, x, eta=1.0, variance_noise=z, generator=torch.Generator())


@pytest.mark.parametrize("schedule", SCHEDULES[:3])
def test_add_noise_and_velocity_parity(schedule):
    name, start, end = schedule
    for zero_snr in (False, True):
        ours = DDPMScheduler(beta_schedule=name, beta_start=start, beta_end=end, rescale_betas_zero_snr=zero_snr)
        ref = diffusers.DDPMScheduler(beta_schedule=name, beta_start=start, beta_end=end,
                                      rescale_betas_zero_snr=zero_snr)
        assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
        g = torch.Generator().manual_seed(0)
        x0, noise = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
        t = torch.tensor([0, 1, 250, 500, 998, 999])
        assert (ours.add_noise(x0, noise, t) - ref.add_noise(x0, noise, t)).abs().max() <= TOL
        assert (ours.get_velocity(x0, noise, t) - ref.get_velocity(x0, noise, t)).abs().max() <= TOL


def test_betas_equal_diffusers():
    for name, start, end in SCHEDULES:
        ref = diffusers.DDPMScheduler(beta_schedule=name, beta_start=start, beta_end=end)
        assert torch.equal(make_betas(name, 1000, start, end), ref.betas), name


@pytest.mark.parametrize("cls,ref_cls", [(DDPMScheduler, "DDPMScheduler"), (DDIMScheduler, "DDIMScheduler")])
def test_from_config_reads_diffusers_json(tmp_path, cls, ref_cls):
    ref = getattr(diffusers, ref_cls)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      steps_offset=1, prediction_type="v_prediction")
    ref.save_config(tmp_path / "scheduler")
    config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    config["some_future_option"] = 3
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="some_future_option") as record:
        ours = cls.from_config(tmp_path)  # a model-repo folder holding scheduler/scheduler_config.json
    assert len([w for w in record if "unknown keys" in str(w.message)]) == 1
    assert ours.prediction_type == "v_prediction" and ours.config["steps_offset"] == 1
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    ours.set_timesteps(50)
    assert ours.timesteps[0].item() == 981
    with pytest.raises(FileNotFoundError):
        cls.from_config(tmp_path / "missing")
