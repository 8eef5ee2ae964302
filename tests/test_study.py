"""The bias study (make demo) end to end at a reduced size: every section of the report is produced from
measured numbers, and the command-line entry handles bad input with one error line."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from ldm_lite.study import StudyConfig, run_study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    config = StudyConfig(out=str(out), resolution=8, train_steps=40, batch_size=32, minutes=1.5,
                         samples_per_class=8, unconditional_samples=32, sample_steps=10, synthetic_size=512,
                         progress=False)
    return out, run_study(config)


def test_report_has_every_section(study):
    out, results = study
    page = (out / "report.html").read_text()
    for title in ("Summary", "1. How the forward process destroys each DCT band", "2. Offset noise",
                  "3. Signal leak", "Settings"):
        assert title in page
    assert results["figures"]["summary"] == "summary.png" and (out / "summary.png").stat().st_size > 10_000
    assert "src='summary.png'" in page
    # grids of 8x8 samples are upscaled 6x: 16 per row, 6 * 8 pixels each plus 2-pixel gaps
    assert Image.open(out / "grid_standard_plain_noise.png").size[0] == 16 * (6 * 8 + 2) + 2
    for figure in list(results["figures"]["bands"].values()) + list(results["grids"].values()):
        assert (out / figure).is_file(), figure
        assert f"src='{figure}'" in page
    assert "<table>" in page and "Total run time" in page


def test_results_are_measured(study):
    out, results = study
    offset_rows = results["tables"]["offset_noise"]
    assert {(r["model"], r["asked"]) for r in offset_rows} >= {(m, c) for m in ("standard", "offset")
                                                                for c in ("dark", "mid", "bright")}
    # data class means of the embedded set: dark about -0.6, bright about +0.6 (labels are brightness terciles)
    dark = next(r for r in offset_rows if r["asked"] == "dark")
    bright = next(r for r in offset_rows if r["asked"] == "bright")
    assert dark["data_mean"] < -0.4 < 0.4 < bright["data_mean"]
    for row in offset_rows:
        assert -1.0 <= row["samples_mean"] <= 1.0 and row["n"] == 8 and row["steps"] >= 1
    leak_rows = {(r["model"], r["initial_noise"]): r for r in results["tables"]["signal_leak"]}
    plain, leaky = leak_rows["standard", "plain noise"], leak_rows["standard", "signal leak (dct+pixel)"]
    # 10 leading steps with offset 1 start at t0 = 901, where scaled_linear keeps sqrt(alpha_bar) = 0.118
    assert plain["t0"] == leaky["t0"] == 901 and plain["sqrt_alpha_bar_t0"] == pytest.approx(0.1183, abs=1e-4)
    assert plain["wasserstein"] != leaky["wasserstein"]  # same seed, only the initial noise differs
    saved = json.loads((out / "results.json").read_text())
    assert saved["tables"]["signal_leak"][0]["std_ratio"] == pytest.approx(results["tables"]["signal_leak"][0]["std_ratio"])
    assert [row["model"] for row in saved["tables"]["offset_noise"]] == [row["model"] for row in offset_rows]
    assert results["band_correlation_max_error"] < 0.2


def test_demo_cli_rejects_bad_input(tmp_path):
    result = subprocess.run([sys.executable, "-m", "analysis", "demo", "--minutes", "0", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: minutes must be > 0, got 0.0"]
