"""The bias study: `python -m analysis demo` (make demo, minutes, synthetic data; `demo.py`) and its big sibling
`python -m analysis study` (real images, FID/KID; `real.py`), one pipeline of models, findings and report.

A reader finds each concern in its file: `config.py` the two configs; `plan.py` the settings, speed measurement and
budget plan; `training.py` the study's models (the FID reference: `ldm_lite.fid_reference`); `evaluate.py` one setting's
samples, features and row; `shards.py` torchrun sharding; `resume.py` what a resumed study reuses; `results.py` the
typed results and results.json; `findings.py` the sentences, chosen by the numbers; `report.py` HTML and markdown.
"""
from ldm_lite.study.config import CLASS_NAMES, FIXES, QualityStudyConfig, StudyConfig
from ldm_lite.study.demo import load_test_split, run_demo
from ldm_lite.study.evaluate import Evaluator, offset_training_noise
from ldm_lite.study.findings import (band_findings, change_findings, eps_findings, leak_findings, offset_findings,
                                     quality_findings, sampler_findings, steering_findings)
from ldm_lite.study.plan import (Clock, Plan, Setting, detectable_kid_difference, evaluation_seconds, extra_calls,
                                 extra_seconds, plan_study, run_order, sampler_steps, study_parts)
from ldm_lite.study.real import BIAS_COLUMNS, quality_tables, run_evaluations, run_quality_study
from ldm_lite.study.report import format_quality_results, format_results, write_report
from ldm_lite.study.results import FORMAT_VERSION, DemoResults, QualityResults, load_results, save_results
from ldm_lite.study.resume import check_study_settings, first_choices, record_choices, saved_extra
from ldm_lite.study.training import study_scheduler


def run_study(config: StudyConfig) -> DemoResults | QualityResults | None:
    """Run the demo, or the study for a `QualityStudyConfig`; returns the results (also written as results.json
    and report.html in config.out; None on a torchrun rank other than 0)."""
    if isinstance(config, QualityStudyConfig):
        return run_quality_study(config)
    return run_demo(config)
