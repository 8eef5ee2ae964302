"""UniPC, PNDM and DDIM-inversion schedulers against diffusers: full trajectories on a rotated grid of configurations,
config interop, and the cases where ours differs on purpose (checked against closed form in
test_solver_convergence.py; here only that diffusers really differs there).

Tolerance: at every step, max |ours - reference| <= 1e-5 * max(max |reference|, 1), float32, for prev_sample,
pred_original_sample (where diffusers returns one) and the scale_model_input output.
"""
import itertools
import json
import math
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm_lite.schedulers.ddim_inverse import DDIMInverseScheduler  # noqa: E402
from ldm_lite.schedulers.pndm import PNDMScheduler  # noqa: E402
from ldm_lite.schedulers.unipc import UniPCMultistepScheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
SCHEDULES = [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 1e-4, 0.02)]
STEP_COUNTS = [7, 333, 10, 50]


def fake_model(x, t):
    """Deterministic stand-in for a network (as in test_schedulers.py): a smooth function of x_t and t."""
    return 0.9 * torch.tanh(0.8 * x) + 0.1 * math.cos(float(t) / 97.0) * torch.sin(3 * x)


def _schedule_kwargs(row):
    name, start, end = row["schedule"]
    return dict(beta_schedule=name, beta_start=start, beta_end=end, prediction_type=row["prediction"],
                timestep_spacing=row["spacing"], steps_offset=row["steps_offset"])


def _assert_close(ours, reference, what, t):
    assert torch.isfinite(reference).all(), f"reference {what} is not finite at t={int(t)}: the row is ill-posed"
    scale = max(reference.abs().max().item(), 1.0)
    error = (ours - reference).abs().max().item()
    assert error <= TOL * scale, f"{what} differs at t={int(t)}: {error:.3g} (scale {scale:.3g})"


def _run_pair(ours, ref, steps, compare_last=True, seed=0):
    """Both schedulers from the same x_T = init_noise_sigma * randn through every listed timestep."""
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.init_noise_sigma == ref.init_noise_sigma
    x = ref.init_noise_sigma * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    y = x.clone()
    for i, t in enumerate(ref.timesteps):
        model_in_ours, model_in_ref = ours.scale_model_input(x, t), ref.scale_model_input(y, t)
        _assert_close(model_in_ours, model_in_ref, "scale_model_input", t)
        a = ours.step(fake_model(model_in_ours, t), t, x)
        b = ref.step(fake_model(model_in_ref, t), t, y)
        if i == len(ref.timesteps) - 1 and not compare_last:
            break
        _assert_close(a.prev_sample, b.prev_sample, "prev_sample", t)
        reference_x0 = getattr(b, "pred_original_sample", None)
        if reference_x0 is None:
            assert a.pred_original_sample is None
        else:
            _assert_close(a.pred_original_sample, reference_x0, "pred_original_sample", t)
        x, y = a.prev_sample, b.prev_sample
    return ours, ref


def _make_pair(ours_cls, ref_cls, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-SNR with epsilon warns (ours) / deprecations (diffusers)
        return ours_cls(**kwargs), ref_cls(**kwargs)


def _row_id(row):
    values = [row["schedule"][0]] + [v for k, v in row.items() if k != "schedule"]
    return "-".join(str(v).replace(" ", "") for v in values)


# ---- UniPC ---------------------------------------------------------------------------------------------------
def _unipc_grid():
    """schedule x prediction x spacing in full; step count and UniPC's options rotate with the row index."""
    rows = []
    for i, (schedule, prediction, spacing) in enumerate(itertools.product(
            SCHEDULES, ["epsilon", "v_prediction", "sample"], ["linspace", "leading", "trailing"])):
        predict_x0 = (i // 5) % 2 == 0
        rows.append(dict(schedule=schedule, prediction=prediction, spacing=spacing,
                         steps_offset=int(spacing == "leading" and (i // 3) % 2 == 0), steps=STEP_COUNTS[i % 4],
                         solver_order=1 + (i // 7) % 3, solver_type=("bh1", "bh2")[(i // 2) % 2],
                         predict_x0=predict_x0, lower_order_final=i % 2 == 0,
                         final_sigmas_type=("zero", "sigma_min")[(i // 5) % 2], use_karras_sigmas=i % 3 == 2,
                         thresholding=predict_x0 and i % 4 == 3, disable_corrector=(0, 2) if i % 5 == 4 else (),
                         rescale_betas_zero_snr=i % 6 == 3))
    return rows


def _unipc_reference_starts_late(row):
    """Karras sigmas whose first timesteps round to the same value (cosine and zero-SNR schedules: sigma_max in
    the thousands): diffusers starts such a trajectory at the second place of the repeated timestep, skipping the
    first sigma, and fails on the last call (test_unipc_reference_starts_late_on_a_repeated_first_timestep)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = UniPCMultistepScheduler(**_schedule_kwargs(row), use_karras_sigmas=row["use_karras_sigmas"],
                                            rescale_betas_zero_snr=row["rescale_betas_zero_snr"])
    scheduler.set_timesteps(row["steps"])
    return len(scheduler.timesteps) > 1 and scheduler.timesteps[0] == scheduler.timesteps[1]


UNIPC_GRID = [row for row in _unipc_grid() if not _unipc_reference_starts_late(row)]
UNIPC_OPTIONS = ("solver_order", "solver_type", "predict_x0", "lower_order_final", "final_sigmas_type",
                 "use_karras_sigmas", "thresholding", "disable_corrector", "rescale_betas_zero_snr")


def _unipc_reference_final_step_broken(row):
    """diffusers evaluates its update at h = inf for a step to sigma 0: inf/NaN unless bh2, predict_x0 and a
    first-order last step (ours returns the x0 estimate). Karras sigmas with final_sigmas_type="sigma_min" end
    with a step from sigma_min to sigma_min, h = 0: NaN above first order (ours returns the sample). See
    test_solver_convergence.py for both."""
    first_order_last = row["lower_order_final"] or row["solver_order"] == 1
    if row["final_sigmas_type"] == "sigma_min":
        return row["use_karras_sigmas"] and not first_order_last
    return not (row["solver_type"] == "bh2" and row["predict_x0"] and first_order_last)


@pytest.mark.parametrize("row", UNIPC_GRID, ids=_row_id)
def test_unipc_parity(row):
    options = {k: (list(row[k]) if k == "disable_corrector" else row[k]) for k in UNIPC_OPTIONS}
    ours, ref = _make_pair(UniPCMultistepScheduler, diffusers.UniPCMultistepScheduler,
                           {**_schedule_kwargs(row), **options})
    _run_pair(ours, ref, row["steps"], compare_last=not _unipc_reference_final_step_broken(row))
    assert torch.equal(ours.sigmas, ref.sigmas)


UNIPC_FACTORS = dict(schedule=SCHEDULES, prediction=["epsilon", "v_prediction", "sample"],
                     spacing=["linspace", "leading", "trailing"], steps=STEP_COUNTS, steps_offset=[0, 1],
                     solver_order=[1, 2, 3], solver_type=["bh1", "bh2"], predict_x0=[True, False],
                     lower_order_final=[True, False], final_sigmas_type=["zero", "sigma_min"],
                     use_karras_sigmas=[False, True], thresholding=[False, True], disable_corrector=[(), (0, 2)],
                     rescale_betas_zero_snr=[False, True])


def test_unipc_grid_covers_every_factor():
    """Every value of every factor runs, also among the rows compared up to and including the last step."""
    full_runs = [r for r in UNIPC_GRID if not _unipc_reference_final_step_broken(r)]
    for key, values in UNIPC_FACTORS.items():
        assert {str(r[key]) for r in UNIPC_GRID} == {str(v) for v in values}, key
        assert {str(r[key]) for r in full_runs} == {str(v) for v in values}, key


def test_unipc_reference_starts_late_on_a_repeated_first_timestep():
    """The rows left out of the grid: diffusers skips the first sigma there and then runs out of sigmas."""
    left_out = [row for row in _unipc_grid() if _unipc_reference_starts_late(row)]
    assert {row["schedule"][0] for row in left_out} == {"squaredcos_cap_v2"}
    ref = diffusers.UniPCMultistepScheduler(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    ours = UniPCMultistepScheduler(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    ref.set_timesteps(7)
    ours.set_timesteps(7)
    assert ref.timesteps[:2].tolist() == [999, 999]
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ref.step(fake_model(x, 999), 999, x)
    ours.step(fake_model(x, 999), 999, x)
    assert (ref.step_index, ours.step_index) == (2, 1)
    with pytest.raises(AssertionError):  # its order for the step after the last is 0
        for t in ref.timesteps[1:]:
            x = ref.step(fake_model(x, t), t, x).prev_sample


def test_unipc_reference_final_step_is_really_broken():
    """The rows whose last step is left out above: diffusers' last step is not finite there."""
    for kwargs in (dict(solver_type="bh1"), dict(predict_x0=False), dict(lower_order_final=False)):
        ref = diffusers.UniPCMultistepScheduler(**kwargs)
        ref.set_timesteps(10)
        x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        for t in ref.timesteps:
            x = ref.step(fake_model(x, t), t, x).prev_sample
        assert not torch.isfinite(x).all(), kwargs
        assert _unipc_reference_final_step_broken(dict(final_sigmas_type="zero", solver_order=2, **{
            "solver_type": "bh2", "predict_x0": True, "lower_order_final": True, **kwargs}))


def test_unipc_add_noise_parity():
    for karras in (False, True):
        ours, ref = UniPCMultistepScheduler(use_karras_sigmas=karras), diffusers.UniPCMultistepScheduler(
            use_karras_sigmas=karras)
        ours.set_timesteps(20)
        ref.set_timesteps(20)
        g = torch.Generator().manual_seed(0)
        x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
        t = ref.timesteps[[0, 5, 13, 19]]
        _assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), "add_noise", t[0])


# ---- PNDM ----------------------------------------------------------------------------------------------------
def _pndm_grid():
    rows = []
    for i, (schedule, prediction, spacing) in enumerate(itertools.product(
            SCHEDULES, ["epsilon", "v_prediction"], ["leading", "trailing", "linspace"])):
        rows.append(dict(schedule=schedule, prediction=prediction, spacing=spacing,
                         steps_offset=int(spacing == "leading" and (i // 6) % 2 == 1),
                         steps=(STEP_COUNTS[i % 4] if spacing != "trailing" else (10, 50)[i % 2]),
                         skip_prk_steps=(i // 3) % 2 == 1, set_alpha_to_one=(i // 4) % 2 == 0))
    return rows


def _pndm_reference_agrees(row):
    """diffusers' PNDM ends every update at t - T // N (and its Runge-Kutta half steps at t - (T // N) // 2); that is
    the timestep of the next model call only on uniform lists (and even T // N with Runge-Kutta)."""
    stride = 1000 // row["steps"]
    listed = PNDMScheduler(timestep_spacing=row["spacing"], steps_offset=row["steps_offset"])
    listed.set_timesteps(row["steps"])
    steps = sorted({call[2] for call in listed._plan}, reverse=True)
    uniform = all(a - b == stride for a, b in zip(steps, steps[1:])) and steps[-1] - stride < 0
    return uniform and (row["skip_prk_steps"] or stride % 2 == 0)


PNDM_GRID = [row for row in _pndm_grid() if _pndm_reference_agrees(row)]


@pytest.mark.parametrize("row", PNDM_GRID, ids=_row_id)
def test_pndm_parity(row):
    ours, ref = _make_pair(PNDMScheduler, diffusers.PNDMScheduler,
                           {**_schedule_kwargs(row), "skip_prk_steps": row["skip_prk_steps"],
                            "set_alpha_to_one": row["set_alpha_to_one"]})
    _run_pair(ours, ref, row["steps"])


def test_pndm_grid_covers_every_factor():
    factors = dict(schedule=SCHEDULES, prediction=["epsilon", "v_prediction"], steps_offset=[0, 1],
                   skip_prk_steps=[True, False], set_alpha_to_one=[True, False])
    for key, values in factors.items():
        assert {str(r[key]) for r in PNDM_GRID} == {str(v) for v in values}, key
    assert {r["spacing"] for r in PNDM_GRID} == {"leading", "trailing"}  # linspace: never uniform (closed form)
    assert {r["steps"] for r in PNDM_GRID} == set(STEP_COUNTS)
    assert any(r["steps"] == 7 and not r["skip_prk_steps"] for r in PNDM_GRID)  # Runge-Kutta, half stride 71


@pytest.mark.parametrize("spacing,steps,skip_prk_steps", [("linspace", 7, True), ("trailing", 7, False),
                                                          ("leading", 333, False)])
def test_pndm_reference_strides_off_the_list(spacing, steps, skip_prk_steps):
    """Where the grid leaves diffusers out, its trajectory differs from ours by more than the parity bar."""
    ours, ref = PNDMScheduler(timestep_spacing=spacing, skip_prk_steps=skip_prk_steps), diffusers.PNDMScheduler(
        timestep_spacing=spacing, skip_prk_steps=skip_prk_steps)
    assert not _pndm_reference_agrees(dict(spacing=spacing, steps=steps, steps_offset=0,
                                           skip_prk_steps=skip_prk_steps))
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    for t in ref.timesteps:
        x = ours.step(fake_model(x, t), t, x).prev_sample
        y = ref.step(fake_model(y, t), t, y).prev_sample
    assert (x - y).abs().max().item() > TOL * max(y.abs().max().item(), 1.0)


# ---- DDIM inversion ------------------------------------------------------------------------------------------
def _inverse_grid():
    rows = []
    for i, (schedule, prediction, spacing) in enumerate(itertools.product(
            SCHEDULES, ["epsilon", "v_prediction", "sample"], ["leading", "trailing"])):
        set_alpha_to_one = prediction != "sample" and (i // 2) % 2 == 0
        rows.append(dict(schedule=schedule, prediction=prediction, spacing=spacing,
                         steps_offset=int(spacing == "leading" and (i // 3) % 2 == 1),
                         steps=STEP_COUNTS[(i // 2) % 4] if spacing == "leading" else (10, 50)[(i // 2) % 2],
                         set_alpha_to_one=set_alpha_to_one, clip_sample=i % 3 == 0,
                         rescale_betas_zero_snr=i % 4 == 1 and prediction != "epsilon"))
    return rows


INVERSE_GRID = _inverse_grid()


@pytest.mark.parametrize("row", INVERSE_GRID, ids=_row_id)
def test_ddim_inverse_parity(row):
    kwargs = {**_schedule_kwargs(row), "set_alpha_to_one": row["set_alpha_to_one"],
              "clip_sample": row["clip_sample"], "clip_sample_range": 1.5,
              "rescale_betas_zero_snr": row["rescale_betas_zero_snr"]}
    _run_pair(*_make_pair(DDIMInverseScheduler, diffusers.DDIMInverseScheduler, kwargs), row["steps"])


def test_ddim_inverse_grid_covers_every_factor():
    factors = dict(schedule=SCHEDULES, prediction=["epsilon", "v_prediction", "sample"],
                   spacing=["leading", "trailing"], steps_offset=[0, 1], set_alpha_to_one=[True, False],
                   clip_sample=[True, False], rescale_betas_zero_snr=[True, False], steps=STEP_COUNTS)
    for key, values in factors.items():
        assert {str(r[key]) for r in INVERSE_GRID} == {str(v) for v in values}, key
    assert {r["prediction"] for r in INVERSE_GRID if r["rescale_betas_zero_snr"]} == {"v_prediction", "sample"}


def test_ddim_inverse_reference_strides_off_the_list():
    """Trailing spacing with T / N not an integer: diffusers starts each step at t - T // N, not the previous
    listed timestep (its first step from alpha_bar[0] instead of x0); ours differs there on purpose."""
    ours, ref = DDIMInverseScheduler(timestep_spacing="trailing", clip_sample=False), \
        diffusers.DDIMInverseScheduler(timestep_spacing="trailing", clip_sample=False)
    ours.set_timesteps(7)
    ref.set_timesteps(7)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = ref.timesteps[0]
    a, b = ours.step(fake_model(x, t), t, x).prev_sample, ref.step(fake_model(x, t), t, x).prev_sample
    assert (a - b).abs().max().item() > 1e-4
    assert not hasattr(ours, "add_noise") and not hasattr(ref, "add_noise")


# ---- configuration interop -----------------------------------------------------------------------------------
CONFIG_CASES = [
    (UniPCMultistepScheduler, "UniPCMultistepScheduler",
     dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, solver_order=3, solver_type="bh1",
          prediction_type="v_prediction", timestep_spacing="trailing", use_karras_sigmas=True,
          final_sigmas_type="sigma_min", disable_corrector=[1])),
    (PNDMScheduler, "PNDMScheduler",
     dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True, steps_offset=1,
          set_alpha_to_one=False)),
    (DDIMInverseScheduler, "DDIMInverseScheduler",
     dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False,
          prediction_type="v_prediction", timestep_spacing="leading")),
]


@pytest.mark.parametrize("cls,ref_name,kwargs", CONFIG_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_from_config_reads_diffusers_json_and_back(tmp_path, cls, ref_name, kwargs):
    ref = getattr(diffusers, ref_name)(**kwargs)
    ref.save_config(tmp_path / "theirs")
    written = json.loads((tmp_path / "theirs" / "scheduler_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key diffusers writes is one ours takes
        ours = cls.from_config(written)
    # PNDM's zero-SNR rescale is ours only (diffusers' PNDM lacks it); off, so the schedules still agree
    ours_only = set(ours.config) - set(written)
    assert set(ours.config) - ours_only == {k for k in written if not k.startswith("_")}
    assert all(ours.config[key] is False for key in ours_only) and ours_only <= {"rescale_betas_zero_snr"}
    for key, value in kwargs.items():
        assert ours.config[key] == value, key
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    _run_pair(ours, ref, 12)
    ours.save_config(tmp_path / "ours")  # ... and diffusers reads ours back to the same config
    back = getattr(diffusers, ref_name).from_config(getattr(diffusers, ref_name).load_config(tmp_path / "ours"))
    assert {k: back.config[k] for k in ours.config if k not in ours_only} == {k: written[k] for k in ours.config
                                                                               if k not in ours_only}


def test_unipc_from_a_dpm_solver_config():
    """The common swap UniPC.from_config(pipe.scheduler.config): DPM-Solver's solver_type 'midpoint' becomes bh2."""
    written = dict(diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                         beta_end=0.012).config)
    with pytest.warns(UserWarning, match="algorithm_type"):
        ours = UniPCMultistepScheduler.from_config(written)
    ref = diffusers.UniPCMultistepScheduler.from_config(written)
    assert ours.config["solver_type"] == ref.config.solver_type == "bh2"
    _run_pair(ours, ref, 9)


def test_unsupported_options_raise():
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        UniPCMultistepScheduler(use_flow_sigmas=True)
    with pytest.raises(ValueError, match="solver_type"):
        UniPCMultistepScheduler(solver_type="bh3")
    with pytest.raises(ValueError, match="N \\+ 1"):
        UniPCMultistepScheduler().set_timesteps(1000)
    with pytest.raises(ValueError, match="prediction_type"):
        PNDMScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="num_inference_steps >= 4"):
        PNDMScheduler().set_timesteps(3)
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMInverseScheduler(timestep_spacing="linspace")
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        DDIMInverseScheduler(prediction_type="sample")
