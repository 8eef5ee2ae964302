"""Training config: TOML files, `--section.key=value` overrides with type checks, clear errors."""
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_lite.config import Config, config_from_dict, config_to_dict, load_config, parse_overrides, to_toml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "train" / "configs"


@pytest.mark.parametrize("name", ["cifar10_ddpm.toml", "cifar10_small.toml", "synthetic_tiny.toml"])
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / name)
    assert isinstance(config, Config)


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
    ({"train.precision": "fp16"}, "train.precision must be one of"),
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
