"""Euler, Euler ancestral, Heun and DPM-Solver(++): parity with diffusers on a rotated grid of configurations, on
every step of every trajectory; closed-form checks of the sigma helpers and of the documented differences;
refused configurations; diffusers' own scheduler_config.json files.

Tolerance: max abs difference of the model input, prev_sample and pred_original_sample, relative to the reference
tensor's scale (its max abs, at least 1), <= 1e-5 in float32.
"""
import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm_lite.schedulers.dpm_solver import DPMSolverMultistepScheduler  # noqa: E402
from ldm_lite.schedulers.euler import EulerDiscreteScheduler  # noqa: E402
from ldm_lite.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler  # noqa: E402
from ldm_lite.schedulers.heun import HeunDiscreteScheduler  # noqa: E402
from ldm_lite.schedulers.sigmas import (exponential_sigmas, karras_sigmas, sigma_to_timestep,  # noqa: E402
                                        timestep_to_sigma)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # diffusers' own notices (numpy 2 __array__ protocol, deprecated algorithm types)
              pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*"),
              pytest.mark.filterwarnings("ignore::FutureWarning:diffusers.*")]

TOL = 1e-5
SHAPE = (2, 3, 8, 8)
SCHEDULES = [("scaled_linear", 0.00085, 0.012), ("linear", 1e-4, 0.02), ("squaredcos_cap_v2", 1e-4, 0.02)]
SPACINGS = [("leading", 1), ("trailing", 0), ("linspace", 0)]  # (timestep_spacing, steps_offset)
STEP_COUNTS = [7, 333, 10, 25]
SIGMA_KINDS = ["plain", "karras", "exponential"]
CHURNS = [{}, dict(s_churn=1.0, s_tmin=0.2, s_tmax=20.0, s_noise=1.003), dict(s_churn=40.0)]


def fake_model(x, t):
    """Deterministic stand-in for a network (as in test_schedulers.py): a smooth function of x and t."""
    return 0.9 * torch.tanh(0.8 * x) + 0.1 * math.cos(float(t) / 97.0) * torch.sin(3 * x)


def _relative_error(ours, reference) -> float:
    return (ours - reference).abs().max().item() / max(1.0, reference.abs().max().item())


def _generators(seed, per_sample):
    if per_sample:
        return [torch.Generator().manual_seed(seed + b) for b in range(SHAPE[0])]
    return torch.Generator().manual_seed(seed)


def run_parity(ours, ref, steps, step_kwargs=None, stochastic=False, per_sample=False, model=fake_model, seed=0):
    """Drive both schedulers as a pipeline does (x_T = init_noise_sigma * randn, scale_model_input before the
    model) and compare every step. Returns the number of model calls."""
    step_kwargs = step_kwargs or {}
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps.dtype == ref.timesteps.dtype and torch.equal(ours.timesteps, ref.timesteps)
    if len(ref.timesteps) > 1 and ref.timesteps[0] == ref.timesteps[1]:
        # rounding repeated the first timestep: diffusers would start at index 1 (skipping a step, then failing on
        # the last) unless told where to begin; ours starts at 0 (SigmaScheduler.index_for_timestep)
        ref.set_begin_index(0)
    assert torch.equal(ours.sigmas, ref.sigmas)
    if ours.config.get("rescale_betas_zero_snr") and ref.sigmas.max() > ref.sigmas[0]:
        # documented difference (SigmaScheduler.init_noise_sigma): ours starts at the first step's noise level
        assert ours.init_noise_sigma == float(ref.sigmas[0])
    else:
        assert ours.init_noise_sigma == float(ref.init_noise_sigma)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * ours.init_noise_sigma
    y = x.clone()
    if stochastic:
        step_kwargs = dict(step_kwargs)
        ours_kwargs = {**step_kwargs, "generator": _generators(seed + 1, per_sample)}
        ref_kwargs = {**step_kwargs, "generator": _generators(seed + 1, per_sample)}
    else:
        ours_kwargs = ref_kwargs = step_kwargs
    for t in ours.timesteps:
        x_in, y_in = ours.scale_model_input(x, t), ref.scale_model_input(y, t)
        assert _relative_error(x_in, y_in) <= TOL, f"model input differs at t={float(t)}"
        a = ours.step(model(x_in, t), t, x, **ours_kwargs)
        b = ref.step(model(y_in, t), t, y, **ref_kwargs)
        if not torch.isfinite(b.prev_sample).all():
            pytest.fail(f"reference produced non-finite values at t={float(t)}: grid row is ill-posed")
        assert _relative_error(a.prev_sample, b.prev_sample) <= TOL, f"prev_sample differs at t={float(t)}"
        reference_x0 = getattr(b, "pred_original_sample", None)
        if reference_x0 is None:
            assert a.pred_original_sample is None
        else:
            assert _relative_error(a.pred_original_sample, reference_x0) <= TOL, f"x0 differs at t={float(t)}"
        x, y = a.prev_sample, b.prev_sample
    return len(ours.timesteps)


def _schedule_kwargs(row):
    name, start, end = row["schedule"]
    spacing, offset = row["spacing"]
    return dict(beta_schedule=name, beta_start=start, beta_end=end, prediction_type=row["prediction"],
                timestep_spacing=spacing, steps_offset=offset)


def _sigma_kind_kwargs(kind):
    return dict(use_karras_sigmas=kind == "karras", use_exponential_sigmas=kind == "exponential")


def _make(cls, ref_cls, kwargs, ref_overrides=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-SNR with epsilon, diffusers' deprecation notices
        return cls(**kwargs), ref_cls(**{**kwargs, **(ref_overrides or {})})


def _row_id(row):
    return "-".join(v[0] if isinstance(v, tuple) else str(v) for v in row.values())


def _covers_every_value(rows, factors: dict):
    for key, values in factors.items():
        seen = {str(r[key]) for r in rows}
        assert seen == {str(v) for v in values}, (key, seen)


# ---- Euler ---------------------------------------------------------------------------------------------------
def _euler_grid():
    """schedule x prediction x spacing in full; sigma kind, interpolation, final sigma, churn, zero SNR and the
    step count rotate with different periods so that each meets each spacing."""
    rows = []
    for i, (schedule, prediction, spacing) in enumerate(
            itertools.product(SCHEDULES, ["epsilon", "v_prediction", "sample"], SPACINGS)):
        rows.append(dict(schedule=schedule, prediction=prediction, spacing=spacing,
                         sigmas=SIGMA_KINDS[(i + i // 3) % 3], interpolation=["linear", "log_linear"][(i // 2) % 2],
                         final=["zero", "sigma_min"][(i // 4) % 2], churn=(i + i // 9) % 3,
                         zero_snr=(i // 3) % 3 == 1, steps=STEP_COUNTS[(i // 5) % 4]))
    return rows


def _euler_reference_valid(row):
    """Ours interpolates log sigma at the timesteps (documented difference). On integer timesteps, and at the
    integer ends that Karras / exponential sigmas keep, that equals diffusers' linear interpolation, the reference
    for log_linear rows; linspace's fractional timesteps with plain sigmas are checked in closed form
    (test_euler_log_linear_interpolates_log_sigma)."""
    fractional = row["spacing"][0] == "linspace" and row["sigmas"] == "plain"
    return not (row["interpolation"] == "log_linear" and fractional)


EULER_GRID = [row for row in _euler_grid() if _euler_reference_valid(row)]


@pytest.mark.parametrize("row", EULER_GRID, ids=_row_id)
def test_euler_parity(row):
    kwargs = dict(_schedule_kwargs(row), **_sigma_kind_kwargs(row["sigmas"]), interpolation_type=row["interpolation"],
                  final_sigmas_type=row["final"], rescale_betas_zero_snr=row["zero_snr"])
    ours, ref = _make(EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler, kwargs,
                      {"interpolation_type": "linear"})
    churn = CHURNS[row["churn"]]
    assert run_parity(ours, ref, row["steps"], churn, stochastic=bool(churn)) == row["steps"]


def test_euler_grid_covers_every_factor():
    ran = EULER_GRID
    assert len(ran) == len(_euler_grid()) - 2
    _covers_every_value(ran, dict(schedule=SCHEDULES, prediction=["epsilon", "v_prediction", "sample"],
                                  spacing=SPACINGS, sigmas=SIGMA_KINDS, interpolation=["linear", "log_linear"],
                                  final=["zero", "sigma_min"], churn=range(3), zero_snr=[False, True],
                                  steps=STEP_COUNTS))
    for spacing in SPACINGS:  # every sigma kind and churn meets every spacing
        assert {r["sigmas"] for r in ran if r["spacing"] == spacing} == set(SIGMA_KINDS)
        assert {r["churn"] for r in ran if r["spacing"] == spacing} == {0, 1, 2}


def test_euler_karras_sigma_range_parity():
    kwargs = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True,
                  sigma_min=0.1, sigma_max=10.0, timestep_spacing="trailing")
    ours, ref = _make(EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler, kwargs)
    run_parity(ours, ref, 12)
    assert ours.sigmas[0].item() == pytest.approx(10.0, rel=1e-6) and ours.sigmas[-2].item() == pytest.approx(0.1)


def test_euler_log_linear_interpolates_log_sigma():
    """Closed form: at fractional t, log sigma is linear between the neighbouring training timesteps."""
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   interpolation_type="log_linear")
    sched.set_timesteps(7)
    # the float32 training schedule (as every scheduler uses), then the interpolation in float64
    ab = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
    log_sigma = (((1 - ab) / ab) ** 0.5).double().log()
    for t, sigma in zip(sched.timesteps.tolist(), sched.sigmas.tolist()):
        low = math.floor(t)
        high = min(low + 1, 999)
        w = t - low
        expected = math.exp((1 - w) * log_sigma[low].item() + w * log_sigma[high].item())
        assert sigma == pytest.approx(expected, rel=1e-6), t
    assert 0 < sched.timesteps[1] % 1 < 1  # really fractional
    assert sched.sigmas[-1] == 0 and len(sched.sigmas) == 8
    linear = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    linear.set_timesteps(7)
    assert torch.equal(linear.timesteps, sched.timesteps)
    # between integers, exp of the interpolated log lies below the interpolated sigma (convexity)
    fractional = [i for i, t in enumerate(sched.timesteps.tolist()) if t % 1]
    assert len(fractional) == 3 and all(sched.sigmas[i] < linear.sigmas[i] for i in fractional)


def test_euler_log_linear_differs_from_diffusers_as_documented():
    """diffusers' log_linear: N + 1 log-spaced sigmas for N steps, so the last step stops at sigma(0) > 0."""
    ref = diffusers.EulerDiscreteScheduler(interpolation_type="log_linear")
    ref.set_timesteps(10)
    assert len(ref.sigmas) == 12 and ref.sigmas[10].item() > 0.01  # the level reached after 10 steps
    ours = EulerDiscreteScheduler(interpolation_type="log_linear")
    ours.set_timesteps(10)
    assert len(ours.sigmas) == 11 and ours.sigmas[10].item() == 0.0


# ---- Euler ancestral -----------------------------------------------------------------------------------------
def _ancestral_grid():
    rows = []
    for i, (schedule, prediction, spacing) in enumerate(
            itertools.product(SCHEDULES, ["epsilon", "v_prediction"], SPACINGS)):
        rows.append(dict(schedule=schedule, prediction=prediction, spacing=spacing, zero_snr=(i // 3) % 2 == 1,
                         steps=STEP_COUNTS[(i + i // 4) % 4]))
    return rows


def _ancestral_kwargs(row):
    return dict(_schedule_kwargs(row), rescale_betas_zero_snr=row["zero_snr"])


def _noise_level_rises(row):
    """The clamped zero-SNR table is not monotonic (sigma(999) = 4096 < sigma(996..998)): where the listed
    timesteps step from 999 into that range, diffusers' sigma_up is the root of a negative number (NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = EulerAncestralDiscreteScheduler(**_ancestral_kwargs(row))
    sched.set_timesteps(row["steps"])
    return bool((sched.sigmas[1:] > sched.sigmas[:-1]).any())


ANCESTRAL_GRID = [row for row in _ancestral_grid() if not _noise_level_rises(row)]


@pytest.mark.parametrize("row", ANCESTRAL_GRID, ids=_row_id)
def test_euler_ancestral_parity(row):
    kwargs = _ancestral_kwargs(row)
    ours, ref = _make(EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler, kwargs)
    assert run_parity(ours, ref, row["steps"], stochastic=True) == row["steps"]


def test_euler_ancestral_grid_covers_every_factor():
    assert len(ANCESTRAL_GRID) == len(_ancestral_grid()) - 1  # the one rising row is tested on its own
    _covers_every_value(ANCESTRAL_GRID, dict(schedule=SCHEDULES, prediction=["epsilon", "v_prediction"],
                                             spacing=SPACINGS, zero_snr=[False, True], steps=STEP_COUNTS))
    for spacing in SPACINGS:
        assert {r["zero_snr"] for r in ANCESTRAL_GRID if r["spacing"] == spacing} == {False, True}


def test_euler_ancestral_rising_noise_level_takes_the_ode_step():
    """Where the zero-SNR table rises (999 -> 996 at 333 trailing steps), ours adds no noise on that step and
    stays finite (diffusers returns NaN there)."""
    kwargs = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    first_steps = []
    for seed in (1, 2):
        sched = EulerAncestralDiscreteScheduler(**kwargs)
        sched.set_timesteps(333)
        assert sched.sigmas[1] > sched.sigmas[0]
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
        generator = torch.Generator().manual_seed(seed)
        for i, t in enumerate(sched.timesteps):
            x = sched.step(fake_model(sched.scale_model_input(x, t), t), t, x, generator=generator).prev_sample
            if i == 0:
                first_steps.append(x)
        assert torch.isfinite(x).all()
    assert torch.equal(*first_steps)  # no noise drawn into the rising step, whatever the generator


def test_euler_ancestral_sample_prediction_equals_epsilon_form():
    """diffusers refuses prediction_type="sample" here; ours takes x0 = output. Same trajectory as an epsilon
    model that outputs the equivalent eps = (x - x0) / sigma (float32 rounding only)."""
    results = []
    for prediction in ("sample", "epsilon"):
        sched = EulerAncestralDiscreteScheduler(prediction_type=prediction, beta_schedule="scaled_linear",
                                                beta_start=0.00085, beta_end=0.012)
        sched.set_timesteps(10)
        generator = torch.Generator().manual_seed(5)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)) * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            x0 = torch.tanh(sched.scale_model_input(x, t))
            output = x0 if prediction == "sample" else (x - x0) / sched.sigmas[i]
            x = sched.step(output, t, x, generator=generator).prev_sample
        results.append(x)
    assert (results[0] - results[1]).abs().max().item() <= 1e-5


# ---- Heun ----------------------------------------------------------------------------------------------------
def _heun_grid():
    rows = []
    for i, (schedule, prediction, spacing) in enumerate(
            itertools.product(SCHEDULES, ["epsilon", "v_prediction", "sample"], SPACINGS)):
        rows.append(dict(schedule=schedule, prediction=prediction, spacing=spacing,
                         sigmas=SIGMA_KINDS[(i + i // 3) % 3], clip=(i // 2) % 2 == 1,
                         steps=STEP_COUNTS[(i + i // 5) % 4]))
    return rows


HEUN_GRID = _heun_grid()


@pytest.mark.parametrize("row", HEUN_GRID, ids=_row_id)
def test_heun_parity(row):
    kwargs = dict(_schedule_kwargs(row), **_sigma_kind_kwargs(row["sigmas"]), clip_sample=row["clip"],
                  clip_sample_range=0.8)
    ours, ref = _make(HeunDiscreteScheduler, diffusers.HeunDiscreteScheduler, kwargs)
    assert run_parity(ours, ref, row["steps"]) == 2 * row["steps"] - 1  # model calls


def test_heun_grid_covers_every_factor():
    _covers_every_value(HEUN_GRID, dict(schedule=SCHEDULES, prediction=["epsilon", "v_prediction", "sample"],
                                        spacing=SPACINGS, sigmas=SIGMA_KINDS, clip=[False, True], steps=STEP_COUNTS))
    for spacing in SPACINGS:
        assert {r["sigmas"] for r in HEUN_GRID if r["spacing"] == spacing} == set(SIGMA_KINDS)


# ---- DPM-Solver ----------------------------------------------------------------------------------------------
ALGORITHMS = ["dpmsolver++", "sde-dpmsolver++", "dpmsolver"]


def _dpm_grid():
    """algorithm x order x solver type x spacing in full; the rest rotates."""
    rows = []
    for i, (algorithm, order, solver_type, spacing) in enumerate(
            itertools.product(ALGORITHMS, [1, 2, 3], ["midpoint", "heun"], SPACINGS)):
        rows.append(dict(algorithm=algorithm, order=order, solver_type=solver_type, spacing=spacing,
                         schedule=SCHEDULES[(i + i // 3) % 3], prediction=["epsilon", "v_prediction", "sample"][i % 3],
                         sigmas=SIGMA_KINDS[(i // 2 + i // 9) % 3], lower_order_final=(i // 4) % 2 == 0,
                         euler_at_final=(i // 5) % 3 == 1,
                         final="sigma_min" if algorithm == "dpmsolver" else ["zero", "sigma_min"][(i // 7) % 2],
                         lambda_min_clipped=[-float("inf"), -4.0][(i // 6) % 2], thresholding=(i // 8) % 2 == 1,
                         zero_snr=(i // 3) % 4 == 2, steps=STEP_COUNTS[(i + i // 6) % 4]))
    return rows


def _dpm_reference_valid(row):
    """Karras / exponential sigmas end on sigma(0); with final_sigmas_type="sigma_min" the last step has length
    h = 0, and diffusers' "heun" and 3rd-order terms divide 0 by 0 (NaN) unless that step is first order
    (test_dpm_zero_length_final_step covers ours)."""
    zero_length_last = row["final"] == "sigma_min" and row["sigmas"] != "plain"
    last_is_first_order = row["euler_at_final"] or (row["lower_order_final"] and row["steps"] < 15)
    heun_terms = row["order"] == 3 or (row["order"] == 2 and row["solver_type"] == "heun")
    return not (zero_length_last and heun_terms and not last_is_first_order)


DPM_GRID = [row for row in _dpm_grid() if _dpm_reference_valid(row)]


def _dpm_kwargs(row):
    kwargs = dict(_schedule_kwargs(row), **_sigma_kind_kwargs(row["sigmas"]), algorithm_type=row["algorithm"],
                  solver_order=row["order"], solver_type=row["solver_type"],
                  lower_order_final=row["lower_order_final"], euler_at_final=row["euler_at_final"],
                  final_sigmas_type=row["final"], lambda_min_clipped=row["lambda_min_clipped"],
                  thresholding=row["thresholding"], rescale_betas_zero_snr=row["zero_snr"])
    if row["thresholding"]:
        kwargs.update(dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    return kwargs


@pytest.mark.parametrize("row", DPM_GRID, ids=_row_id)
def test_dpm_solver_parity(row):
    ours, ref = _make(DPMSolverMultistepScheduler, diffusers.DPMSolverMultistepScheduler, _dpm_kwargs(row))
    stochastic = row["algorithm"].startswith("sde")
    calls = run_parity(ours, ref, row["steps"], stochastic=stochastic)
    assert calls == ours.num_inference_steps == len(ref.timesteps)


def test_dpm_solver_grid_covers_every_factor():
    assert len(DPM_GRID) >= len(_dpm_grid()) - 6
    _covers_every_value(DPM_GRID, dict(
        algorithm=ALGORITHMS, order=[1, 2, 3], solver_type=["midpoint", "heun"], spacing=SPACINGS,
        schedule=SCHEDULES, prediction=["epsilon", "v_prediction", "sample"], sigmas=SIGMA_KINDS,
        lower_order_final=[True, False], euler_at_final=[True, False], final=["zero", "sigma_min"],
        lambda_min_clipped=[-float("inf"), -4.0], thresholding=[True, False], zero_snr=[True, False],
        steps=STEP_COUNTS))
    for algorithm, order in itertools.product(ALGORITHMS, [2, 3]):  # multistep orders meet few and many steps
        assert {r["steps"] < 15 for r in DPM_GRID if (r["algorithm"], r["order"]) == (algorithm, order)} == \
            {True, False}
    assert {r["sigmas"] for r in DPM_GRID if r["algorithm"] == "sde-dpmsolver++"} == set(SIGMA_KINDS)


def test_dpm_solver_learned_variance_parity():
    """A 2C-channel output (epsilon, learned variance): the first C channels are the noise prediction."""
    def model(x, t):
        return torch.cat([fake_model(x, t), torch.tanh(x.flip(-1))], dim=1)
    kwargs = dict(variance_type="learned_range", solver_order=3, beta_schedule="linear")
    ours, ref = _make(DPMSolverMultistepScheduler, diffusers.DPMSolverMultistepScheduler, kwargs)
    run_parity(ours, ref, 20, model=model)


def test_dpm_zero_length_final_step():
    """Karras sigmas with final_sigmas_type="sigma_min": the last step goes from sigma(0) to sigma(0) and returns
    its input unchanged (diffusers: NaN with the 3rd-order or "heun" terms)."""
    for order, solver_type in [(3, "midpoint"), (2, "heun")]:
        sched = DPMSolverMultistepScheduler(use_karras_sigmas=True, final_sigmas_type="sigma_min",
                                            solver_order=order, solver_type=solver_type, lower_order_final=False)
        sched.set_timesteps(20)
        assert sched.sigmas[-1] == sched.sigmas[-2]
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for t in sched.timesteps:
            previous, x = x, sched.step(fake_model(x, t), t, x).prev_sample
        assert torch.isfinite(x).all() and torch.equal(x, previous)


def test_sde_dpm_solver_rising_noise_level_takes_the_ode_step():
    """Zero SNR at 333 trailing steps goes from sigma(999) = 4096 up to sigma(996) = 5088: ours takes the ODE step
    there (the same as dpmsolver++'s first step) and stays finite (diffusers: NaN)."""
    results = {}
    for algorithm in ("sde-dpmsolver++", "dpmsolver++"):
        sched = DPMSolverMultistepScheduler(algorithm_type=algorithm, rescale_betas_zero_snr=True,
                                            prediction_type="v_prediction", timestep_spacing="trailing")
        sched.set_timesteps(333)
        assert sched.sigmas[1] > sched.sigmas[0]
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        generator = torch.Generator().manual_seed(1)
        steps = []
        for t in sched.timesteps:
            x = sched.step(fake_model(x, t), t, x, generator=generator).prev_sample
            steps.append(x)
        assert torch.isfinite(x).all()
        results[algorithm] = steps[0]
    assert torch.equal(results["sde-dpmsolver++"], results["dpmsolver++"])


def test_dpm_repeated_first_timestep_runs_every_step():
    """Zero SNR + Karras sigmas: the first timesteps repeat (995, 995, ...). Ours starts at index 0 and takes all N
    steps from sigma = 4096 down to 0 (diffusers starts at index 1, documented in SigmaScheduler.index_for_timestep)."""
    sched = DPMSolverMultistepScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                        use_karras_sigmas=True, timestep_spacing="trailing")
    sched.set_timesteps(40)
    assert sched.timesteps[0] == sched.timesteps[1] and sched.sigmas[0].item() == 4096.0
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(sched.timesteps):
        assert sched.step_index in (None, i)
        x = sched.step(fake_model(x, t), t, x).prev_sample
    assert sched.step_index == 40 and torch.isfinite(x).all()


def test_dpm_solver_oracle_recovers_x0():
    """Closed form: with the true x0 behind x_T (a point mass), data-prediction DPM-Solver++ of every order lands
    on x0 exactly: every stored output equals x0, so D1 = D2 = 0 and the first-order update is exact."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g,
                                                                                   dtype=torch.float64)
    for order, solver_type in itertools.product([1, 2, 3], ["midpoint", "heun"]):
        sched = DPMSolverMultistepScheduler(solver_order=order, solver_type=solver_type, prediction_type="sample",
                                            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        sched.set_timesteps(9)
        x = sched.add_noise(x0, noise, sched.timesteps[:1])
        for t in sched.timesteps:
            x = sched.step(x0, t, x).prev_sample
        assert (x - x0).abs().max().item() < 1e-6, (order, solver_type)


# ---- stochastic samplers with one generator per sample -------------------------------------------------------
@pytest.mark.parametrize("name", ["euler_churn", "euler_ancestral", "sde-dpmsolver++"])
def test_per_sample_generators(name):
    """A list of generators, one per sample: same trajectory as diffusers with the same list, and sample b's
    trajectory does not depend on the batch it is in."""
    base = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
                steps_offset=1)
    cls, ref_cls, kwargs, step_kwargs = {
        "euler_churn": (EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler, {}, dict(s_churn=2.0)),
        "euler_ancestral": (EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler, {}, {}),
        "sde-dpmsolver++": (DPMSolverMultistepScheduler, diffusers.DPMSolverMultistepScheduler,
                            dict(algorithm_type="sde-dpmsolver++"), {}),
    }[name]
    ours, ref = _make(cls, ref_cls, {**base, **kwargs})
    run_parity(ours, ref, 12, step_kwargs, stochastic=True, per_sample=True, seed=10)

    def trajectory(batch, seeds):
        ours.set_timesteps(12)
        x = batch * ours.init_noise_sigma
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        for t in ours.timesteps:
            x = ours.step(fake_model(ours.scale_model_input(x, t), t), t, x, generator=generators,
                          **step_kwargs).prev_sample
        return x
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    both = trajectory(start, [21, 22])
    alone = trajectory(start[1:], [22])
    assert torch.equal(both[1:], alone)
    assert not torch.equal(both[:1], trajectory(start[:1], [23]))  # the noise really comes from the generator


# ---- sigma helpers in closed form ----------------------------------------------------------------------------
def test_karras_sigmas_eq5():
    """Karras et al. eq. 5: sigma^(1/rho) is linear in i from sigma_max^(1/rho) to sigma_min^(1/rho)."""
    sigmas = karras_sigmas(0.03, 14.6, 6, rho=7.0)
    assert sigmas[0] == pytest.approx(14.6, rel=1e-12) and sigmas[-1] == pytest.approx(0.03, rel=1e-12)
    roots = sigmas ** (1 / 7)
    np.testing.assert_allclose(np.diff(roots), (0.03 ** (1 / 7) - 14.6 ** (1 / 7)) / 5, rtol=1e-12)
    expected_i2 = (14.6 ** (1 / 7) + 2 / 5 * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    assert sigmas[2] == pytest.approx(expected_i2, rel=1e-12)
    log_sigmas = np.log(exponential_sigmas(0.03, 14.6, 6))
    np.testing.assert_allclose(np.diff(log_sigmas), (math.log(0.03) - math.log(14.6)) / 5, rtol=1e-12)


def test_sigma_timestep_round_trip():
    """sigma_to_timestep inverts timestep_to_sigma(log_linear) on a monotonic table, integers and in between."""
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    train_sigmas = (((1 - ab) / ab) ** 0.5).numpy()
    timesteps = np.array([0.0, 1.0, 17.25, 500.5, 998.9, 999.0])
    sigmas = timestep_to_sigma(timesteps, train_sigmas, "log_linear")
    np.testing.assert_allclose(sigma_to_timestep(sigmas, train_sigmas), timesteps, atol=1e-4)
    assert sigma_to_timestep([1e-9], train_sigmas)[0] == 0.0 and sigma_to_timestep([1e9], train_sigmas)[0] == 999.0


def test_oracle_sigma_samplers_recover_x0():
    """Closed form: for a point mass x0 the ODE in sigma is x = x0 + sigma n, a straight line, so Euler and Heun
    with the true eps / v land on x0 exactly, whatever the sigmas, up to float32 rounding (sigmas, step sizes and
    Euler's arithmetic are float32, as in diffusers) relative to |x_T| ~ 50."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g,
                                                                                   dtype=torch.float64)
    for cls, prediction, extra in [(EulerDiscreteScheduler, "epsilon", dict(use_karras_sigmas=True)),
                                   (EulerDiscreteScheduler, "v_prediction", dict(interpolation_type="log_linear")),
                                   (HeunDiscreteScheduler, "epsilon", dict(use_exponential_sigmas=True)),
                                   (HeunDiscreteScheduler, "v_prediction", {})]:
        sched = cls(prediction_type=prediction, **extra)
        sched.set_timesteps(8)
        x = start = x0 + sched.sigmas[0].double() * noise
        for i, t in enumerate(sched.timesteps):
            alpha_bar = 1 / (1 + sched.sigmas[i].double() ** 2)
            v = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
            x = sched.step(noise if prediction == "epsilon" else v, t, x).prev_sample
        assert (x - x0).abs().max().item() < 1e-6 * start.abs().max().item(), (cls.__name__, prediction)


def test_zero_snr_init_noise_sigma_is_the_first_level():
    """The clamped zero-SNR table is not monotonic: sigma(996..998) > sigma(999) = 4096. diffusers starts from
    max(sigmas) = sigma(996); ours from the first step's level, so the first model input is unit-scaled."""
    ours = EulerDiscreteScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                  timestep_spacing="trailing")
    ref = diffusers.EulerDiscreteScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                           timestep_spacing="trailing")
    ours.set_timesteps(333)
    ref.set_timesteps(333)
    assert ours.timesteps[:2].tolist() == [999.0, 996.0] and ours.sigmas[0].item() == 4096.0
    assert ours.init_noise_sigma == 4096.0 and float(ref.init_noise_sigma) == pytest.approx(5088.75, abs=0.01)


def test_add_noise_parity():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for cls, ref_cls in [(EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler),
                         (EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler),
                         (HeunDiscreteScheduler, diffusers.HeunDiscreteScheduler),
                         (DPMSolverMultistepScheduler, diffusers.DPMSolverMultistepScheduler)]:
        kwargs = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        if cls is not EulerAncestralDiscreteScheduler:
            kwargs["use_karras_sigmas"] = True
        ours, ref = _make(cls, ref_cls, kwargs)
        ours.set_timesteps(15)
        ref.set_timesteps(15)
        timesteps = ours.timesteps[[0, 3]]
        assert _relative_error(ours.add_noise(x0, noise, timesteps), ref.add_noise(x0, noise, timesteps)) <= TOL


def test_dpm_add_noise_before_set_timesteps_is_the_forward_process():
    """Documented difference: before set_timesteps every training timestep has its own sigma (diffusers pairs t
    with sigma(T - 1 - t)); the result is sqrt(ab_t) x0 + sqrt(1 - ab_t) noise."""
    sched = DPMSolverMultistepScheduler()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([10, 900])
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    assert (sched.add_noise(x0, noise, t) - expected).abs().max().item() <= 1e-6


# ---- state, orders and refused configurations ----------------------------------------------------------------
def test_set_timesteps_resets_multistep_state():
    """A trajectory abandoned half way leaves nothing behind: the next one equals a fresh scheduler's."""
    for cls, kwargs in [(DPMSolverMultistepScheduler, dict(solver_order=3)), (HeunDiscreteScheduler, {})]:
        def run(sched, steps):
            sched.set_timesteps(10)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * sched.init_noise_sigma
            for t in sched.timesteps[:steps]:
                x = sched.step(fake_model(sched.scale_model_input(x, t), t), t, x).prev_sample
            return x
        used = cls(**kwargs)
        run(used, 4)
        assert torch.equal(run(used, None), run(cls(**kwargs), None)), cls.__name__


def test_orders_and_model_calls():
    assert (EulerDiscreteScheduler.order, EulerAncestralDiscreteScheduler.order, HeunDiscreteScheduler.order,
            DPMSolverMultistepScheduler.order) == (1, 1, 2, 1)
    # 50 leading steps (offset 1) on Stable Diffusion's schedule: model calls, first timestep, init_noise_sigma.
    # Leading spacing starts x_T at sqrt(sigma^2 + 1) = 1 / sqrt(ab_981) = 1 / 0.0760 (REFERENCES.md), so the
    # first model input is unit Gaussian; DPM-Solver spaces its own timesteps, T // (N + 1) = 19 apart from 951.
    ab = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
    facts = {}
    for cls in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler,
                DPMSolverMultistepScheduler):
        sched = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
                    steps_offset=1)
        sched.set_timesteps(50)
        facts[cls.__name__] = (len(sched.timesteps), float(sched.timesteps[0]), sched.init_noise_sigma)
    expected_init = 1 / ab[981].sqrt().item()
    assert expected_init == pytest.approx(1 / 0.0760, rel=1e-3)
    leading = pytest.approx(expected_init, rel=1e-5)
    assert facts == {"EulerDiscreteScheduler": (50, 981.0, leading),
                     "EulerAncestralDiscreteScheduler": (50, 981.0, leading),
                     "HeunDiscreteScheduler": (99, 981.0, leading),  # 2N - 1 calls
                     "DPMSolverMultistepScheduler": (50, 951.0, 1.0)}


def test_misuse_errors():
    sched = DPMSolverMultistepScheduler()
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 999, x)
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match="not in the current list"):
        sched.step(x, 505, x)
    euler = EulerDiscreteScheduler()
    euler.set_timesteps(3)
    for t in euler.timesteps:
        euler.step(x, t, x)
    with pytest.raises(ValueError, match="already taken every step"):
        euler.step(x, euler.timesteps[0], x)
    euler.set_timesteps(3)
    euler.step(x, euler.timesteps[0], x)
    with pytest.raises(ValueError, match="expected timestep"):
        euler.step(x, euler.timesteps[0], x)  # the same timestep twice


REFUSED = [
    (EulerDiscreteScheduler, dict(timestep_type="continuous"), "timestep_type"),
    (EulerDiscreteScheduler, dict(use_karras_sigmas=True, use_exponential_sigmas=True), "at most one"),
    (EulerDiscreteScheduler, dict(use_beta_sigmas=True), "use_beta_sigmas"),
    (EulerDiscreteScheduler, dict(interpolation_type="cubic"), "interpolation_type"),
    (EulerDiscreteScheduler, dict(final_sigmas_type="one"), "final_sigmas_type"),
    (EulerDiscreteScheduler, dict(timestep_spacing="uniform"), "timestep_spacing"),
    (EulerAncestralDiscreteScheduler, dict(prediction_type="flow_prediction"), "prediction_type"),
    (EulerAncestralDiscreteScheduler, dict(beta_schedule="cosine"), "beta_schedule"),
    (HeunDiscreteScheduler, dict(use_beta_sigmas=True), "use_beta_sigmas"),
    (HeunDiscreteScheduler, dict(use_karras_sigmas=True, use_exponential_sigmas=True), "at most one"),
    (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver"), "final_sigmas_type='zero'"),
    (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), "deprecated"),
    (DPMSolverMultistepScheduler, dict(algorithm_type="dpm"), "algorithm_type"),
    (DPMSolverMultistepScheduler, dict(solver_type="taylor"), "solver_type"),
    (DPMSolverMultistepScheduler, dict(solver_order=4), "solver_order"),
    (DPMSolverMultistepScheduler, dict(use_flow_sigmas=True), "use_flow_sigmas"),
    (DPMSolverMultistepScheduler, dict(use_lu_lambdas=True), "use_lu_lambdas"),
    (DPMSolverMultistepScheduler, dict(use_dynamic_shifting=True), "use_dynamic_shifting"),
    (DPMSolverMultistepScheduler, dict(use_beta_sigmas=True), "use_beta_sigmas"),
    (DPMSolverMultistepScheduler, dict(prediction_type="flow_prediction"), "prediction_type"),
    (DPMSolverMultistepScheduler, dict(variance_type="fixed_small"), "variance_type"),
]


@pytest.mark.parametrize("cls,kwargs,match", REFUSED, ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_refused_configurations(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_diffusers_also_refuses_dpmsolver_with_final_zero():
    with pytest.raises(ValueError, match="final_sigmas_type"):
        diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver")


def test_dpm_solver_type_aliases_as_diffusers():
    """Configs of diffusers' DEIS / UniPC schedulers carry algorithm / solver types that DPM-Solver rewrites."""
    # (diffusers checks final_sigmas_type against "deis" before rewriting it, so it needs sigma_min there)
    for kwargs in (dict(solver_type="bh2"), dict(solver_type="logrho", algorithm_type="deis",
                                                final_sigmas_type="sigma_min")):
        ours, ref = _make(DPMSolverMultistepScheduler, diffusers.DPMSolverMultistepScheduler, kwargs)
        assert (ours.config["solver_type"], ours.config["algorithm_type"]) == \
            (ref.config.solver_type, ref.config.algorithm_type)


# ---- diffusers configs ---------------------------------------------------------------------------------------
CONFIG_CASES = [
    (EulerDiscreteScheduler, "EulerDiscreteScheduler",
     dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
          steps_offset=1, use_karras_sigmas=True, final_sigmas_type="sigma_min")),
    (EulerAncestralDiscreteScheduler, "EulerAncestralDiscreteScheduler",
     dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
          rescale_betas_zero_snr=True, timestep_spacing="trailing")),
    (HeunDiscreteScheduler, "HeunDiscreteScheduler",
     dict(beta_schedule="scaled_linear", use_exponential_sigmas=True, clip_sample=True)),
    (DPMSolverMultistepScheduler, "DPMSolverMultistepScheduler",
     dict(beta_schedule="squaredcos_cap_v2", solver_order=3, algorithm_type="sde-dpmsolver++", solver_type="heun",
          lambda_min_clipped=-5.1, thresholding=True, euler_at_final=True)),
]


@pytest.mark.parametrize("cls,ref_name,kwargs", CONFIG_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_from_config_reads_diffusers_json(tmp_path, cls, ref_name, kwargs):
    ref = getattr(diffusers, ref_name)(**kwargs)
    ref.save_config(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key diffusers wrote is known
        ours = cls.from_config(tmp_path / "scheduler" / "scheduler_config.json")
    # Heun's zero-SNR rescale is ours only (diffusers' Heun lacks it); off, so the schedules still agree
    ours_only = set(ours.config) - set(saved)
    assert set(ours.config) - ours_only == {k for k in saved if not k.startswith("_")}
    assert all(ours.config[key] is False for key in ours_only) and ours_only <= {"rescale_betas_zero_snr"}
    for key, value in ((k, v) for k, v in ours.config.items() if k not in ours_only):
        assert value == saved[key] or (value is None and saved[key] is None), key
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    # and back: a config we save loads in diffusers with the same values
    ours.save_config(tmp_path / "ours")
    again = getattr(diffusers, ref_name).from_config(
        json.loads((tmp_path / "ours" / "scheduler_config.json").read_text()))
    assert {k: again.config[k] for k in saved if k in ours.config} == {k: ref.config[k] for k in saved
                                                                        if k in ours.config}
