"""`python -m analysis brightness --samples DIR_OR_NPZ --data synthetic|cifar10:ROOT|FOLDER --out DIR`: per-image
brightness (per channel and luminance) of samples vs data: W1 distance, KS statistic, std ratio (below 1:
squeezed toward mid-grey), a histogram overlay (brightness.png) and brightness.csv.

Also home of the --samples loader shared with the spectrum command.
"""
from ldm_lite.checks import output_folder
from ldm_lite.metrics import brightness_report, format_table
from ldm_lite.plots import plot_brightness, write_csv

from ldm_lite.cli.analysis.common import add_comparison_arguments, load_pair

def add_arguments(parser):
    add_comparison_arguments(parser, "runs/analysis/brightness")


def run(args):
    out = output_folder(args.out)
    samples, data = load_pair(args)
    report = brightness_report(samples, data)
    figure = plot_brightness(report, out / "brightness.png")
    table = write_csv(report["rows"], out / "brightness.csv")
    print(f"per-image brightness, {len(samples)} samples vs {len(data)} data images ({args.data}):")
    print(format_table(report["rows"]))
    print(f"wrote {figure.name}, {table.name} to {out}")
