"""`python -m analysis fid --samples DIR_OR_NPZ --ref ref.safetensors|DIR|cifar10:ROOT [--kid]`: FID (and KID) of
samples against reference statistics (from `python -m analysis fid-stats`) or a dataset read on the spot.
Prints one table row and writes it as CSV: fid, kid_mean, kid_std, precision, recall, n_samples, n_reference,
seconds.
FID is biased upward at small n: compare FIDs only at equal sample counts (docs/quality.md)."""
import time

from ldm_lite.checks import output_file
from ldm_lite.metrics import format_table
from ldm_lite.plots import write_csv
from ldm_lite.quality import FidStatistics, load_images, quality_report, statistics_of

from ldm_lite.cli.analysis.common import add_samples_argument, load_samples
from ldm_lite.cli.analysis.fid_stats import DATA_HELP, add_data_options


def add_arguments(parser):
    add_samples_argument(parser)
    parser.add_argument("--ref", required=True, help=f"reference: a .safetensors file from fid-stats, or {DATA_HELP}")
    parser.add_argument("--kid", action="store_true", help="also KID: mean and std of the unbiased MMD^2 over 100 "
                        "subsets of min(1000, n/2) images (needs the features, which fid-stats keeps)")
    parser.add_argument("--precision-recall", action="store_true", help="also improved precision and recall "
                        "(Kynkaanniemi et al. 2019, k = 3; needs the features)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the KID subsets")
    parser.add_argument("--out", default="runs/analysis/fid/fid.csv", help="CSV file to write")
    add_data_options(parser)


def run(args):
    started = time.perf_counter()
    out = output_file(args.out)
    # the reference is read (statistics) or loaded (images) before minutes go into the samples' features
    reference = FidStatistics.load(args.ref) if args.ref.endswith(".safetensors") else None
    if reference is not None:
        reference.check_comparable()
    else:
        images, held = load_images(args.ref, args.max_images, args.resolution)
    samples = statistics_of(load_samples(args.samples), batch_size=args.batch_size, device=args.device,
                            source=args.samples)
    if reference is None:
        reference = statistics_of(images, batch_size=args.batch_size, device=args.device, source=args.ref,
                                  source_images=held)
    row = quality_report(samples, reference, kid=args.kid, with_precision_recall=args.precision_recall,
                         seconds=time.perf_counter() - started, seed=args.seed)
    print(f"samples {args.samples} vs reference {reference.source or args.ref}:")
    print(format_table([row]))
    print(f"wrote {write_csv([row], out)}")
