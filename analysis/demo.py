"""`python -m analysis demo`: the one-command bias study (see ldm_lite/study.py)."""

from ldm_lite.study import StudyConfig, format_results, run_study


def add_arguments(parser):
    defaults = StudyConfig()
    parser.add_argument("--data", default=defaults.data,
                        help="'synthetic' (embedded, default), 'cifar10:ROOT' or an image folder; labels are "
                             "brightness terciles")
    parser.add_argument("--minutes", type=float, default=defaults.minutes, help="time budget of the whole study")
    parser.add_argument("--out", default=defaults.out)
    parser.add_argument("--resolution", type=int, default=defaults.resolution)
    parser.add_argument("--train-steps", type=int, default=defaults.train_steps, help="steps per model")
    parser.add_argument("--samples-per-class", type=int, default=defaults.samples_per_class)
    parser.add_argument("--unconditional-samples", type=int, default=defaults.unconditional_samples)
    parser.add_argument("--sample-steps", type=int, default=defaults.sample_steps)
    parser.add_argument("--max-images", type=int, default=defaults.max_images, help="image folders: first N only")
    parser.add_argument("--no-zero-snr", action="store_true", help="skip the optional zero-SNR model")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def run(args):
    config = StudyConfig(out=args.out, data=args.data, resolution=args.resolution, train_steps=args.train_steps,
                         minutes=args.minutes, samples_per_class=args.samples_per_class,
                         unconditional_samples=args.unconditional_samples, sample_steps=args.sample_steps,
                         max_images=args.max_images, zero_snr_model=not args.no_zero_snr, seed=args.seed)
    results = run_study(config)
    print(format_results(results))
    print(f"\nreport: {config.out}/report.html ({results['total_seconds'] / 60:.1f} minutes)")
    return 0
