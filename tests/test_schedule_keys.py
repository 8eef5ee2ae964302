"""Schedule keys are honoured or refused, never dropped: zero terminal SNR in Heun and PNDM (which diffusers lacks),
the strict `from_config`, and the x0 clipping a sampler drops. Independent of diffusers: the references are DDIM's
rescaled table (Lin et al. 2023, arXiv:2305.08891) and Euler on the exact mixture denoiser (`ldm_lite.oracle`)."""
from pathlib import Path

import pytest
import torch

from ldm_lite.oracle import brightness_mixture
from ldm_lite.sampling import sample
from ldm_lite.schedulers import (SCHEDULER_CLASSES, DDIMScheduler, EulerDiscreteScheduler, from_config,
                                 scheduler_class, x0_clipping, x0_clipping_dropped)
from ldm_lite.schedulers.key_table import schedule_key_table, with_table

pytestmark = pytest.mark.usefixtures("one_thread")

# a zero-terminal-SNR v-prediction run's sampling config (what `Config.scheduler_config()` writes), ending at x0
ZERO_SNR = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
            "timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": True}


@pytest.mark.parametrize("alias", ["heun", "pndm"])
def test_heun_and_pndm_rescale_to_zero_terminal_snr(alias):
    rescaled = from_config(ZERO_SNR).alphas_cumprod
    ours = from_config(ZERO_SNR, alias).alphas_cumprod
    assert rescaled[-1] == 0
    assert torch.equal(ours[:-1], rescaled[:-1])
    assert ours[-1] == 2.0 ** -24  # clamped: both divide by alpha_bar at the first step


def test_zero_snr_sampling_with_heun_and_pndm_converges_to_euler():
    """200 steps of each on the exact denoiser from the same noise. Measured max |difference| to Euler: 0.017
    (Heun) and 0.014 (PNDM), halving with the steps; on the un-rescaled schedule (the keyword dropped) 0.094."""
    oracle = brightness_mixture(from_config(ZERO_SNR).alphas_cumprod, shape=(3, 4, 4), texture_std=0.5,
                                prediction_type="v_prediction")
    results = {alias: sample(oracle, from_config(ZERO_SNR, alias), 4, num_inference_steps=200, seed=0,
                             progress=False, dtype=torch.float64) for alias in ("euler", "heun", "pndm")}
    for alias in ("heun", "pndm"):
        assert (results[alias] - results["euler"]).abs().max() < 0.035, alias


class _NoZeroSnrScheduler(DDIMScheduler):
    """A sampler without the zero-SNR keyword (as Heun and PNDM were)."""

    @classmethod
    def _config_keys(cls):
        return [key for key in super()._config_keys() if key != "rescale_betas_zero_snr"]


def test_from_config_refuses_a_schedule_key_the_class_would_drop(monkeypatch):
    monkeypatch.setitem(SCHEDULER_CLASSES, "_NoZeroSnrScheduler", _NoZeroSnrScheduler)
    takers = ", ".join(name for name in SCHEDULER_CLASSES if name != "_NoZeroSnrScheduler")
    expected = ("_NoZeroSnrScheduler does not take rescale_betas_zero_snr=True, which changes the forward process or "
                f"the model's parameterisation; schedulers that take it: {takers}")
    with pytest.raises(ValueError) as refused:
        from_config(ZERO_SNR, "_NoZeroSnrScheduler")
    assert str(refused.value) == expected
    with pytest.raises(ValueError, match="_NoZeroSnrScheduler does not take rescale_betas_zero_snr=True"):
        _NoZeroSnrScheduler.from_config(ZERO_SNR)
    # a neutral value changes nothing, so it is dropped
    plain = from_config({**ZERO_SNR, "rescale_betas_zero_snr": False}, "_NoZeroSnrScheduler")
    assert plain.alphas_cumprod[-1] > 0


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler", "euler_a", "heun", "unipc", "pndm", "DDIMInverseScheduler"])
def test_only_ddpm_and_ddim_take_quadratic_spacing(name):
    """DDIM's quadratic spacing (which diffusers lacks) is refused in one line naming the classes that take it."""
    quadratic = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "timestep_spacing": "quadratic"}
    with pytest.raises(ValueError) as refused:
        from_config(quadratic, name)
    cls = scheduler_class(name)
    assert str(refused.value) == (f"{cls.__name__} does not take timestep_spacing='quadratic'; schedulers that take "
                                  "it: DDPMScheduler, DDIMScheduler")
    with pytest.raises(ValueError, match="schedulers that take it: DDPMScheduler, DDIMScheduler"):
        cls.from_config(quadratic)
    for taker in ("ddpm", "ddim"):
        assert from_config(quadratic, taker).config["timestep_spacing"] == "quadratic"


def test_a_dropped_x0_clipping_is_reported():
    pixel_run = {**ZERO_SNR, "clip_sample": True}
    euler, ddim = from_config(pixel_run, "euler"), from_config(pixel_run)
    assert x0_clipping(euler) == "off" and x0_clipping_dropped(pixel_run, euler) == ["clip_sample"]
    assert x0_clipping(ddim) == "clip_sample" and x0_clipping_dropped(pixel_run, ddim) == []
    dpm = from_config({**pixel_run, "clip_sample": False, "thresholding": True}, "dpmpp_2m")
    assert x0_clipping(dpm) == "thresholding"
    assert x0_clipping(EulerDiscreteScheduler()) == "off"


def test_the_docs_table_of_schedule_keys_is_generated_from_the_classes():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "sampling.md").read_text()
    assert with_table(docs) == docs, "regenerate it: python -m ldm_lite.schedulers.key_table docs/sampling.md"
    rows = schedule_key_table().splitlines()
    assert rows[0] == ("| key | DDPM | DDIM | EulerDiscrete | EulerAncestralDiscrete | HeunDiscrete | DPMSolverMultistep "
                       "| UniPCMultistep | PNDM | DDIMInverse |")
    # read off the constructors: DDPM, DDIM, Heun and DDIM inversion clip x0; DDPM, DDIM, DPM-Solver, UniPC threshold
    assert "| `clip_sample` | yes | yes | - | - | yes | - | - | - | yes |" in rows
    assert "| `thresholding` | yes | yes | - | - | - | yes | yes | - | - |" in rows
    assert "| `rescale_betas_zero_snr` | yes | yes | yes | yes | yes | yes | yes | yes | yes |" in rows
