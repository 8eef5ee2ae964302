"""Training config: TOML files, `--section.key=value` overrides with type checks, clear errors."""
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_lite.config import NOISE_DEFAULTS, Config
from ldm_lite.config_io import config_from_dict, config_to_dict, load_config, parse_overrides, to_toml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "train" / "configs"


@pytest.mark.parametrize("name, data, preset, schedule, steps", [
    ("cifar10_ddpm.toml", "cifar10:", "ddpm_cifar10", "linear", 800_000),
    ("cifar10_small.toml", "cifar10:", "small", "linear", None),
    ("synthetic_tiny.toml", "synthetic", "tiny", "scaled_linear", 1500)])
def test_shipped_configs_load_with_their_settings(name, data, preset, schedule, steps):
    config = load_config(CONFIGS / name)
    assert config.data.source.startswith(data) and config.model.preset == preset
    assert config.diffusion.beta_schedule == schedule and not config.noise.offset_noise
    assert steps is None or config.train.steps == steps
    assert config.noise.strength("offset_noise_strength") == 0.0  # the switch is off


def test_cifar10_ddpm_matches_ho_et_al():
    config = load_config(CONFIGS / "cifar10_ddpm.toml")
    d, t = config.diffusion, config.train
    assert (d.beta_schedule, d.beta_start, d.beta_end, d.num_train_timesteps) == ("linear", 1e-4, 0.02, 1000)
    assert d.prediction_type == "epsilon" and not config.model.class_conditional
    assert (t.lr, t.batch_size, t.steps, t.warmup_steps, t.ema_decay, t.grad_clip) == (2e-4, 128, 800_000, 5000,
                                                                                         0.9999, 1.0)
    assert config.model.preset == "ddpm_cifar10" and config.model.dropout == 0.1 and config.data.random_flip


def test_overrides_are_typed_and_aliases_work():
    path, overrides = parse_overrides(["--config", "x.toml", "--steps", "7", "--data=synthetic", "--out", "/tmp/r",
                                       "--noise.offset_noise", "--train.lr=1e-3", "--model.dropout=none"])
    assert path == "x.toml"
    config = load_config(CONFIGS / "synthetic_tiny.toml", overrides)
    assert config.train.steps == 7 and config.run.out == "/tmp/r" and config.noise.offset_noise is True
    assert config.train.lr == 1e-3 and config.model.dropout is None
    assert load_config(None, {"train.lr": 1}).train.lr == 1.0  # an int is fine for a float key


@pytest.mark.parametrize("overrides, message", [
    ({"train.steps": "abc"}, "train.steps must be int, got 'abc'"),
    ({"train.steps": "1.5"}, "train.steps must be int"),
    ({"train.steps": 2.0}, "train.steps must be int, got 2.0"),
    ({"noise.offset_noise": "maybe"}, "noise.offset_noise must be true or false"),
    ({"train.nope": 1}, "unknown config key 'train.nope'"),
    ({"trian.steps": 1}, "unknown config section 'trian'"),
    ({"diffusion.prediction_type": "v"}, "diffusion.prediction_type must be one of"),
    ({"diffusion.beta_schedule": "cosine"}, "diffusion.beta_schedule must be one of"),
    ({"train.lr": "-1"}, "train.lr must be a positive number"),
    ({"train.precision": "fp8"}, "train.precision must be one of ('fp32', 'bf16', 'fp16', 'auto')"),
    ({"train.compile": "maybe"}, "train.compile must be one of ('off', 'on', 'auto')"),
    ({"model.null_label_prob": "1.5"}, "model.null_label_prob must be in"),
    ({"model.preset": "huge"}, "model.preset must be one of"),
    ({"train.ema_decay": "1"}, "train.ema_decay must be in"),
    ({"run.log_every": "0"}, "run.log_every must be >= 1"),
    ({"data.labels": "colour"}, "data.labels must be one of ('dataset', 'brightness')"),
])
def test_bad_values_are_rejected_with_clear_messages(overrides, message):
    with pytest.raises(ValueError) as error:
        load_config(CONFIGS / "synthetic_tiny.toml", overrides)
    assert message in str(error.value)


def test_bad_toml_files_are_rejected(tmp_path):
    (tmp_path / "bad.toml").write_text("[train]\nsteps = 'ten'\n")
    with pytest.raises(ValueError, match="train.steps must be int"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "broken.toml").write_text("[train\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml")
    (tmp_path / "top.toml").write_text("steps = 3\n")
    with pytest.raises(ValueError, match="section.key"):
        load_config(tmp_path / "top.toml")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")


def test_bad_command_lines_are_rejected():
    with pytest.raises(ValueError, match="unknown option --stpes"):
        parse_overrides(["--stpes", "3"])
    with pytest.raises(ValueError, match="unexpected argument"):
        parse_overrides(["steps=3"])


def test_toml_round_trip(tmp_path):
    config = load_config(CONFIGS / "cifar10_small.toml", {"noise.pyramid_noise": True, "run.out": 'a "b"\\c'})
    (tmp_path / "c.toml").write_text(to_toml(config))
    assert load_config(tmp_path / "c.toml") == config
    assert config_from_dict(config_to_dict(config)) == config


def test_configs_are_frozen():
    config = Config()
    with pytest.raises(AttributeError):
        config.train.steps = 3


def test_cli_reports_bad_values_in_one_line():
    result = subprocess.run([sys.executable, "-m", "train", "--config", str(CONFIGS / "synthetic_tiny.toml"),
                             "--train.lr=-1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: train.lr must be a positive number, got -1.0"]


# ----------------------------------------------------------------------------- switches and their strengths


@pytest.mark.parametrize("switch, key, value", [
    ("noise.offset_noise", "noise.offset_noise_strength", "0.2"),
    ("noise.pyramid_noise", "noise.pyramid_discount", "0.9"),
    ("noise.input_perturbation", "noise.input_perturbation_gamma", "0.15"),
    ("diffusion.min_snr", "diffusion.min_snr_gamma", "4")])
def test_a_strength_without_its_switch_is_an_error_and_none_means_the_papers_value(switch, key, value):
    with pytest.raises(ValueError, match=rf"{key} = .* is set but {switch} is off; switch it on"):
        load_config(None, {key: value})
    on = load_config(None, {switch: "true"})
    section, name = key.split(".")
    assert getattr(getattr(on, section), name) is None  # not set: nothing pretends a value was chosen
    set_value = load_config(None, {switch: "true", key: value})
    if section == "noise":
        assert on.noise.strength(name) == NOISE_DEFAULTS[name]  # offset 0.1, pyramid 0.8, input perturbation 0.1
        assert set_value.noise.strength(name) == float(value)
    else:
        assert (on.diffusion.snr_gamma, set_value.diffusion.snr_gamma) == (5.0, 4.0)
        assert load_config(None, {}).diffusion.snr_gamma is None


def test_papers_values_are_the_documented_ones():
    assert NOISE_DEFAULTS == {"offset_noise_strength": 0.1, "pyramid_discount": 0.8, "input_perturbation_gamma": 0.1}


@pytest.mark.parametrize("overrides, spacing, offset, t0", [
    ({}, "leading", 1, 981),
    ({"diffusion.rescale_betas_zero_snr": "true", "diffusion.prediction_type": "v_prediction"}, "trailing", 0, 999)])
def test_every_command_samples_a_run_from_the_same_first_timestep(tmp_path, overrides, spacing, offset, t0):
    """One rule derives the sampling schedule of a run (Config.scheduler_config); the sample command, the
    training grids and the bias study all build their scheduler from it, so t0 agrees at 50 steps."""
    from ldm_lite.generate import SampleSettings, build_scheduler
    from ldm_lite.schedulers import from_config
    from ldm_lite.study import study_scheduler
    config = load_config(CONFIGS / "synthetic_tiny.toml", overrides)
    schedule = config.scheduler_config()
    assert (schedule["timestep_spacing"], schedule["steps_offset"], schedule["clip_sample"]) == (spacing, offset, True)
    grids = from_config(config)  # what training's sample grids use
    study = study_scheduler({"config": config})
    command = build_scheduler(SampleSettings(checkpoint="run", out=str(tmp_path), steps=50), schedule)
    for scheduler in (grids, study):
        scheduler.set_timesteps(50)
    assert int(grids.timesteps[0]) == int(study.timesteps[0]) == int(command.timesteps[0]) == t0
    latent = load_config(CONFIGS / "synthetic_tiny.toml", {"latent.vae": "test"})
    assert latent.scheduler_config()["clip_sample"] is False  # latents are not bounded
