"""Training loop: objectives, exact resume, kill during save, NaN stop, bad checkpoints, 2-process DDP, latents.

All runs use the tiny UNet on 8x8 synthetic images with batch 8 and a handful of steps.
"""
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm_lite import training
from ldm_lite.config_io import load_config
from ldm_lite.models import load_unet
from ldm_lite.schedules import alphas_cumprod_from_betas, make_betas, rescale_zero_terminal_snr
from ldm_lite.objective import Batch, batch_indices, diffusion_loss, draw_batch
from ldm_lite.training import TrainingDiverged, make_scheduler, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "synthetic_tiny.toml"
CIFAR_JPEG = ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "train"  # beside the repository
BASE = {"data.resolution": "8", "data.synthetic_size": "64", "train.batch_size": "8", "train.steps": "6",
        "train.warmup_steps": "2", "run.log_every": "1", "run.checkpoint_every": "3", "run.sample_every": "0",
        "run.progress": "false", "train.num_threads": "1"}  # 1 thread: far faster than 2 on a shared machine


def tiny_overrides(out: Path, **extra) -> dict:
    return {**BASE, "run.out": str(out), **{k.replace("__", "."): str(v) for k, v in extra.items()}}


def tiny_config(out: Path, **extra):
    return load_config(TINY, tiny_overrides(out, **extra))


def cli_args(out: Path, **extra) -> list[str]:
    return ["--config", str(TINY)] + [f"--{k}={v}" for k, v in tiny_overrides(out, **extra).items()]


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


def checkpoint_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """6 uninterrupted steps, with dropout (reseeded per step) and offset noise on."""
    run_dir = train(tiny_config(tmp_path_factory.mktemp("ref") / "run", model__dropout=0.1,
                                noise__offset_noise="true"))
    return run_dir, losses(run_dir)


# ----------------------------------------------------------------------------- objectives

def _oracle_batch(prediction_type: str, zero_snr: bool = False):
    config = load_config(TINY, {**BASE, "diffusion.prediction_type": prediction_type,
                                "diffusion.rescale_betas_zero_snr": str(zero_snr).lower()})
    scheduler = make_scheduler(config)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand((6, 3, 8, 8), generator=g) * 2 - 1, torch.randn((6, 3, 8, 8), generator=g)
    timesteps = torch.tensor([0, 10, 400, 800, 998, 999])
    return config, scheduler, Batch(x0, None, timesteps, noise, noise + 0.1 * torch.randn_like(noise))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_is_zero_for_a_model_predicting_the_reference_target(prediction_type):
    config, scheduler, batch = _oracle_batch(prediction_type)
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    ab = alphas_cumprod_from_betas(betas)[batch.timesteps].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * batch.x0 + (1 - ab).sqrt() * batch.input_noise  # Ho et al. eq. 4
    target = {"epsilon": batch.noise, "sample": batch.x0,
              "v_prediction": ab.sqrt() * batch.noise - (1 - ab).sqrt() * batch.x0}[prediction_type]

    def oracle(x, t, labels):
        assert torch.allclose(x, x_t, atol=1e-6)  # x_t is built from the perturbed noise
        return target

    assert diffusion_loss(oracle, scheduler, batch, None).item() < 1e-12
    # input perturbation: the target is the clean noise, so predicting the perturbed noise costs ~gamma^2
    if prediction_type == "epsilon":
        def perturbed(x, t, labels):
            return batch.input_noise
        assert diffusion_loss(perturbed, scheduler, batch, None).item() == pytest.approx(0.01, rel=0.2)


def test_min_snr_weights_enter_the_loss_per_sample():
    config, scheduler, batch = _oracle_batch("epsilon")
    weights = torch.linspace(0, 2, 1000)
    model = lambda x, t, labels: torch.zeros_like(x)  # noqa: E731
    per_sample = batch.noise.pow(2).mean(dim=(1, 2, 3))
    expected = (per_sample * weights[batch.timesteps]).mean()
    assert diffusion_loss(model, scheduler, batch, weights).item() == pytest.approx(expected.item(), rel=1e-6)
    with_snr = load_config(TINY, {**BASE, "diffusion.min_snr": "true", "diffusion.rescale_betas_zero_snr": "true",
                                  "diffusion.prediction_type": "v_prediction"})
    w = training.loss_weights(with_snr, make_scheduler(with_snr).alphas_cumprod)
    betas = rescale_zero_terminal_snr(make_betas("scaled_linear", 1000, 0.00085, 0.012))
    ab0 = alphas_cumprod_from_betas(betas.double())[0].item()
    snr0 = ab0 / (1 - ab0)
    assert w.shape == (1000,) and torch.isfinite(w).all() and w[-1] == 0  # SNR 0 at the last step
    assert w[0].item() == pytest.approx(min(snr0, 5.0) / (snr0 + 1), rel=1e-5)


def test_batches_cover_each_epoch_once_and_split_across_processes():
    indices = torch.cat([batch_indices(step, 8, 20, seed=0) for step in range(5)])  # 40 draws = 2 epochs
    assert sorted(indices[:20].tolist()) == list(range(20)) and sorted(indices[20:].tolist()) == list(range(20))
    config = tiny_config(Path("/tmp/unused"), noise__pyramid_noise="true", noise__input_perturbation="true")
    data = training.load_dataset("synthetic", 8, synthetic_size=64)
    whole = draw_batch(data, config, 5, training.World(0, 1), null_label=3)
    halves = [draw_batch(data, config, 5, training.World(rank, 2), null_label=3) for rank in (0, 1)]
    for name in ("x0", "labels", "timesteps", "noise", "input_noise"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(h, name) for h in halves])), name


# ----------------------------------------------------------------------------- runs

def test_run_writes_config_metrics_checkpoint_and_grids(reference, tmp_path):
    run_dir, reference_losses = reference
    assert len(reference_losses) == 6 and all(math.isfinite(v) for v in reference_losses)
    saved = load_config(run_dir / "config.toml")
    assert saved.model.dropout == 0.1 and saved.noise.offset_noise and saved.run.out == str(run_dir)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["format"] == "ldm_lite.train.v1" and checkpoint["step"] == 6
    assert set(checkpoint) >= {"unet_config", "model", "ema", "optimizer", "rng", "config"}
    ema = load_unet(run_dir)  # the EMA weights by default
    assert torch.equal(ema.state_dict()["conv_out.weight"], checkpoint["ema"]["conv_out.weight"])
    assert ema.config.num_classes == 3 and ema.config.sample_size == 8
    # sample grids through the lead's sampler: 3 class rows + 1 unconditional row of 8
    grid_run = train(tiny_config(tmp_path / "grid", train__steps=2, run__sample_every=2, run__sample_steps=2))
    from PIL import Image
    assert Image.open(grid_run / "samples" / "step_0000002.png").size == (8 * 10 + 2, 4 * 10 + 2)


def test_resume_is_exact(reference, tmp_path):
    _, reference_losses = reference
    overrides = dict(model__dropout=0.1, noise__offset_noise="true")
    run_dir = train(tiny_config(tmp_path / "run", train__steps=3, **overrides))
    assert checkpoint_step(run_dir) == 3
    train(tiny_config(tmp_path / "run", **overrides))  # same command, more steps: resumes at 3
    assert losses(run_dir) == pytest.approx(reference_losses, abs=1e-6)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(tiny_config(tmp_path / "run", run__resume="false", **overrides))
    with pytest.raises(ValueError, match=r"other settings \(noise.offset_noise\).*--fresh"):
        train(tiny_config(tmp_path / "run", train__steps=8, model__dropout=0.1))


def test_kill_during_save_resumes_from_last_good_checkpoint(reference, tmp_path):
    _, reference_losses = reference
    run_dir = tmp_path / "run"
    args = cli_args(run_dir, model__dropout=0.1, noise__offset_noise="true")
    launcher = ROOT / "tests" / "save_blocking_launcher.py"  # blocks the save of step 6 half-way
    process = subprocess.Popen([sys.executable, str(launcher), "6", *args], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run_dir / "save_blocked").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the save hook never blocked"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert (run_dir / "checkpoint.pt.tmp").stat().st_size >= 4096  # a half-written save
    assert checkpoint_step(run_dir) == 3  # the last good checkpoint is intact
    train(tiny_config(run_dir, model__dropout=0.1, noise__offset_noise="true"))
    assert not (run_dir / "checkpoint.pt.tmp").exists()
    assert checkpoint_step(run_dir) == 6
    assert losses(run_dir) == pytest.approx(reference_losses, abs=1e-6)


def test_nan_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    real_loss, calls = training.diffusion_loss, []

    def loss_with_nan_at_step_5(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(training, "diffusion_loss", loss_with_nan_at_step_5)
    config = tiny_config(tmp_path / "run", run__log_every=4, train__steps=8)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 5"):
        train(config)
    assert checkpoint_step(tmp_path / "run") == 3  # the step-6 checkpoint was not written
    assert len(calls) == 6  # stopped at the first check after the NaN


def test_corrupt_and_foreign_checkpoints_get_clear_errors(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="not a readable PyTorch weight file"):
        train(tiny_config(run_dir))
    torch.save({"state_dict": {}}, run_dir / "checkpoint.pt")
    with pytest.raises(ValueError, match="not an ldm_lite training checkpoint"):
        train(tiny_config(run_dir))
    torch.save({"format": "ldm_lite.train.v1", "model": {}}, run_dir / "checkpoint.pt")
    with pytest.raises(ValueError, match="lacks"):
        train(tiny_config(run_dir))
    # the right format tag but no weights: one line for sampling too, not a bare KeyError
    torch.save({"format": "ldm_lite.train.v1", "unet_config": {}, "config": {}}, run_dir / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"lacks \['model'\]"):
        load_unet(run_dir / "checkpoint.pt")


def test_time_budget_stops_with_a_checkpoint(tmp_path):
    run_dir = train(tiny_config(tmp_path / "run", train__steps=1000, train__max_minutes=1e-6, run__log_every=5))
    assert checkpoint_step(run_dir) == 1  # a single process checks the clock after every step
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.parametrize("keep", [True, False])
def test_train_command_keeps_freed_memory_as_configured(tmp_path, monkeypatch, keep):
    command = importlib.import_module("ldm_lite.cli.train")  # `train` here is ldm_lite.training.train
    calls = []
    monkeypatch.setattr(command, "keep_freed_memory", lambda: calls.append(1) or True)
    assert command.main(cli_args(tmp_path / "run", train__steps=1, train__keep_freed_memory=str(keep).lower())) == 0
    assert calls == ([1] if keep else [])


def test_loss_decreases_on_synthetic_data(tmp_path):
    run_dir = train(tiny_config(tmp_path / "run", train__steps=40, train__batch_size=16, train__warmup_steps=5,
                                run__checkpoint_every=0))
    values = losses(run_dir)
    first, last = sum(values[:5]) / 5, sum(values[-10:]) / 10
    assert last < 0.6 * first, (first, last)


@pytest.mark.skipif(not CIFAR_JPEG.is_dir(), reason=f"CIFAR-10 JPEG folder {CIFAR_JPEG} not present")
def test_trains_on_an_image_folder(tmp_path):
    run_dir = train(tiny_config(tmp_path / "run", data__source=CIFAR_JPEG, data__max_images=40, train__steps=2))
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["unet_config"]["num_classes"] == 10 and len(losses(run_dir)) == 2


@pytest.mark.parametrize("labels, expected", [("dataset", ("cats", "dogs")), ("brightness", ("dark", "mid", "bright"))])
def test_run_records_its_class_names_for_sampling(tmp_path, labels, expected):
    from PIL import Image
    from ldm_lite.runs import load_model
    for i, name in enumerate(("cats", "dogs", "cats", "dogs", "cats", "dogs")):
        (tmp_path / "images" / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * i, 30 * i, 20 * i)).save(tmp_path / "images" / name / f"{i}.png")
    run_dir = train(tiny_config(tmp_path / "run", data__source=tmp_path / "images", data__labels=labels,
                                train__steps=1, train__batch_size=2))
    assert json.loads((run_dir / "classes.json").read_text()) == list(expected)
    assert load_model(run_dir).class_names == expected  # so `python -m sample --class dogs` resolves
    assert load_model(run_dir / "checkpoint.pt").class_names == expected


def test_two_process_gloo_run_matches_one_process(tmp_path):
    extra = dict(train__steps=4, noise__offset_noise="true", run__checkpoint_every=0)
    single = train(tiny_config(tmp_path / "one", **extra))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
               *cli_args(tmp_path / "two", **extra)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(single), abs=1e-5)
    one = torch.load(single / "checkpoint.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["model"]
    # Adam divides by sqrt(v): where a gradient is ~0, float noise in it can move a weight by up to lr per
    # step, so weights get a looser bound than the losses.
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4


def test_latent_training_caches_latents_and_decodes_grids(tmp_path):
    extra = dict(latent__vae="test", train__steps=2, run__sample_every=2, run__sample_steps=2)
    run_dir = train(tiny_config(tmp_path / "run", **extra))
    cache = run_dir / "latents.safetensors"
    from safetensors import safe_open
    with safe_open(str(cache), framework="pt") as file:
        metadata, latents = file.metadata(), file.get_tensor("latents")
    assert latents.shape == (64, 4, 4, 4)  # the test VAE halves 8x8 images into 4 channels
    assert metadata["vae"].startswith("test-") and metadata["scaling_factor"] == "1.0"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["unet_config"]["in_channels"] == 4
    from PIL import Image
    assert Image.open(run_dir / "samples" / "step_0000002.png").size == (8 * 10 + 2, 4 * 10 + 2)  # decoded 8x8
    mtime = cache.stat().st_mtime_ns
    train(tiny_config(tmp_path / "run", **{**extra, "train__steps": 3}))
    assert cache.stat().st_mtime_ns == mtime  # reused, not rebuilt
    from safetensors.torch import save_file
    save_file({"latents": latents}, str(cache), metadata={**metadata, "vae": "other-vae"})
    train(tiny_config(tmp_path / "run", **{**extra, "train__steps": 4}))
    with safe_open(str(cache), framework="pt") as file:
        assert file.metadata()["vae"] == metadata["vae"]  # rebuilt for the VAE actually used


def test_bf16_autocast_matches_float32_closely(reference, tmp_path):
    _, reference_losses = reference
    run_dir = train(tiny_config(tmp_path / "bf16", train__precision="bf16", train__steps=2, model__dropout=0.1,
                                noise__offset_noise="true"))
    # same batches and initial weights; bf16 matmuls carry ~3 significant digits
    assert losses(run_dir) == pytest.approx(reference_losses[:2], rel=0.02)


# ----------------------------------------------------------------------------- resume rules


def test_resume_refuses_changed_training_settings_and_names_them(tmp_path):
    run_dir = train(tiny_config(tmp_path / "run", train__steps=2))
    changed = {"data__synthetic_size": 32, "train__lr": 5e-4, "train__batch_size": 4, "train__ema_decay": 0.99,
               "train__precision": "bf16", "model__preset": "small", "latent__vae": "test",
               "diffusion__beta_schedule": "linear"}
    for key, value in changed.items():
        name = key.replace("__", ".")
        with pytest.raises(ValueError, match=rf"other settings \({name}\); to start fresh, choose another --out or "
                                             r"pass --fresh"):
            train(tiny_config(run_dir, train__steps=3, **{key: value}))
    assert checkpoint_step(run_dir) == 2 and not (run_dir / "latents.safetensors").exists()  # refused before data
    # when to stop, how often to log and how fast to run may change
    train(tiny_config(run_dir, train__steps=3, train__max_minutes=5, run__log_every=2, train__channels_last="false"))
    assert checkpoint_step(run_dir) == 3


def test_fresh_starts_over_and_a_finished_run_says_so(tmp_path, capsys):
    run_dir = train(tiny_config(tmp_path / "run", train__steps=2))
    capsys.readouterr()
    train(tiny_config(run_dir, train__steps=2))
    assert "the run is finished (step 2 of train.steps = 2)" in capsys.readouterr().out
    train(tiny_config(run_dir, train__steps=1, train__lr=5e-4, run__fresh="true"))
    assert checkpoint_step(run_dir) == 1 and len(losses(run_dir)) == 1
    assert "fresh = false" in (run_dir / "config.toml").read_text()  # a reused config.toml does not delete again


def test_checkpoints_of_the_earlier_config_format_keep_loading(tmp_path):
    """Earlier versions stored the noise strengths (and min_snr_gamma) at the papers' values with their switches
    off; such runs still resume and sample."""
    from ldm_lite.runs import load_model
    run_dir = train(tiny_config(tmp_path / "run", train__steps=2))
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    checkpoint["config"]["noise"].update(offset_noise_strength=0.1, pyramid_discount=0.8, input_perturbation_gamma=0.1)
    checkpoint["config"]["diffusion"]["min_snr_gamma"] = 5.0
    torch.save(checkpoint, run_dir / "checkpoint.pt")
    toml = (run_dir / "config.toml").read_text().replace("[noise]\n", "[noise]\noffset_noise_strength = 0.1\n")
    (run_dir / "config.toml").write_text(toml)
    assert load_model(run_dir).unet.config.num_classes == 3
    (run_dir / "config.toml").unlink()
    assert load_model(run_dir / "checkpoint.pt").scheduler_config["beta_schedule"] == "scaled_linear"
    train(tiny_config(run_dir, train__steps=3))
    assert checkpoint_step(run_dir) == 3


def test_latent_cache_never_replaces_a_foreign_file(tmp_path):
    precious = tmp_path / "notes.safetensors"
    precious.write_bytes(b"someone's file")
    with pytest.raises(ValueError, match="is not an ldm_lite latent cache; refusing to overwrite it"):
        train(tiny_config(tmp_path / "run", latent__vae="test", latent__cache=precious, train__steps=1))
    assert precious.read_bytes() == b"someone's file"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(precious), metadata={"vae": "other"})  # a safetensors file, not a cache
    with pytest.raises(ValueError, match="not an ldm_lite latent cache"):
        train(tiny_config(tmp_path / "run2", latent__vae="test", latent__cache=precious, train__steps=1))


def test_offset_noise_reaches_both_x_t_and_the_target():
    """draw_batch with offset noise: the noise that builds x_t and the target both carry the per-channel
    constant s * randn(B, C, 1, 1), drawn from the step's generator after the flips and timesteps."""
    config = load_config(TINY, {**BASE, "noise.offset_noise": "true", "noise.offset_noise_strength": "0.5",
                                "data.random_flip": "false", "model.null_label_prob": "0"})
    data = training.load_dataset("synthetic", 8, synthetic_size=64)
    batch = draw_batch(data, config, 7, training.World(0, 1), null_label=None)
    g = torch.Generator().manual_seed(training.step_seed(config.train.seed, 7))
    torch.randint(1000, (8,), generator=g)  # the timesteps
    white = torch.randn(8, 3, 8, 8, generator=g)
    offset = 0.5 * torch.randn(8, 3, 1, 1, generator=g)
    torch.testing.assert_close(batch.noise, white + offset, rtol=0, atol=0)
    assert torch.equal(batch.input_noise, batch.noise)  # no input perturbation: x_t is built from the same noise
    scheduler = make_scheduler(config)
    seen = {}

    def model(x, t, labels):
        seen["x_t"] = x
        return torch.zeros_like(x)

    loss = diffusion_loss(model, scheduler, batch, None)
    ab = scheduler.alphas_cumprod[batch.timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_t"], ab.sqrt() * batch.x0 + (1 - ab).sqrt() * (white + offset))
    assert loss.item() == pytest.approx(float((white + offset).pow(2).mean()), rel=1e-6)  # target = offset noise


def test_fp16_autocast_with_a_gradient_scaler_matches_float32_closely(reference, tmp_path):
    _, reference_losses = reference
    run_dir = train(tiny_config(tmp_path / "fp16", train__precision="fp16", train__steps=2, model__dropout=0.1,
                                noise__offset_noise="true"))
    assert losses(run_dir) == pytest.approx(reference_losses[:2], rel=0.01)


def test_sigint_between_checkpoints_saves_and_the_resume_equals_an_uninterrupted_run(reference, tmp_path,
                                                                                    monkeypatch):
    reference_dir, reference_losses = reference
    run_dir, real_step = tmp_path / "run", training.train_step
    options = dict(model__dropout=0.1, noise__offset_noise="true", run__checkpoint_every=50)

    def step_then_ctrl_c(run, state, weights):
        result = real_step(run, state, weights)
        if state.step == 4:  # after step 4 of 6; the checkpoints are due at steps 50 and 6
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(training, "train_step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt, match=f"SIGINT at step 4: checkpoint saved in {run_dir}"):
        train(tiny_config(run_dir, **options))
    assert checkpoint_step(run_dir) == 4
    monkeypatch.setattr(training, "train_step", real_step)
    train(tiny_config(run_dir, **options))
    assert losses(run_dir) == reference_losses  # each step logged once (checked by `losses`), the same values
    resumed, uninterrupted = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (run_dir, reference_dir))
    for entry in ("model", "ema"):
        assert all(torch.equal(resumed[entry][k], uninterrupted[entry][k]) for k in uninterrupted[entry])
