"""`python -m analysis study --data PATH|cifar10:ROOT --minutes M`: the bias study on real images, with FID and KID
beside the bias metrics (ldm_lite/study.py, the same pipeline and report as `demo`); flags from
`QualityStudyConfig`. `torchrun --nproc_per_node N -m analysis study ...` splits its sampling and Inception features
over N processes."""
from ldm_lite.checks import output_folder
from ldm_lite.cli.options import add_dataclass_arguments, dataclass_from_args
from ldm_lite.study import QualityStudyConfig, format_results, run_study

# demo fields the study does not use: part 4 always trains the fixes named by --fixes
SKIPPED = ("zero_snr_model",)


def add_arguments(parser):
    add_dataclass_arguments(parser, QualityStudyConfig, skip=SKIPPED)


def run(args):
    config = dataclass_from_args(QualityStudyConfig, args)
    output_folder(config.out)
    results = run_study(config)
    if results is None:  # a torchrun rank other than 0: it sampled its shares; rank 0 reports
        return 0
    print(format_results(results))
    print(f"\nreport: {config.out}/report.html ({results.total_seconds / 60:.1f} minutes)")
    return 0
