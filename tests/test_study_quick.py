"""The study on real images (`python -m analysis study`) in its quick mode (8x8 synthetic images, 10 steps, 32
samples, DDIM at 5 steps, a 32-image reference), end to end: its report's sections, its FID / KID rows against
`quality_report` on the saved features, its samples re-drawn, the leak on both schedules, the real-data floor,
`--unet-from`, resuming, and torchrun sharding."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm_lite import fid_reference, metrics
from ldm_lite.data import synthetic_brightness, to_float, to_uint8
from ldm_lite.feature_set_metrics import kernel_inception_distance
from ldm_lite.models import load_unet
from ldm_lite.quality import FidStatistics, inception_features, quality_report
from ldm_lite.runs import run_config
from ldm_lite.sampling import sample
from ldm_lite.schedulers import from_config
from ldm_lite import study as study_module
from ldm_lite.study import real
from ldm_lite.study import QualityStudyConfig, run_study
from study_quick_settings import BASE_KEY, QUICK, UNCLIPPED_KEY, needs_wheel

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def quick_study(tmp_path_factory, fid_cache, one_thread):
    """The quick mode: the 60-minute budget never binds, so nothing is dropped whatever the machine's load."""
    out = tmp_path_factory.mktemp("study")
    return out, run_study(QualityStudyConfig(out=str(out), **QUICK))


@needs_wheel
def test_quick_study_report_has_every_section(quick_study, fid_cache):
    out, results = quick_study
    page = (out / "report.html").read_text()
    for title in ("Summary", "1. Samplers against the number of model calls", "2. Epsilon scaling",
                  "3. Signal leak and DC steering", "4. The fixes against the standard recipe",
                  "Plan, budget and timings", "Sample grids", "Settings"):
        assert f"<h2>{title}" in page, title
    for figure in ("fid_nfe.png", "eps_scale_quality.png", "eps_scale_scan.png", "summary.png"):
        assert f"src='{figure}'" in page and Image.open(out / figure).size[0] > 400
    for grid in results.grids.values():
        assert (out / grid).is_file() and f"src='{grid}'" in page
    assert "Nothing was dropped" in page and results.dropped == []
    assert set(results.timings) >= {"reference features", "train standard + leaky", "evaluate part 4 (fixes)",
                                       "tercile samples (part 4)", "evaluate part 3 (signal leak)",
                                       "DC steering (part 3)", "evaluate part 2 (epsilon scaling)",
                                       "eps-norm scan (part 2)"}
    # the reference features are cached under $LDM_LITE_CACHE, named by the images and the protocol
    assert results.reference["path"].startswith(str(fid_cache)) and results.reference["images"] == 32
    tables = results.tables
    # part 1: every sampler unclipped, DDIM at quadratic timesteps (t0 = 0.8 T), the base setting as clipped DDIM
    assert [(r["sampler"], r["nfe"], r["x0_clipping"], r["beyond_2sd"]) for r in tables["samplers"]] == [
        ("ddim", 5, "off", "baseline"), ("heun", 5, "off", "no"), ("ddim (quadratic spacing)", 5, "off", "no"),
        ("ddim (x0 clipped)", 5, "clip_sample", "no")]  # heun: 3 steps, 5 calls
    # T = 1000, the run's leading spacing + 1: 4 * (1000 // 5) + 1, Heun's 2 * (1000 // 3) + 1; quadratic 0.8 T
    assert [r["t0"] for r in tables["samplers"]] == [801.0, 667.0, 800.0, 801.0]
    assert [r["eps_scale"] for r in tables["eps"]] == [0.99, 1.0]
    assert [r["model"] for r in tables["fixes"]] == ["standard", "leaky"]
    assert {r["model"]: r["steps"] for r in results.models} == {"standard": 10, "leaky": 10}


@needs_wheel
def test_quick_study_tables_equal_an_independent_recomputation(quick_study):
    """FID and KID from the saved features through quality_report; the saved samples re-drawn through the public
    sampling API; their features through inception_features; the brightness row through metrics."""
    out, results = quick_study
    saved = {}
    from safetensors.torch import load_file
    saved = load_file(str(out / "eval" / f"{BASE_KEY}.safetensors"))
    reference = FidStatistics.load(results.reference["path"])
    expected = quality_report(FidStatistics.from_features(saved["features"]), reference, kid=True)
    rows = [results.tables["samplers"][-1], results.tables["eps"][1], results.tables["leak"][0],
            results.tables["fixes"][0]]  # the base setting, shared by the four parts (part 1's clipped DDIM)
    for row in rows:
        assert row["fid"] == pytest.approx(expected["fid"], rel=1e-9)
        assert (row["kid"], row["kid_std"]) == pytest.approx((expected["kid_mean"], expected["kid_std"]), rel=1e-9)
        assert row["n"] == 32 and row["beyond_2sd"] == ("no" if row is rows[0] else "baseline")
    run = out / "model_standard"
    unet = load_unet(run).eval()
    for key, clip_sample in ((BASE_KEY, True), (UNCLIPPED_KEY, False)):  # the run's clip_sample, then part 1's
        scheduler = from_config(run_config(run)[0], "ddim", clip_sample=clip_sample)
        images = sample(unet, scheduler, 32, num_inference_steps=5, class_labels=3, seed=0, progress=False)
        assert torch.equal(to_uint8(images.clamp(-1, 1)), load_file(str(out / "eval" / f"{key}.safetensors"))[
            "samples"]), key
    assert not torch.equal(load_file(str(out / "eval" / f"{UNCLIPPED_KEY}.safetensors"))["samples"],
                           saved["samples"])
    assert torch.allclose(inception_features(saved["samples"][:2], progress=False), saved["features"][:2],
                          atol=1e-4)
    data = synthetic_brightness(256, 8, seed=0).images[torch.linspace(0, 255, 32).round().long()]
    luminance = next(r for r in metrics.brightness_report(to_float(saved["samples"]), to_float(data))["rows"]
                     if r["quantity"] == "luminance")
    assert rows[0]["w1"] == pytest.approx(luminance["wasserstein"], rel=1e-9)
    assert rows[0]["std_ratio"] == pytest.approx(luminance["std_ratio"], rel=1e-9)
    assert rows[0]["mean"] == pytest.approx(float(to_float(saved["samples"]).mean()), abs=1e-6)
    # the eps-norm gap of lambda 1 comes from the same samples and scan
    assert all(math.isfinite(r["eps_norm_gap"]) for r in results.tables["eps"])


@needs_wheel
def test_quick_study_measures_the_leak_on_both_schedules(quick_study):
    """Part 3 on the standard (linear) and the leaky (scaled_linear) model: the schedules table and the findings
    state t0 and sqrt(alpha_bar) there (closed form of each schedule's betas); each model's leak row is compared
    with the same model from plain noise; a steering share is measured against the same seeds' leak-aware samples
    (the first n of the saved evaluation), not against all plain-noise samples."""
    out, results = quick_study
    betas = {"linear": torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64),
             "scaled_linear": torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2}
    rows = {r["model"]: r for r in results.tables["schedules"]}
    assert {model: r["schedule"] for model, r in rows.items()} == {"standard": "linear", "leaky": "scaled_linear"}
    report = (out / "report.md").read_text()
    for row in rows.values():  # 5 leading steps with offset 1 start at t0 = 801
        expected = float(torch.cumprod(1 - betas[row["schedule"]], 0)[801].sqrt())
        assert row["t0"] == 801 and row["sqrt_alpha_bar_t0"] == pytest.approx(expected, rel=1e-5)
        assert f"t0 = 801, where x_T keeps sqrt(alpha_bar) = {expected:.4f} of the image" in report
    assert [(r["model"], r["start"], r["beyond_2sd"]) for r in results.tables["leak"]][::2] == [
        ("standard", "plain noise", "baseline"), ("leaky", "plain noise", "baseline")]
    from safetensors.torch import load_file
    assert [(r["model"], r["steered_to"]) for r in results.tables["steering"]] == [
        ("standard", "dark"), ("standard", "bright"), ("leaky", "dark"), ("leaky", "bright")]
    for row in results.tables["steering"]:
        leak_aware = load_file(str(out / "eval" / f"{row['model']}_ddim_5_eps_1_signal_leak__dct_pixel.safetensors"))
        paired = float(to_float(leak_aware["samples"][:4]).mean())
        assert row["n"] == 4 and row["unsteered_mean"] == pytest.approx(paired, abs=1e-6)
        assert row["share"] == pytest.approx((row["samples_mean"] - paired) / (row["target_mean"] - paired))


@needs_wheel
def test_quick_study_tables_start_with_the_real_data_floor(quick_study):
    """The floor: 32 training images outside the 32-image reference (no test split beside synthetic data), chosen
    here by hand, their KID against the reference recomputed; every quality table of report.md starts with
    it, and the findings compare settings with it."""
    out, results = quick_study
    from safetensors.torch import load_file
    images = synthetic_brightness(256, 8, seed=0).images
    outside = sorted(set(range(256)) - set(torch.linspace(0, 255, 32).round().long().tolist()))
    held_out = images[[outside[i] for i in torch.linspace(0, len(outside) - 1, 32).round().long().tolist()]]
    saved = load_file(str(out / "eval" / "real_data.safetensors"))
    assert torch.equal(saved["samples"], held_out)
    kid = kernel_inception_distance(saved["features"], FidStatistics.load(results.reference["path"]).features)
    [floor] = results.tables["floor"]
    assert floor["n"] == 32 and floor["source"] == "synthetic: training images outside the reference"
    assert (floor["kid"], floor["kid_std"]) == pytest.approx(kid, rel=1e-9)
    report = (out / "report.md").read_text()
    for first_column in ("sampler", "eps_scale", "model"):
        assert f"| {first_column} |" in report
    assert report.count("| real data |") == 4  # samplers, eps, leak, fixes
    assert f"The floor: 32 held-out real images (synthetic: training images outside the reference) score KID " \
           f"{floor['kid']:.4f}" in report
    assert f"Against the real-data floor (KID {floor['kid']:.4f} of 32 held-out images)" in report


def test_the_floor_comes_from_the_test_folder_beside_the_data(tmp_path):
    """An image folder .../train with a sibling .../test: the floor's images are n test images spread over the
    split; without one, training images the reference does not hold."""
    for split, count in (("train", 6), ("test", 5)):
        (tmp_path / split / "a").mkdir(parents=True)
        for i in range(count):
            color = (40 * i, 10, 200 if split == "test" else 0)
            Image.new("RGB", (8, 8), color).save(tmp_path / split / "a" / f"{i}.png")
    config = QualityStudyConfig(out="unused", data=str(tmp_path / "train"), resolution=8, progress=False)
    test, source = study_module.load_test_split(config, 4)
    assert source == str(tmp_path / "test") and test.shape == (4, 3, 8, 8)
    assert test[:, 2].float().mean() == 200 and test[:, 0, 0, 0].tolist() == [0, 40, 120, 160]  # 4 of 5, spread
    shutil.rmtree(tmp_path / "test")
    assert study_module.load_test_split(config, 4) == (None, None)
    train = torch.arange(10).view(10, 1, 1, 1).to(torch.uint8)
    # a reference of 4 of 10 holds 0, 3, 6, 9; the floor takes 3 of the other 6 (1, 2, 4, 5, 7, 8) at positions
    # 0, 2.5 and 5 rounded half to even: 0, 2, 5
    assert fid_reference.held_out_images(train, 4, 3).flatten().tolist() == [1, 4, 8]
    assert fid_reference.held_out_images(train, 4, 3, test_images=train[:2] + 100).flatten().tolist() == [100, 101]


@needs_wheel
def test_unet_from_runs_parts_1_to_3_on_an_exported_run(quick_study, tmp_path, monkeypatch):
    """--unet-from an export (`python -m analysis export`) of the quick study's standard model (10 steps): nothing
    trains, part 4 holds the base setting only and no tercile samples; the base setting's samples are what the
    export gives through load_model and the public sampling API."""
    from safetensors.torch import load_file
    from ldm_lite.export import export_diffusers
    from ldm_lite.runs import load_model
    out, _ = quick_study
    speed = {"device": "cpu", "batch": 8, "fp32_calls_per_second": 1e3, "autocast": "off", "processes": 1,
             "calls_per_second": 1e3, "inception_per_second": 1e2}  # the budget never binds: no need to measure
    monkeypatch.setattr(real, "measure_speed", lambda *args: dict(speed))
    exported = export_diffusers(out / "model_standard", tmp_path / "export")
    study_out = tmp_path / "study"
    results = run_study(QualityStudyConfig(out=str(study_out), **{
        **QUICK, "unconditional_samples": 8, "eps_scales": "1.0", "samples_per_class": 2, "exposure_images": 4,
        "unet_from": str(exported)}))
    assert not any(part.startswith("train") for part in results.timings) and not list(study_out.glob("model_*"))
    assert [r["model"] for r in results.tables["fixes"]] == ["standard"] and results.tables["terciles"] == []
    assert [(r["model"], r["start"]) for r in results.tables["leak"]] == [
        ("standard", "plain noise"), ("standard", "signal leak (dct+pixel)")]
    assert [r["model"] for r in results.tables["steering"]] == ["standard", "standard"]
    assert results.models[0]["training_noise"] == "trained elsewhere"
    loaded = load_model(exported)
    images = sample(loaded.unet, from_config(loaded.scheduler_config, "ddim"), 8, num_inference_steps=5,
                    class_labels=3, seed=0, progress=False)
    assert torch.equal(to_uint8(images.clamp(-1, 1)), load_file(str(study_out / "eval" / f"{BASE_KEY}.safetensors"))
                       ["samples"])
    with pytest.raises(ValueError, match="unet_from: '/nonexistent' does not exist"):
        QualityStudyConfig(out="unused", data="synthetic", unet_from="/nonexistent")


@needs_wheel
def test_quick_study_resumes_without_retraining_or_resampling(quick_study, monkeypatch):
    """A second run in the same folder loads the trained models and the evaluated settings (same rows); a changed
    setting is refused before anything runs."""
    out, results = quick_study

    def recomputed(*args, **kwargs):
        raise AssertionError("a resumed study recomputed an extra its first run saved")
    for name in ("tercile_rows", "steering_rows", "exposure_scan"):
        monkeypatch.setattr(real, name, recomputed)
    trained = json.loads((out / "trained.json").read_text())
    again = run_study(QualityStudyConfig(out=str(out), **QUICK))
    assert json.loads((out / "trained.json").read_text()) == trained
    assert "train standard + leaky" not in again.timings and "reference features" in again.timings
    for table in ("fixes", "terciles", "steering", "scan", "eps"):
        assert again.tables[table] == results.tables[table], table
    assert again.grids == results.grids and again.findings == results.findings
    report = (out / "report.md").read_text()
    assert "### 4. Fixes" in report and "| model | asked | n | data_mean | samples_mean | gap |" in report
    assert f"| ddim (x0 clipped) | 5 | clip_sample | {again.tables['samplers'][-1]['kid']:.4g} |" in report
    assert all(f"- {sentence}" in report for part in again.findings.values() for sentence in part)
    assert again.speed["observed_calls_per_second"] == again.speed["calls_per_second"]  # nothing sampled
    with pytest.raises(ValueError, match=r"other settings \(unconditional_samples\); pass --fresh"):
        run_study(QualityStudyConfig(out=str(out), **{**QUICK, "unconditional_samples": 48}))


@needs_wheel
def test_torchrun_study_shares_sampling_and_features(quick_study, tmp_path):
    """`torchrun --nproc_per_node 2 -m analysis study` on a copy of the quick study's trained models (so nothing
    trains): each rank draws its block of every setting's samples, from their own generators, and computes their
    features; rank 0 gets one process's samples (within one uint8 level: CPU kernels round by batch size), features
    and rows. The other rank prints nothing."""
    out, results = quick_study
    two = tmp_path / "two"
    shutil.copytree(out, two, ignore=shutil.ignore_patterns("eval", "choices.json", "report.*", "results.json",
                                                           "study.json"))
    fewer = {**QUICK, "samplers": "ddim", "eps_scales": "1.0"}  # fewer settings: the sharing is what is tested
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in fewer.items() if name != "progress"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "analysis",
               "study", *flags, "--no-progress", "--no-quadratic-ddim", "--out", str(two)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("report: ") == 1
    again = json.loads((two / "results.json").read_text())
    assert again["speed"]["processes"] == 2 and "train standard + leaky" not in again["timings"]
    from safetensors.torch import load_file
    paths = sorted((two / "eval").glob("*.safetensors"))
    assert len(paths) == 6  # the base setting, unclipped DDIM, the leaky model, the leak on both and the floor
    for path in paths:
        one, shared = load_file(str(path)), load_file(str(two / "eval" / path.name))
        same = (one["samples"] == shared["samples"]).all(dim=(1, 2, 3))
        assert (one["samples"].int() - shared["samples"].int()).abs().max() <= 1, path.name
        assert same.float().mean() > 0.9, path.name  # one uint8 level here and there, not everywhere
        assert torch.allclose(one["features"][same], shared["features"][same], atol=1e-4), path.name
    for table in ("fixes", "leak", "terciles"):
        assert len(again["tables"][table]) == len(results.tables[table]) > 0, table
    assert [row["eps_scale"] for row in again["tables"]["eps"]] == [1.0]
    for table in ("fixes", "leak", "eps"):
        expected = {(row.get("model"), row.get("start"), row.get("eps_scale")): row for row in results.tables[table]}
        for row in again["tables"][table]:
            key = (row.get("model"), row.get("start"), row.get("eps_scale"))
            assert row["fid"] == pytest.approx(expected[key]["fid"], rel=1e-3), table
    for row, expected in zip(again["tables"]["terciles"], results.tables["terciles"]):
        assert row["samples_mean"] == pytest.approx(expected["samples_mean"], abs=1e-3)
    # rank 0 failing (a changed setting, refused) ends both processes with its one-line error, without a hang
    refused = subprocess.run([*command, "--seed=1"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert refused.returncode != 0 and "holds a study made with other settings (seed)" in refused.stderr
