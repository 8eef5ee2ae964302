"""`python -m analysis bands|brightness|spectrum|exposure|hspace`: outputs written, summaries printed, and user
errors ending in one line on stderr with exit code 2 and no traceback.

The subprocess runs start together (one module fixture) so their interpreter start-ups overlap; the commands'
successful runs other than `bands` are called in-process through the dispatcher's `main`.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_lite import DDIMScheduler
from ldm_lite.data import synthetic_brightness, to_float
from ldm_lite.schedules import alphas_cumprod_from_betas, make_betas
from ldm_lite.models.unet import UNet, save_unet, unet_preset

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny checkpoint (random 8x8 UNet + scheduler_config.json) and a .npz of fake samples."""
    root = tmp_path_factory.mktemp("analysis_cli")
    torch.manual_seed(0)
    save_unet(UNet(unet_preset("tiny", sample_size=8)), root / "model.safetensors")
    DDIMScheduler().save_config(root)
    g = np.random.default_rng(0)
    np.savez(root / "samples.npz", samples=g.integers(60, 200, size=(40, 16, 16, 3), dtype=np.uint8))
    return root


def error_cases(root: Path) -> dict:
    """One user error per command, run as `python -m analysis ...` subprocesses."""
    ckpt = str(root / "model.safetensors")
    npz = str(root / "samples.npz")
    return {
        "missing data folder": ["bands", "--data", "/nonexistent/images"],
        "missing samples": ["brightness", "--samples", "/nonexistent/samples"],
        "bad num-images": ["spectrum", "--samples", npz, "--num-images", "1"],
        "missing checkpoint": ["exposure", "--ckpt", "/nonexistent/run"],
        "bad edit steps": ["hspace", "--ckpt", ckpt, "--steps", "4", "--edit-steps", "3:9"],
    }


@pytest.fixture(scope="module")
def subprocess_runs(workspace):
    """Start every subprocess at once; returns {case: CompletedProcess-like (returncode, stdout, stderr)}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("LDM_LITE_DEBUG", None)
    cases = {**error_cases(workspace),
             "bands": ["bands", "--data", "synthetic", "--num-images", "64", "--resolution", "16",
                       "--schedules", "linear,scaled_linear_zero_snr", "--out", str(workspace / "bands")]}
    processes = {name: subprocess.Popen([sys.executable, "-m", "analysis", *args], cwd=ROOT, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name, args in cases.items()}
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = (process.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("case", ["missing data folder", "missing samples", "bad num-images", "missing checkpoint",
                                  "bad edit steps"])
def test_user_errors_end_in_one_line(subprocess_runs, case):
    returncode, stdout, stderr = subprocess_runs[case]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, (stdout, stderr)
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    expected = {"missing data folder": "/nonexistent/images", "missing samples": "--samples",
                "bad num-images": "--num-images", "missing checkpoint": "/nonexistent/run",
                "bad edit steps": "--edit-steps"}[case]
    assert expected in lines[0]


@pytest.mark.parametrize("args, flag", [
    (["bands", "--steps", "0"], "--steps"),
    (["bands", "--schedules", "linear,nope"], "--schedules"),
    (["brightness", "--samples", "SAMPLES", "--resolution", "0"], "--resolution"),
    (["exposure", "--ckpt", "CKPT", "--scan", "1,x"], "--scan"),
    (["hspace", "--ckpt", "CKPT", "--scales", "big"], "--scales"),
])
def test_bad_values_in_process(workspace, capsys, args, flag):
    """More bad values through the same error path (run_main), without paying an interpreter start each."""
    from ldm_lite.cli import run_main
    from ldm_lite.cli.analysis import main
    paths = {"SAMPLES": str(workspace / "samples.npz"), "CKPT": str(workspace / "model.safetensors")}
    assert run_main(main, [paths.get(a, a) for a in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], lines


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000


def test_bands_command_writes_plots_and_tables(subprocess_runs, workspace):
    returncode, stdout, stderr = subprocess_runs["bands"]
    assert returncode == 0, stderr
    out = workspace / "bands"
    for name in ("snr", "destruction", "leak", "correlation"):
        assert_png(out / f"bands_{name}.png")
    power = read_csv(out / "bands_power.csv")
    assert len(power) == 4 * 6  # (R, G, B, all) x 6 octave bands at 16 x 16
    # the DC band of channel "all", computed here: the orthonormal DC coefficient is sqrt(H W) times the
    # image mean, its power the mean square over images, averaged over the channels
    images = to_float(synthetic_brightness(64, 16, seed=0).images).double()
    dc_power = float((16 * images.mean(dim=(2, 3))).pow(2).mean())
    dc = next(row for row in power if row["channel"] == "all" and row["band"] == "0")
    assert (int(dc["k_min"]), int(dc["k_max"])) == (0, 0)
    assert float(dc["power"]) == pytest.approx(dc_power, rel=1e-9)
    leak = read_csv(out / "bands_leak.csv")
    zero_snr = [row for row in leak if row["schedule"] == "scaled_linear_zero_snr" and row["spacing"] == "trailing"]
    assert zero_snr and all(float(row["snr_at_t0"]) == 0.0 for row in zero_snr)
    # the DC band is destroyed at the first t with ab_t P / (1 - ab_t) < 1 (linear schedule, white noise)
    alphas_cumprod = alphas_cumprod_from_betas(make_betas("linear", 1000, 1e-4, 0.02).double())
    expected = int(torch.nonzero(alphas_cumprod * dc_power / (1 - alphas_cumprod) < 1)[0])
    destruction = read_csv(out / "bands_destruction.csv")
    row = next(r for r in destruction if r["channel"] == "all" and r["band"] == "0" and r["schedule"] == "linear"
               and r["noise"] == "white")
    assert int(row["destruction_timestep"]) == expected
    correlation = read_csv(out / "bands_correlation.csv")
    assert max(abs(float(row["measured"]) - float(row["theory"])) for row in correlation) < 0.5
    assert "destruction timestep" in stdout and "signal leak" in stdout


def run_in_process(args, capsys) -> str:
    from ldm_lite.cli.analysis import main
    assert main(args) in (None, 0)
    return capsys.readouterr().out


def test_bands_on_vae_latents(workspace, capsys):
    """--vae encodes the images first: the random 'test' VAE gives 4 latent channels at half resolution."""
    out = workspace / "bands_vae"
    run_in_process(["bands", "--vae", "test", "--num-images", "16", "--resolution", "16", "--schedules", "linear",
                    "--out", str(out)], capsys)
    power = read_csv(out / "bands_power.csv")
    assert sorted({row["channel"] for row in power}) == ["all", "c0", "c1", "c2", "c3"]
    assert max(int(row["k_max"]) for row in power) == 9  # 8 x 8 latents: floor(7 sqrt 2)


def test_brightness_and_spectrum_commands(workspace, capsys):
    out = workspace / "brightness"
    text = run_in_process(["brightness", "--samples", str(workspace / "samples.npz"), "--data", "synthetic",
                           "--num-images", "200", "--out", str(out)], capsys)
    rows = read_csv(out / "brightness.csv")
    assert [row["quantity"] for row in rows] == ["R", "G", "B", "luminance"]
    # uniform-noise samples have nearly constant brightness: far narrower than the synthetic data
    assert all(float(row["std_ratio"]) < 0.2 for row in rows)
    assert_png(out / "brightness.png")
    assert "std_ratio" in text
    out = workspace / "spectrum"
    text = run_in_process(["spectrum", "--samples", str(workspace / "samples.npz"), "--data", "synthetic",
                           "--num-images", "200", "--out", str(out)], capsys)
    assert_png(out / "spectrum.png")
    bands = read_csv(out / "spectrum_bands.csv")
    assert len(bands) == 6 and float(bands[-1]["log10_ratio"]) > 1  # white-noise samples: far too much detail
    assert len(read_csv(out / "spectrum.csv")) == 22  # radial indices 0 .. floor(15 sqrt 2) = 21
    assert "log10_ratio" in text


def test_exposure_command_with_scan(workspace, capsys):
    out = workspace / "exposure"
    text = run_in_process(["exposure", "--ckpt", str(workspace / "model.safetensors"), "--data", "synthetic",
                           "--num-images", "8", "--steps", "3", "--scan", "1,1.02", "--out", str(out)], capsys)
    rows = read_csv(out / "exposure.csv")
    assert [int(row["timestep"]) for row in rows] == [666, 333, 0]  # DDIM leading, T = 1000, 3 steps
    alphas_cumprod = alphas_cumprod_from_betas(make_betas("linear", 1000, 1e-4, 0.02)).double()  # the model's float32
    for row in rows:  # the target spread of x_t around sqrt(ab) x0 is sqrt(1 - ab_t) (Ho et al. eq. 4)
        assert float(row["target_std"]) == pytest.approx(float((1 - alphas_cumprod[int(row["timestep"])]).sqrt()),
                                                         rel=1e-6)
    scan = read_csv(out / "eps_scale_scan.csv")
    assert [float(row["eps_scale"]) for row in scan] == [1.0, 1.02]
    for name in ("exposure.png", "eps_scale_scan.png"):
        assert_png(out / name)
    assert "best eps scale" in text


def test_hspace_command(workspace, capsys):
    out = workspace / "hspace"
    text = run_in_process(["hspace", "--ckpt", str(workspace / "model.safetensors"), "--num-samples", "6",
                           "--steps", "3", "--components", "2", "--scales=-1,0,1", "--grid-samples", "1",
                           "--out", str(out)], capsys)
    assert_png(out / "hspace_grid.png")
    assert_png(out / "hspace_explained.png")
    rows = read_csv(out / "hspace_pca.csv")
    assert [(row["pca"], int(row["component"])) for row in rows[:2]] == [("joint", 0), ("joint", 1)]
    assert len(rows) == 2 * (1 + 3)  # joint + one PCA per timestep
    saved = torch.load(out / "hspace_pca.pt")
    assert saved["joint"]["directions"].shape == (2, 3 * 64 * 2 * 2)  # 3 timesteps x C_mid = 64 at 2 x 2
    assert sorted(saved["per_timestep"]) == [0, 333, 666]
    assert "PC 0" in text
