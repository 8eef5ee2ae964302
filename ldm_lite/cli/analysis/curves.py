"""`python -m analysis curves RUN [RUN ...] --out DIR`: the KID / FID logged while training (run.eval_every),
against training minutes and images seen, one line per run: curves.png, curves.csv and a table."""
from pathlib import Path

from ldm_lite.plots import plot_training_curves, write_csv
from ldm_lite.training_eval import read_eval_rows

COLUMNS = ("run", "step", "images_seen", "train_minutes", "kid", "kid_std", "fid", "n", "w1", "std_ratio",
           "tercile_share")


def add_arguments(parser):
    parser.add_argument("runs", nargs="+", help="training run folders (trained with --run.eval_every=N)")
    parser.add_argument("--out", default="runs/curves", help="output folder for curves.png and curves.csv")


def run(args):
    curves = {str(run): read_eval_rows(run) for run in args.runs}
    rows = [{"run": label, **{k: r.get(k) for k in COLUMNS[1:]}} for label, runs in curves.items() for r in runs]
    out = Path(args.out)
    figure = plot_training_curves(curves, out / "curves.png")
    table = write_csv(rows, out / "curves.csv")
    print(format_curve_table(rows))
    print(f"wrote {figure} and {table}")


def format_curve_table(rows: list) -> str:
    """Plain-text table of evaluation rows (one per run and step)."""
    lines = [f"{'run':<28} {'step':>7} {'minutes':>8} {'images':>9} {'KID':>17} {'FID':>8} {'n':>5} "
             f"{'std ratio':>9} {'tercile':>7}"]
    for r in rows:
        share = r.get("tercile_share")
        lines.append(f"{str(r['run'])[-28:]:<28} {r['step']:>7} {r['train_minutes']:>8.1f} {r['images_seen']:>9} "
                     f"{r['kid']:>8.4f} +-{r['kid_std']:.4f} {r['fid']:>8.2f} {r['n']:>5} {r['std_ratio']:>9.2f} "
                     f"{'' if share is None else format(share, '.0%'):>7}")
    return "\n".join(lines)
