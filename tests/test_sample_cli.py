"""`python -m sample` and `python -m analysis leak-stats` end to end on a tiny model trained here, once per session,
on the embedded synthetic brightness data with Stable Diffusion's leaky scaled_linear schedule.

Determinism (in process and across processes), the manifest, one-line user errors, and the signal-leak effect:
raising the leak's channel mean raises the brightness of the samples. About 60 s on a busy 2-core CPU, most of it
the 80 training steps.
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_lite.cli import run_main
from ldm_lite.cli.analysis import main as analysis_main
from ldm_lite.cli.sample import main as sample_main
from ldm_lite.config_io import load_config
from ldm_lite.runs import run_config
from ldm_lite.data import synthetic_brightness, to_float
from ldm_lite.leak import LeakStats
from ldm_lite.models import load_unet, save_unet
from ldm_lite.schedules import alphas_cumprod_from_betas, make_betas, make_timesteps
from ldm_lite.training import train
from ldm_lite.sampling import sample_seed

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "synthetic_tiny.toml"
TRAINING = {"train.steps": "80", "train.batch_size": "16", "train.warmup_steps": "10", "train.num_threads": "1",
            "run.checkpoint_every": "0", "run.sample_every": "0", "run.log_every": "40", "run.progress": "false"}
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny class-conditional model (3 brightness classes + null label), 80 steps of batch 16 on 16x16 images.

    Enough for the leak effect: the brightness gap between leak means -0.8 and 0.8 was 0.20 after 30 steps, 0.30
    after 60 and 0.51 after 120 (standard error about 0.015).
    """
    out = tmp_path_factory.mktemp("run") / "synthetic_tiny"
    return train(load_config(TINY, {**TRAINING, "run.out": str(out)}))


@pytest.fixture(scope="module")
def data_stats(tmp_path_factory) -> Path:
    """Signal-leak statistics of the training data (dct+pixel, 3 components), as a file."""
    path = tmp_path_factory.mktemp("stats") / "synthetic.safetensors"
    LeakStats.fit(to_float(synthetic_brightness(1024, 16).images)).save(path)
    return path


def run_cli(main, argv, capsys) -> tuple[int, str, str]:
    """Run a command's main through the shared error handling, as `python -m` does; (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = run_main(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def sample_args(run_dir, out, *extra) -> list:
    return ["--ckpt", run_dir, "--out", out, "--steps", 8, "--n", 6, "--batch-size", 4, *extra]


def write_stats(path: Path, shape) -> Path:
    """Per-element statistics of random data of shape (C, H, W), written to `path`."""
    LeakStats.fit(torch.rand(8, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1, kind="pixel").save(path)
    return path


def png_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def brightness(folder: Path) -> np.ndarray:
    """Mean of each sample image (not the grid), in [-1, 1] units."""
    images = [np.asarray(Image.open(p), dtype=np.float64) for p in sorted(folder.glob("0*.png"))]
    return np.array([image.mean() / 127.5 - 1 for image in images])


# ----------------------------------------------------------------------------- determinism and manifest


def test_same_seed_same_images_in_and_across_processes(run_dir, tmp_path, capsys):
    extra = ["--leak-dc", "0=0.5", "--eps-scale", "1.01", "--eps-scale-slope", "0.001"]
    code, out, err = run_cli(sample_main, sample_args(run_dir, tmp_path / "a", *extra), capsys)
    assert code == 0, err
    assert "first timestep 876" in out  # leading spacing with steps_offset 1, the rule of every command
    assert run_cli(sample_main, sample_args(run_dir, tmp_path / "b", *extra), capsys)[0] == 0
    subprocess.run([sys.executable, "-m", "sample", *map(str, sample_args(run_dir, tmp_path / "c", *extra))],
                   cwd=ROOT, check=True, capture_output=True, env=ONE_THREAD)
    assert run_cli(sample_main, sample_args(run_dir, tmp_path / "d", *extra, "--seed", 1), capsys)[0] == 0
    first = png_bytes(tmp_path / "a")
    assert sorted(first) == [f"{i:05d}.png" for i in range(6)] + ["grid.png"]
    assert png_bytes(tmp_path / "b") == first
    assert png_bytes(tmp_path / "c") == first  # a fresh interpreter gives the same bytes
    other = png_bytes(tmp_path / "d")
    assert all(other[name] != first[name] for name in first)


def test_manifest_records_every_setting(run_dir, tmp_path, capsys):
    args = sample_args(run_dir, tmp_path, "--scheduler", "ddim", "--eta", "0.5", "--leak-dc", "1=-0.25",
                       "--eps-scale", "1.02", "--eps-scale-slope", "-0.001", "--class", "bright", "--guidance", "2",
                       "--guidance-rescale", 0.7, "--seed", 7)
    assert run_cli(sample_main, args, capsys)[0] == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    settings = manifest["settings"]
    assert (settings["scheduler"], settings["steps"], settings["eta"], settings["n"], settings["batch_size"]) == \
        ("ddim", 8, 0.5, 6, 4)
    assert manifest["seed"] == settings["seed"] == 7
    assert settings["leak_dc"] == [[1, -0.25]] and settings["guidance"] == 2.0 and settings["class_label"] == "bright"
    assert settings["guidance_rescale"] == 0.7
    assert manifest["class_label"] == 2  # "bright" is the third synthetic class
    # the schedule comes from the run's config.toml: scaled_linear, leading spacing, 1000 steps
    expected_steps = make_timesteps(8, 1000, "leading", 1).tolist()
    assert manifest["timesteps"] == expected_steps and manifest["first_timestep"] == expected_steps[0] == 876
    alphas_cumprod = alphas_cumprod_from_betas(make_betas("scaled_linear", 1000, 0.00085, 0.012).double())
    assert manifest["sqrt_alpha_bar_first_timestep"] == pytest.approx(math.sqrt(alphas_cumprod[876]), rel=1e-6)
    assert manifest["nfe"] == 8 and manifest["model_calls_per_image"] == 16  # guidance: two calls per step
    assert manifest["scheduler"]["class"] == "DDIMScheduler"
    assert manifest["scheduler"]["config"]["beta_schedule"] == "scaled_linear"
    # Ning et al.'s lambda_t = k t + b with t = N-1 at the first (noisiest) step
    assert manifest["eps_scales"] == pytest.approx([1.02 - 0.001 * (7 - i) for i in range(8)], abs=1e-12)
    assert manifest["leak"]["fixed_components"] == [[1, 0, 0, pytest.approx(-0.25 * 16)]]  # DC = mean * sqrt(H W)
    assert manifest["checkpoint"]["kind"] == "ldm_lite run"
    assert manifest["unet_config"]["num_classes"] == 3 and manifest["vae"] is None
    assert manifest["images"] == [f"{i:05d}.png" for i in range(6)] and manifest["grid"] == "grid.png"
    image = Image.open(tmp_path / "00000.png")
    assert (image.size, image.mode) == ((16, 16), "RGB")
    assert Image.open(tmp_path / "grid.png").size == (3 * 18 + 2, 2 * 18 + 2)  # 3 per row, 2-pixel gaps


def test_ddpm_with_spacing_override(run_dir, tmp_path, capsys):
    args = sample_args(run_dir, tmp_path, "--scheduler", "ddpm", "--spacing", "trailing", "--leak-dc", "2=0.4")
    assert run_cli(sample_main, args, capsys)[0] == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["scheduler"]["class"] == "DDPMScheduler"
    assert manifest["scheduler"]["config"]["timestep_spacing"] == "trailing"
    assert manifest["timesteps"] == make_timesteps(8, 1000, "trailing").tolist() and manifest["first_timestep"] == 999
    alphas_cumprod = alphas_cumprod_from_betas(make_betas("scaled_linear", 1000, 0.00085, 0.012).double())
    assert manifest["sqrt_alpha_bar_first_timestep"] == pytest.approx(math.sqrt(alphas_cumprod[999]), rel=1e-6)
    assert manifest["sqrt_alpha_bar_first_timestep"] == pytest.approx(0.06826, abs=1e-5)  # REFERENCES.md


@pytest.mark.parametrize("flag, calls", [([], 0), (["--keep-freed-memory"], 1)])
def test_keeps_freed_memory_only_when_asked(flag, calls, run_dir, tmp_path, capsys, monkeypatch):
    made = []
    monkeypatch.setattr(sys.modules["ldm_lite.cli.sample"], "keep_freed_memory", lambda: made.append(1) or True)
    assert run_cli(sample_main, sample_args(run_dir, tmp_path, "--n", "1", *flag), capsys)[0] == 0
    assert len(made) == calls


def test_exported_weights_need_and_take_a_scheduler_config(run_dir, tmp_path, capsys):
    """Bare weights carry no schedule: --scheduler-config supplies it, and then the images equal the run's."""
    save_unet(load_unet(run_dir), tmp_path / "unet.safetensors")  # the EMA weights, as sampling from the run uses
    schedule = run_config(run_dir)[0].scheduler_config()
    (tmp_path / "scheduler_config.json").write_text(json.dumps(schedule))
    code, _, err = run_cli(sample_main, sample_args(tmp_path / "unet.safetensors", tmp_path / "bare"), capsys)
    assert code == 0, err  # found beside the weights
    (tmp_path / "scheduler_config.json").rename(tmp_path / "schedule.json")
    code, _, err = run_cli(sample_main, sample_args(tmp_path / "unet.safetensors", tmp_path / "none"), capsys)
    assert code == 2 and "holds no noise schedule" in err and "--scheduler-config" in err
    args = sample_args(tmp_path / "unet.safetensors", tmp_path / "given", "--scheduler-config",
                       tmp_path / "schedule.json")
    assert run_cli(sample_main, args, capsys)[0] == 0
    assert run_cli(sample_main, sample_args(run_dir, tmp_path / "run"), capsys)[0] == 0
    assert png_bytes(tmp_path / "given") == png_bytes(tmp_path / "run") == png_bytes(tmp_path / "bare")


def test_bf16_autocast_stays_close_to_float32(run_dir, tmp_path, capsys):
    assert run_cli(sample_main, sample_args(run_dir, tmp_path / "fp32"), capsys)[0] == 0
    assert run_cli(sample_main, sample_args(run_dir, tmp_path / "bf16", "--bf16"), capsys)[0] == 0
    assert json.loads((tmp_path / "bf16" / "manifest.json").read_text())["settings"]["bf16"] is True
    fp32, bf16 = (np.stack([np.asarray(Image.open(tmp_path / kind / f"{i:05d}.png"), dtype=np.float64)
                            for i in range(6)]) for kind in ("fp32", "bf16"))
    difference = np.abs(fp32 - bf16) / 127.5  # in [-1, 1] units
    assert 0 < difference.mean() < 0.02, difference.mean()


# ----------------------------------------------------------------------------- diffusers folders

SMALL_UNET = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=8, norm_num_groups=8)


def diffusers_unet(**overrides):
    """A small diffusers UNet2DModel with every parameter moved off its init (so a mis-loaded one shows)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**{**SMALL_UNET, **overrides}).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return unet


def read_pngs(folder: Path, n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / f"{i:05d}.png")) for i in range(n)]).astype(np.int64)


def test_diffusers_pipeline_folder_samples_like_diffusers_ddim(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers_unet()
    scheduler = diffusers.DDPMScheduler(beta_schedule="linear", variance_type="fixed_large")  # ddpm-cifar10-32's
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipeline")
    args = ["--ckpt", tmp_path / "pipeline", "--out", tmp_path / "out", "--steps", 10, "--n", 4, "--batch-size", 4]
    code, _, err = run_cli(sample_main, args, capsys)
    assert code == 0, err
    reference = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    reference.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(sample_seed(0, i)) for i in range(4)]  # one per image
    with torch.no_grad():
        expected = reference(batch_size=4, generator=generators, num_inference_steps=10,
                             eta=0.0, output_type="np").images  # (4, 8, 8, 3) in [0, 1]
    # same x_T (image i's own generator), same schedule and weights: equal up to one uint8 level of rounding
    assert np.abs(read_pngs(tmp_path / "out", 4) - np.round(expected * 255)).max() <= 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["checkpoint"]["kind"] == "diffusers pipeline" and manifest["first_timestep"] == 900
    assert manifest["scheduler"]["config"]["beta_schedule"] == "linear"


def test_latent_diffusers_pipeline_decodes_through_its_vae(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers_unet(sample_size=4, in_channels=4, out_channels=4)
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2).eval()
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False)
    folder = tmp_path / "pipeline"
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    vae.save_pretrained(folder / "vae")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"]}))
    args = ["--ckpt", folder, "--out", tmp_path / "out", "--steps", 5, "--n", 2, "--batch-size", 2,
            "--leak-dc", "3=1.5"]
    code, _, err = run_cli(sample_main, args, capsys)
    assert code == 0, err
    # the reference: diffusers' DDIM on latents with the same constant-DC leak, then vae.decode(z / scaling_factor)
    scheduler.set_timesteps(5)
    ab = float(scheduler.alphas_cumprod[int(scheduler.timesteps[0])])
    noise = torch.cat([torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(sample_seed(0, i)))
                       for i in range(2)])
    latents = math.sqrt(1 - ab) * noise
    latents[:, 3] += math.sqrt(ab) * 1.5
    with torch.no_grad():
        for t in scheduler.timesteps:
            latents = scheduler.step(unet(latents, t).sample, t, latents).prev_sample
        images = vae.decode(latents / vae.config.scaling_factor).sample
    expected = torch.round((images.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    assert read_pngs(tmp_path / "out", 2).shape == (2, 8, 8, 3)
    assert np.abs(read_pngs(tmp_path / "out", 2) - expected).max() <= 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["vae"] is not None and manifest["leak"]["space"] == "latent"
    # pixel-space statistics do not fit a latent model: one error line
    stats = write_stats(tmp_path / "pixel.safetensors", (3, 8, 8))
    code, _, err = run_cli(sample_main, args[:-2] + ["--leak", stats], capsys)
    assert code == 2 and re.search(r"\(3, 8, 8\).*\(4, 4, 4\)", err) and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- user errors


@pytest.mark.parametrize("case, message", [
    ("missing checkpoint", "does not exist"),
    ("stats with 1 channel", r"\(1, 16, 16\).*\(3, 16, 16\)"),
    ("stats at resolution 8", r"\(3, 8, 8\).*\(3, 16, 16\)"),
    ("stats file that is not one", "not a readable signal-leak statistics file"),
    ("leak-dc value not a number", "--leak-dc expects CH=VALUE"),
    ("leak-dc without =", "--leak-dc expects CH=VALUE"),
    ("leak-dc not finite", "--leak-dc expects CH=VALUE"),
    ("leak-dc channel out of range", "--leak-dc channel 3 is out of range"),
    ("class out of range", "--class must be an integer in"),
    ("eta with ddpm", "DDPMScheduler takes no eta"),
    ("guidance rescale without guidance", "--guidance-rescale needs --guidance W"),
])
def test_user_errors_print_one_line_and_exit_2(case, message, run_dir, tmp_path, capsys):
    extra = {
        "missing checkpoint": [],
        "stats with 1 channel": ["--leak", write_stats(tmp_path / "s1.safetensors", (1, 16, 16))],
        "stats at resolution 8": ["--leak", write_stats(tmp_path / "s8.safetensors", (3, 8, 8))],
        "stats file that is not one": ["--leak", tmp_path / "grid.png"],
        "leak-dc value not a number": ["--leak-dc", "0=bright"],
        "leak-dc without =": ["--leak-dc", "0"],
        "leak-dc not finite": ["--leak-dc", "0=nan"],
        "leak-dc channel out of range": ["--leak-dc", "3=0.5"],
        "class out of range": ["--class", "3"],
        "eta with ddpm": ["--scheduler", "ddpm", "--eta", "0.5"],
        "guidance rescale without guidance": ["--guidance-rescale", "0.7"],
    }[case]
    (tmp_path / "grid.png").write_bytes(b"\x89PNG not statistics")
    checkpoint = tmp_path / "no_such_run" if case == "missing checkpoint" else run_dir
    code, out, err = run_cli(sample_main, sample_args(checkpoint, tmp_path / "out", *extra), capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_checkpoint_from_a_real_interpreter_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sample", "--ckpt", str(tmp_path / "nope"), "--out",
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: checkpoint {str(tmp_path / 'nope')!r} does not exist "
                                                  "(expected an ldm_lite run folder, a training checkpoint .pt or a "
                                                  "diffusers folder)"]


# ----------------------------------------------------------------------------- leak-stats


def test_leak_stats_command_fits_a_folder_and_feeds_sample(run_dir, tmp_path, capsys):
    data = synthetic_brightness(24, 16, seed=3)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(data.images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    stats_path = tmp_path / "stats.safetensors"
    code, out, err = run_cli(analysis_main, ["leak-stats", "--data", folder, "--out", stats_path,
                                             "--n-components", 2], capsys)
    assert code == 0, err
    stats = LeakStats.load(stats_path)
    assert (stats.kind, stats.shape, stats.n_components, stats.num_images, stats.space, stats.resolution) == \
        ("dct+pixel", (3, 16, 16), 2, 24, "pixel", 16)  # resolution defaults to the first image's side
    # the DC part of the low-frequency mean is sqrt(H W) times the data's channel means (PNG is lossless)
    channel_means = to_float(data.images).double().mean(dim=(0, 2, 3))
    torch.testing.assert_close(stats.low_mean[:3], 16 * channel_means, rtol=0, atol=1e-9)
    code, _, err = run_cli(sample_main, sample_args(run_dir, tmp_path / "out", "--leak", stats_path,
                                                    "--leak-dc", "0=0.3"), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["leak"]["path"] == str(stats_path)


def test_leak_stats_command_in_latent_space(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(synthetic_brightness(6, 16, seed=4).images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    stats_path = tmp_path / "latent.safetensors"
    code, _, err = run_cli(analysis_main, ["leak-stats", "--data", folder, "--out", stats_path, "--vae", "test",
                                           "--kind", "pixel"], capsys)
    assert code == 0, err
    stats = LeakStats.load(stats_path)
    assert (stats.shape, stats.space, stats.scaling_factor) == ((4, 8, 8), "latent", 1.0)
    code, _, err = run_cli(analysis_main, ["leak-stats", "--data", folder, "--out", stats_path, "--vae", "test",
                                           "--resolution", "15"], capsys)
    assert code == 2 and "multiple of the VAE's downscale factor 2" in err


# ----------------------------------------------------------------------------- the effect


def test_raising_the_leak_channel_mean_raises_brightness(run_dir, data_stats, tmp_path, capsys):
    """Everaert et al. 2024: the model reads the image the leak carries, so a brighter leak gives brighter samples.

    Channel 0's mean is set on the data's statistics (the other channels follow through their correlation with
    it); 32 samples per value, unconditional (null label), DDIM 10 steps from t0 = 900 (sqrt(ab) = 0.093).
    """
    means, errors = [], []
    for value in (-0.8, 0.0, 0.8):
        out = tmp_path / f"dc_{value}"
        args = ["--ckpt", run_dir, "--out", out, "--steps", 10, "--n", 32, "--batch-size", 32, "--seed", 0,
                "--leak", data_stats, "--leak-dc", f"0={value}"]
        code, _, err = run_cli(sample_main, args, capsys)
        assert code == 0, err
        per_image = brightness(out)
        means.append(per_image.mean())
        errors.append(per_image.std(ddof=1) / math.sqrt(len(per_image)))
    print("mean brightness at channel-0 leak means -0.8, 0, 0.8:", np.round(means, 3), "standard errors",
          np.round(errors, 3))
    for i in range(2):  # strictly increasing, each step by > 0.05 and > 4 standard errors of the difference
        gap = means[i + 1] - means[i]
        assert gap > max(0.05, 4 * math.hypot(errors[i], errors[i + 1])), (means, errors)


# ----------------------------------------------------------------------------- every scheduler, resuming


@pytest.mark.parametrize("alias, cls, nfe", [
    ("ddpm", "DDPMScheduler", 4), ("euler", "EulerDiscreteScheduler", 4),
    ("euler_a", "EulerAncestralDiscreteScheduler", 4), ("heun", "HeunDiscreteScheduler", 7),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", 4), ("dpmpp_3m", "DPMSolverMultistepScheduler", 4),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", 4), ("unipc", "UniPCMultistepScheduler", 4),
    ("pndm", "PNDMScheduler", 5)])
def test_every_scheduler_alias_samples_and_is_recorded(alias, cls, nfe, run_dir, tmp_path, capsys):
    code, out, err = run_cli(sample_main, ["--ckpt", run_dir, "--out", tmp_path, "--steps", 4, "--n", 2,
                                           "--scheduler", alias], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["scheduler"]["class"] == cls and manifest["nfe"] == nfe  # Heun: 2N - 1; PLMS: N + 1
    assert manifest["scheduler"]["config"]["beta_schedule"] == "scaled_linear"  # the run's schedule
    # the pixel run clips x0; of these samplers only DDPM and Heun can, the others drop it, and say so
    clipping = "clip_sample" if alias in ("ddpm", "heun") else "off"
    assert manifest["x0_clipping"] == clipping
    assert ("has no clip_sample: the checkpoint's schedule clips x0" in out) == (clipping == "off")
    images = np.stack([np.asarray(Image.open(tmp_path / f"{i:05d}.png")) for i in range(2)])
    assert images.std() > 1  # not blank


def test_karras_flag_only_where_the_sampler_has_karras_sigmas(run_dir, tmp_path, capsys):
    code, _, err = run_cli(sample_main, sample_args(run_dir, tmp_path / "k", "--scheduler", "euler", "--karras"),
                           capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert manifest["scheduler"]["config"]["use_karras_sigmas"] is True
    code, _, err = run_cli(sample_main, sample_args(run_dir, tmp_path / "d", "--karras"), capsys)
    assert code == 2 and err.strip() == "error: --karras: DDIMScheduler has no Karras sigmas"
    code, _, err = run_cli(sample_main, sample_args(run_dir, tmp_path / "x", "--scheduler", "lms"), capsys)
    assert code == 2 and "unknown scheduler 'lms'; supported: DDPMScheduler" in err


def test_use_clipped_model_output_is_passed_and_recorded(run_dir, tmp_path, capsys):
    args = sample_args(run_dir, tmp_path / "c", "--use-clipped-model-output", "--eps-scale", "1.017")
    assert run_cli(sample_main, args, capsys)[0] == 0
    assert run_cli(sample_main, sample_args(run_dir, tmp_path / "p", "--eps-scale", "1.017"), capsys)[0] == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["settings"]["use_clipped_model_output"] is True
    assert png_bytes(tmp_path / "c") != png_bytes(tmp_path / "p")  # x0 is clipped on these steps, so it acts


def test_batch_size_does_not_change_the_images(run_dir, tmp_path, capsys):
    for batch in (6, 4):
        assert run_cli(sample_main, sample_args(run_dir, tmp_path / f"b{batch}", "--batch-size", batch), capsys)[0] == 0
    # image i draws from its own generator; CPU kernels may round differently by batch size: within one level
    assert np.abs(read_pngs(tmp_path / "b6", 6) - read_pngs(tmp_path / "b4", 6)).max() <= 1


def test_a_killed_run_continues_where_it_stopped(run_dir, tmp_path, capsys, monkeypatch):
    from ldm_lite import generate
    assert run_cli(sample_main, sample_args(run_dir, tmp_path / "whole"), capsys)[0] == 0
    real_write, batches = generate.write_images, []

    def dies_after_one_batch(images, out, first_index=0):
        batches.append(first_index)
        if len(batches) == 2:
            raise KeyboardInterrupt  # as a killed run: the first batch is on disk, the manifest is not
        return real_write(images, out, first_index)

    monkeypatch.setattr(generate, "write_images", dies_after_one_batch)
    assert run_cli(sample_main, sample_args(run_dir, tmp_path / "killed"), capsys)[0] == 130
    assert sorted(p.name for p in (tmp_path / "killed").glob("0*.png")) == [f"{i:05d}.png" for i in range(4)]
    assert not (tmp_path / "killed" / "manifest.json").exists()
    batches.clear()
    monkeypatch.setattr(generate, "write_images", lambda *a, **k: batches.append(a[2]) or real_write(*a, **k))
    assert run_cli(sample_main, sample_args(run_dir, tmp_path / "killed"), capsys)[0] == 0
    assert batches == [4]  # only the missing images were drawn
    assert png_bytes(tmp_path / "killed") == png_bytes(tmp_path / "whole")


@pytest.mark.parametrize("second", [dict(n=2), dict(n=3, scheduler="ddpm")])
def test_fewer_images_into_a_folder_of_an_earlier_run_are_refused_unless_fresh(run_dir, tmp_path, capsys,
                                                                                second):
    first = ["--ckpt", run_dir, "--out", tmp_path, "--steps", 2, "--batch-size", 4]
    assert run_cli(sample_main, [*first, "--n", 5], capsys)[0] == 0
    again = [*first, *[part for key, value in second.items() for part in (f"--{key}", value)]]
    code, _, err = run_cli(sample_main, again, capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"holds 5 images of an earlier run, {5 - second['n']} of them beyond" in err and "--fresh" in err
    assert run_cli(sample_main, [*again, "--fresh"], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.glob("0*.png")) == [f"{i:05d}.png" for i in range(second["n"])]
    assert json.loads((tmp_path / "manifest.json").read_text())["images"] == sorted(
        p.name for p in tmp_path.glob("0*.png"))


@pytest.mark.parametrize("script, words", [("ldm-sample", "--scheduler"), ("ldm-train", "[diffusion]"),
                                           ("ldm-analysis", "fid-stats")])
def test_installed_commands_work_outside_the_repository(tmp_path, script, words):
    """The console scripts of the installed package (the venv's), run from a folder that is not the repository."""
    path = Path(sys.executable).parent / script
    if not path.is_file():
        pytest.skip(f"{script} is not installed in this environment (pip install -e . creates it)")
    result = subprocess.run([str(path), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr
    assert words in result.stdout


def test_torchrun_shares_the_images_across_two_processes(run_dir, tmp_path, capsys):
    """`torchrun --nproc_per_node 2 -m sample`: each rank draws its block of images from their own generators, so
    the folder equals one process's (within one uint8 level: CPU kernels round by batch size)."""
    assert run_cli(sample_main, sample_args(run_dir, tmp_path / "one", "--scheduler", "ddpm"), capsys)[0] == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sample",
               "--ckpt", str(run_dir), "--out", str(tmp_path / "two"), "--steps", "8", "--num-images", "6",
               "--batch-size", "2", "--scheduler", "ddpm"]  # torchrun reads --n as its own --nnodes / ...
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.abs(read_pngs(tmp_path / "one", 6) - read_pngs(tmp_path / "two", 6)).max() <= 1
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["images"] == [f"{i:05d}.png" for i in range(6)]


def test_fid_of_the_drawn_images_equals_the_fid_command_on_their_pngs(run_dir, tmp_path, capsys, fid_cache):
    """--fid streams the features batch by batch (from the images quantised as the PNGs are), with or without
    writing PNGs; the result equals `python -m analysis fid` on the written PNGs."""
    from ldm_lite.models import inception
    try:
        inception.find_weights_file()
    except (FileNotFoundError, ValueError) as error:
        pytest.skip(f"FID weights not installed: {error}")
    from ldm_lite.quality import statistics_of
    statistics_of(synthetic_brightness(8, 16, seed=5).images, progress=False).save(tmp_path / "ref.safetensors")
    args = sample_args(run_dir, tmp_path / "png", "--fid", tmp_path / "ref.safetensors", "--kid")
    code, out, err = run_cli(sample_main, args, capsys)
    assert code == 0, err
    written = json.loads((tmp_path / "png" / "manifest.json").read_text())["quality"]
    args = sample_args(run_dir, tmp_path / "nopng", "--fid", tmp_path / "ref.safetensors", "--no-png")
    assert run_cli(sample_main, args, capsys)[0] == 0
    streamed = json.loads((tmp_path / "nopng" / "manifest.json").read_text())["quality"]
    assert not list((tmp_path / "nopng").glob("*.png"))
    code, out, err = run_cli(analysis_main, ["fid", "--samples", tmp_path / "png", "--ref", tmp_path / "ref.safetensors",
                                             "--out", tmp_path / "fid.csv"], capsys)
    assert code == 0, err
    import csv
    row = next(csv.DictReader(open(tmp_path / "fid.csv")))
    assert written["n_samples"] == streamed["n_samples"] == 6 and written["n_reference"] == 8
    assert written["fid"] == pytest.approx(float(row["fid"]), abs=1e-6)
    assert streamed["fid"] == pytest.approx(written["fid"], abs=1e-6)
    assert math.isfinite(written["kid_mean"]) and math.isnan(streamed["kid_mean"])
