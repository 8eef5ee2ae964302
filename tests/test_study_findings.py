"""The real-image study's findings follow the numbers (fabricated rows change the sentences), its command line
refuses bad input in one line, and --precision auto is one choice for every model, kept on resume."""
import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from ldm_lite import study as study_module
from ldm_lite.study import (QualityStudyConfig, change_findings, eps_findings, quality_tables, sampler_findings,
                            study_parts)
from study_quick_settings import table_row

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quality_findings_follow_the_numbers():
    samplers = [table_row(0.050, sampler="ddim", level=10, nfe=10),
                table_row(0.047, sampler="unipc", level=10, nfe=10),
                table_row(0.030, sampler="ddim", level=50, nfe=50),
                table_row(0.0295, sampler="unipc", level=50, nfe=50)]
    found = sampler_findings(samplers)
    assert found[0] == ("At about 10 model calls, unipc has the lowest KID (0.0470 ± 0.0010, FID 4.70); its lead over "
                        "ddim (KID 0.0500) is beyond two standard deviations.")
    assert found[1].endswith("its lead over ddim (KID 0.0300) is within two standard deviations.")
    assert found[2] == ("ddim: FID 5.00 at 10 model calls, 3.00 at 50; the KID change (-0.0200) is beyond two "
                        "standard deviations.")
    eps = [table_row(0.040, eps_scale=1.0, eps_norm_gap=0.05), table_row(0.035, eps_scale=1.01, eps_norm_gap=0.02),
           table_row(0.039, eps_scale=1.02, eps_norm_gap=0.01)]
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
    fixes = [table_row(0.040, model="standard", beyond_2sd="baseline"), table_row(0.0405, w1=0.05, model="offset"),
             table_row(0.030, w1=0.05, model="ip"), table_row(0.030, w1=0.099, model="zero_snr"),
             table_row(0.0401, model="x")]
    verdicts = [s.split(": ")[1].split(" at n")[0] for s in change_findings(fixes, lambda r: r["model"])]
    assert verdicts == ["changes brightness only", "changes brightness and quality",
                        "changes quality, not brightness", "changes neither quality nor brightness measurably"]
    assert "(KID 0.0400 -> 0.0300, lower, beyond two standard deviations; luminance W1 0.100 -> 0.050, closer to the " \
           "data, beyond two bootstrap standard deviations" in change_findings(fixes, lambda r: r["model"])[1]


def test_picks_at_the_grid_edge_are_not_called_agreement():
    """Both picks on the same lambda at the grid's edge (above 1, then below it) is stated as such, not as
    agreement; inside the grid the same picks agree."""
    eps = [table_row(0.040, eps_scale=0.99), table_row(0.039, eps_scale=1.0), table_row(0.035, eps_scale=1.01)]
    scan = [dict(eps_scale=r["eps_scale"], eps_norm_gap=g) for r, g in zip(eps, (0.05, 0.03, 0.01))]
    assert eps_findings(eps, scan)[0] == (
        "FID picks lambda = 1.01, the grid's largest (FID 3.50); the exposure metric (eps-norm along sampling closest "
        "to the forward eps-norm) picks lambda = 1.01, the grid's largest (gap 0.0100): they pick the same lambda, "
        "but at the grid's edge, which is not agreement: the optimum may lie beyond the grid.")
    eps[0]["fid"], scan[0]["eps_norm_gap"] = 3.0, 0.001
    assert eps_findings(eps, scan)[0].startswith("FID picks lambda = 0.99, the grid's smallest (FID 3.00)")
    assert "picks lambda = 0.99, the grid's smallest (gap 0.0010): they pick the same lambda, but at the grid's " \
           "edge, which is not agreement" in eps_findings(eps, scan)[0]
    wider = eps + [table_row(0.050, eps_scale=1.02)]
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
    eps = [table_row(0.040, eps_scale=1.0), table_row(0.035, eps_scale=1.01, steps=20),
           table_row(0.030, eps_scale=1.01, eps_slope=0.001, steps=20)]
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
    samplers = [table_row(0.050, sampler="ddim", nfe=20, level=20, std_ratio=2.5),
                table_row(0.0495, sampler="ddim (x0 clipped)", x0_clipping="clip_sample", nfe=20, level=20, w1=0.05),
                table_row(0.047, sampler="ddim (quadratic spacing)", nfe=20, level=20)]
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


def test_compile_auto_is_one_choice_for_all_the_study_models_and_kept_on_resume(tmp_path, monkeypatch, capsys):
    """--compile auto resolves once per study: off without measuring when each model trains under 10 minutes,
    else measured (a failing compiler reads as off), and on resume what the models stored (older bools too)."""
    from ldm_lite.study import training as study_training
    from ldm_lite.study.config import QualityStudyConfig
    config = QualityStudyConfig(data="synthetic", out=str(tmp_path), precision="bf16", compile="auto")
    measured = []

    def gain(model, shape, batch, device, dtype):
        measured.append((shape, batch, dtype))
        value = next(gains)
        if isinstance(value, Exception):
            raise value
        return value

    gains = iter([1.3, 1.05, RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore"), 1.3])
    monkeypatch.setattr(study_training.compile_choice, "training_gain", gain)
    names = ["standard", "offset"]
    assert study_training.shared_compile(config, names, 3, "cpu", 9.9).compile == "off" and not measured
    assert "each model trains 9.9 min, less than the 10 that repay compiling" in capsys.readouterr().out
    assert study_training.shared_compile(config, names, 3, "cpu", 40.0).compile == "on"
    assert measured == [((3, 32, 32), 32, torch.bfloat16)]   # the study's model, batch and precision
    assert study_training.shared_compile(config, names, 3, "cpu", 40.0).compile == "off"
    assert study_training.shared_compile(config, names, 3, "cpu", 40.0).compile == "off"
    assert "--compile auto: off (compiling failed: RuntimeError: InvalidCxxCompiler: No working C++ compiler found" \
           in capsys.readouterr().out
    (tmp_path / "model_offset").mkdir()
    (tmp_path / "model_offset" / "checkpoint.pt").write_bytes(b"")
    for stored, expected in [("off", "off"), (True, "on"), (False, "off")]:
        monkeypatch.setattr(study_training, "load_checkpoint", lambda path, v=stored: {"config": {"train": {
            "compile": v}}})
        assert study_training.shared_compile(config, names, 3, "cpu", 40.0).compile == expected   # not measured
    assert len(measured) == 3
    fresh = dataclasses.replace(config, fresh=True)
    assert study_training.shared_compile(fresh, names, 3, "cpu", 40.0).compile == "on"   # --fresh measures again
    told = dataclasses.replace(config, compile="off")
    assert study_training.shared_compile(told, names, 3, "cpu", 40.0) is told
