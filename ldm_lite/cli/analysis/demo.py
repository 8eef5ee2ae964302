"""`python -m analysis demo`: the one-command bias study (ldm_lite/study/demo.py); flags from `StudyConfig`."""
from ldm_lite.checks import output_folder
from ldm_lite.cli.options import add_dataclass_arguments, dataclass_from_args
from ldm_lite.study import StudyConfig, format_results, run_study


def add_arguments(parser):
    add_dataclass_arguments(parser, StudyConfig)


def run(args):
    config = dataclass_from_args(StudyConfig, args)
    output_folder(config.out)
    results = run_study(config)
    print(format_results(results))
    print(f"\nreport: {config.out}/report.html ({results.total_seconds / 60:.1f} minutes)")
    return 0
