"""The bias study (make demo) end to end at a reduced size, bounded by training steps (not the clock): the report
has every section, its tables hold what the models produce (re-drawn here through the public API) and what closed
forms give, and every stated finding follows the numbers (fabricated results change the sentences); results.json
keeps its layout and older files still load."""
import copy
import html
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm_lite.data import synthetic_brightness, to_float
from ldm_lite.models import load_unet
from ldm_lite.runs import run_config
from ldm_lite.sampling import sample
from ldm_lite.schedulers import from_config
from ldm_lite.study import (FORMAT_VERSION, QualityResults, StudyConfig, band_findings, eps_findings,
                            format_quality_results, format_results, leak_findings, load_results, offset_findings,
                            run_study, save_results, write_report)

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
