"""`ldm_lite.inversion` (invert, reconstruct) and `python -m analysis invert`. No diffusers needed.

The round-trip error against the exact Gaussian-mixture denoiser (the data's true x0 is the reference), `invert`
and `reconstruct` against hand-written scheduler loops on a random-weight UNet (bit for bit), and the command on a
few PNG files. The scheduler-level round trip lives in test_solver_convergence.py; these test the functions.
"""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_lite.cli import run_main
from ldm_lite.cli.analysis import main as analysis_main
from ldm_lite.config_io import load_config
from ldm_lite.inversion import invert, reconstruct, rms_per_image, schedulers_for
from ldm_lite.latents import decode_latents, encode_latents
from ldm_lite.models.unet import UNet, load_unet, save_unet, unet_preset
from ldm_lite.oracle import brightness_mixture
from ldm_lite.runs import atomic_save, checkpoint_payload, load_model
from ldm_lite.schedulers import DDIMScheduler, from_config

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]

# Stable Diffusion's schedule as a run of the toolkit writes it for a latent model (leading, offset 1, no clipping).
SD_SCHEDULE = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
               "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False,
               "timestep_spacing": "leading", "steps_offset": 1}
PIXEL_SCHEDULE = {**SD_SCHEDULE, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "clip_sample": True}


def test_round_trip_error_shrinks_with_steps_for_the_exact_denoiser():
    """Brightness mixture (levels -0.6 / 0 / 0.6, texture 0.1; 32 images of 3 x 8 x 8, float64). Mean RMS
    error measured at 10, 20, 40, 80 steps: 0.0756, 0.0608, 0.0432, 0.0262 (ratios 1.24, 1.41, 1.65: first order,
    ratio 2, only approached: the posterior mean bends sharply at low noise, where leading steps are coarse).
    x_T's std grows towards the prior's 1 with the steps: 0.49, 0.62, 0.77, 0.90."""
    oracle = brightness_mixture(from_config(SD_SCHEDULE).alphas_cumprod, shape=(3, 8, 8))
    x0, _ = oracle.sample_data(32, torch.Generator().manual_seed(0), torch.float64)
    results = [reconstruct(oracle, x0, steps, SD_SCHEDULE) for steps in (10, 20, 40, 80)]
    errors = [r.error.mean().item() for r in results]
    for result in results:
        assert result.reconstruction.dtype == torch.float64 and result.error.shape == (32,)
        torch.testing.assert_close(result.error, (result.reconstruction - x0).pow(2).mean((1, 2, 3)).sqrt(),
                                   rtol=0, atol=1e-12)
    assert all(errors[i] >= 1.2 * errors[i + 1] for i in range(3)), errors
    assert errors[0] <= 0.08 and errors[-1] <= 0.03, errors
    stds = [r.x_T.std().item() for r in results]
    assert all(a < b for a, b in zip(stds, stds[1:])) and 0.85 <= stds[-1] <= 1.0, stds


def tiny_unet(seed: int = 0, **overrides) -> UNet:
    """Random 8x8 weights, every parameter moved off its initial value (no trivially zero output)."""
    torch.manual_seed(seed)
    model = UNet(unet_preset("tiny", sample_size=8, **overrides))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def test_invert_and_reconstruct_equal_hand_written_loops():
    """A class-conditional learned-sigma UNet: `invert` is the loop of DDIMInverseScheduler.step calls on the
    prediction half of the output, and `reconstruct` then the loop of DDIMScheduler.step calls, bit for bit."""
    model = tiny_unet(num_classes=3, learn_sigma=True)
    x0 = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.tensor([0, 2, 3])  # 3: the null label
    inverse, sampler = from_config(PIXEL_SCHEDULE, "DDIMInverseScheduler"), DDIMScheduler(**{
        k: v for k, v in PIXEL_SCHEDULE.items() if not k.startswith("_")})
    inverse.set_timesteps(5)
    sampler.set_timesteps(5)
    assert inverse.timesteps.tolist() == [1, 201, 401, 601, 801]
    with torch.no_grad():
        x = x0
        for t in inverse.timesteps:
            x = inverse.step(model(x, t.expand(3), labels)[:, :3], t, x).prev_sample
        x_T = x
        for t in sampler.timesteps:
            x = sampler.step(model(x, t.expand(3), labels), t, x).prev_sample
    seen = []
    inverted = invert(model, from_config(PIXEL_SCHEDULE, "DDIMInverseScheduler"), x0, 5, labels,
                      callback=lambda info: seen.append(info["timestep"]))
    assert torch.equal(inverted, x_T) and seen == [1, 201, 401, 601, 801]
    result = reconstruct(model, x0, 5, PIXEL_SCHEDULE, class_labels=labels)
    assert torch.equal(result.x_T, x_T) and torch.equal(result.reconstruction, x)
    assert torch.equal(result.error, rms_per_image(x, x0))
    assert x_T.std().item() > 0.1 and result.error.min().item() > 0  # a random model does not reconstruct


def test_schedulers_come_from_any_sampler_config():
    """A DPM-Solver config still gives the DDIM pair of its schedule; linspace spacing (no inverse) is refused."""
    inverse, sampler = schedulers_for({**SD_SCHEDULE, "_class_name": "DPMSolverMultistepScheduler"})
    assert (type(inverse).__name__, type(sampler).__name__) == ("DDIMInverseScheduler", "DDIMScheduler")
    assert torch.equal(inverse.alphas_cumprod, sampler.alphas_cumprod)
    with pytest.raises(ValueError, match="timestep_spacing"):
        schedulers_for({**SD_SCHEDULE, "timestep_spacing": "linspace"})


# ----------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A random 16x16 UNet checkpoint with scheduler_config.json beside it, and 4 PNG images of 16x16."""
    root = tmp_path_factory.mktemp("invert")
    torch.manual_seed(0)
    save_unet(UNet(unet_preset("tiny", sample_size=16)), root / "model.safetensors")
    DDIMScheduler().save_config(root)
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    return root


def read_pngs(folder) -> torch.Tensor:
    """0.png .. 3.png as (4, 3, 16, 16) in [-1, 1], read with PIL alone."""
    arrays = [np.array(Image.open(folder / f"{i}.png")) for i in range(4)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def run_cli(argv, capsys) -> tuple:
    capsys.readouterr()
    code = run_main(analysis_main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_command_writes_table_csv_and_grid(workspace, capsys):
    out = workspace / "out"
    code, text, err = run_cli(["invert", "--ckpt", workspace / "model.safetensors", "--images", workspace / "images",
                               "--steps", "2,4", "--num-images", 4, "--out", out], capsys)
    assert code == 0, err
    with open(out / "inversion.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["steps"]), int(r["model_calls"])) for r in rows] == [(2, 4), (4, 8)]
    # the reference: the 4 PNGs read here (no resize at 16x16), run through the library
    x0 = read_pngs(workspace / "images")
    model = load_unet(workspace / "model.safetensors")
    for row, steps in zip(rows, (2, 4)):
        expected = reconstruct(model, x0, steps, DDIMScheduler().config).error
        assert float(row["rms_mean"]) == pytest.approx(expected.mean().item(), rel=1e-6, abs=0)
        assert float(row["rms_max"]) == pytest.approx(expected.max().item(), rel=1e-6, abs=0)
        assert float(row["image_rms_mean"]) == float(row["rms_mean"])  # pixel model: one space
    with Image.open(out / "inversion_grid.png") as grid:  # 4 per row, 1 + 2 x 2 rows, 16 px shown at 64 px
        assert grid.size == (4 * 66 + 2, 5 * 66 + 2)
    assert (out / "inversion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rms_mean" in text and "wrote inversion.csv, inversion_grid.png, inversion.png" in text


def test_command_on_a_latent_run(workspace, tmp_path, capsys):
    """A latent run (the seeded random 'test' VAE: 16x16 images -> 4 x 8 x 8 latents) inverts latents: the CSV's
    latent RMS is the library's on the encoded images, the image error is measured after decoding."""
    config = load_config(ROOT / "train" / "configs" / "synthetic_tiny.toml", {"latent.vae": "test"})
    model = tiny_unet(in_channels=4)
    run = tmp_path / "latent_run"
    run.mkdir()
    atomic_save(checkpoint_payload(config, model, None, torch.optim.SGD(model.parameters(), lr=0.1), 1),
                run / "checkpoint.pt")
    out = tmp_path / "out"
    code, _, err = run_cli(["invert", "--ckpt", run, "--images", workspace / "images", "--steps", "3",
                            "--num-images", 4, "--out", out], capsys)
    assert code == 0, err
    with open(out / "inversion.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    loaded = load_model(run)
    images = read_pngs(workspace / "images")
    expected = reconstruct(loaded.unet, encode_latents(loaded.vae, images), 3, loaded.scheduler_config)
    assert float(row["rms_mean"]) == pytest.approx(expected.error.mean().item(), rel=1e-6, abs=0)
    decoded = decode_latents(loaded.vae, expected.reconstruction)
    assert float(row["image_rms_mean"]) == pytest.approx(rms_per_image(decoded, images).mean().item(), rel=1e-6, abs=0)
    with Image.open(out / "inversion_grid.png") as grid:  # originals, x_T (8x8 latents shown at 16), reconstruction
        assert grid.size == (4 * 66 + 2, 3 * 66 + 2)
    assert not (out / "inversion.png").exists()  # one step count: no curve


@pytest.mark.parametrize("argv,message", [
    (["--steps", "4,0"], "--steps must be distinct positive integers"),
    (["--images", "/nonexistent/images"], "is not an existing folder"),
])
def test_command_bad_input_ends_in_one_line(workspace, capsys, argv, message):
    base = {"--ckpt": workspace / "model.safetensors", "--images": workspace / "images", "--steps": "2",
            "--out": workspace / "bad"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    code, out, err = run_cli(["invert", *[x for pair in base.items() for x in pair]], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
