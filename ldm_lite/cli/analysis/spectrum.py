"""`python -m analysis spectrum --samples DIR_OR_NPZ --data synthetic|cifar10:ROOT|FOLDER --out DIR`: radially
averaged DCT power spectrum of samples vs data (log-log, spectrum.png), the per-radius log10 ratio
(spectrum.csv) and the per-octave-band log10 ratio (spectrum_bands.csv, printed)."""

from ldm_lite.checks import output_folder
from ldm_lite.metrics import format_table, spectrum_report
from ldm_lite.plots import plot_spectrum, write_csv

from ldm_lite.cli.analysis.common import add_comparison_arguments, load_pair


def add_arguments(parser):
    add_comparison_arguments(parser, "runs/analysis/spectrum")


def run(args):
    out = output_folder(args.out)
    samples, data = load_pair(args)
    report = spectrum_report(samples, data)
    rows = [dict(k=int(k), samples_power=float(s), data_power=float(d), log10_ratio=float(r))
            for k, s, d, r in zip(report["radius"], report["samples"], report["data"], report["log10_ratio"])]
    files = [plot_spectrum(report, out / "spectrum.png"), write_csv(rows, out / "spectrum.csv"),
             write_csv(report["rows"], out / "spectrum_bands.csv")]
    print(f"power per octave band, {len(samples)} samples vs {len(data)} data images ({args.data}):")
    print(format_table(report["rows"]))
    print(f"wrote {', '.join(f.name for f in files)} to {out}")
