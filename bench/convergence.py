"""Quality per CPU-minute: train training recipes side by side for a fixed budget and compare their KID / FID.

    .venv/bin/python bench/convergence.py --minutes 15 --recipes baseline,bf16,power_ema
    .venv/bin/python bench/convergence.py --minutes 45 --samples 1000 --recipes baseline,best --seeds 0,1

Every recipe trains the study's standard model (brightness-tercile classes, 10 % null labels, epsilon, linear
schedule) on ../shared/data/cifar10-jpeg/train at 32 x 32, in its own process on one thread, `--jobs` at a time,
and logs KID / FID of its EMA model against the training data's cached reference (run.eval_every, and always at
the end). The budget counts each process's CPU time by default (train.budget_clock = cpu): on one thread that is
the wall time of a quiet machine, and a busy machine does not shorten a run's compute. Evaluation time is not
charged to it.

Also printed: the real-data floor, n held-out images (the test split) scored against the same reference at the
same n; FID at small n is biased upward, so no model can be expected below it.

Runs train through `ldm_lite.processes.train_in_processes` (children that never import this script). Resumable:
a finished (recipe, seed) is skipped, an interrupted one resumes from its checkpoint with the rest of its budget. The settings that make runs comparable (budget, n, reference, evaluation precision) are stored in
OUT/settings.json, and a resumed comparison must use the same.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_lite import bf16_choice, fid_reference, runs  # noqa: E402
from ldm_lite.cli.analysis.curves import format_curve_table  # noqa: E402
from ldm_lite.config_io import config_from_dict  # noqa: E402
from ldm_lite.data import brightness_terciles, list_images, load_dataset  # noqa: E402
from ldm_lite.models import UNet, unet_preset  # noqa: E402
from ldm_lite.models.inception import load_fid_inception  # noqa: E402
from ldm_lite.plots import plot_training_curves, write_csv  # noqa: E402
from ldm_lite.processes import PROCESS_RECORD, train_in_processes  # noqa: E402
from ldm_lite.quality import FidStatistics, inception_features, quality_report  # noqa: E402
from ldm_lite.training_eval import read_eval_rows  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg"

# The study's standard model when the search began (eager: torch.compile is the "compile" recipe); every other
# recipe changes the named keys only.
BASELINE = {
    "model": {"preset": "tiny", "class_conditional": True, "null_label_prob": 0.1},
    "diffusion": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": "epsilon"},
    "train": {"batch_size": 64, "lr": 1e-3, "warmup_steps": 100, "ema_decay": 0.999, "precision": "fp32",
              "compile": "off", "steps": 1_000_000, "num_threads": 1},
}
RECIPES = {
    "baseline": {},
    "bf16": {"train.precision": "bf16"},
    "power_ema": {"train.ema_kind": "power"},
    "beta2_099": {"train.adam_beta2": 0.99},
    "min_snr": {"diffusion.min_snr": True},
    "lognormal_t": {"diffusion.timestep_sampling": "lognormal"},
    "cosine_lr": {"train.lr_schedule": "cosine"},
    "lr_2e-3": {"train.lr": 2e-3},
    "lr_5e-4": {"train.lr": 5e-4},
    "batch_32": {"train.batch_size": 32},
    "wide": {"model.base_channels": 64},
    "small_depth1": {"model.preset": "small", "model.num_res_blocks": 1},
    "input_perturbation": {"noise.input_perturbation": True},
    "compile": {"train.compile": "auto"},   # torch.compile where the run's first steps measure it faster
}


def recipe_overrides(spec: str) -> dict:
    """A named recipe, or names joined by '+' (their overrides combined, later names winning)."""
    overrides = {}
    for name in spec.split("+"):
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)} (combine with '+')")
        overrides.update(RECIPES[name])
    return overrides


def recipe_tree(spec: str, data: str) -> dict:
    """The config tree of recipe `spec` on `data` at 32 px (brightness-tercile labels), without run settings."""
    tree = json.loads(json.dumps(BASELINE))
    tree["data"] = {"source": data, "resolution": 32, "labels": "brightness"}
    for dotted, value in recipe_overrides(spec).items():
        section, key = dotted.split(".")
        tree.setdefault(section, {})[key] = value
    return tree


def recipe_config(spec: str, seed: int, args, autocast: str):
    tree = recipe_tree(spec, str(args.data))
    tree["train"].update(seed=seed, max_minutes=args.minutes, budget_clock=args.clock)
    tree["run"] = {"out": str(Path(args.out) / f"{spec}_seed{seed}"), "log_every": 25, "checkpoint_every": 250,
                   "progress": False, "eval_every": args.eval_every or 10 ** 9, "eval_samples": args.samples,
                   "eval_reference_images": args.reference_images, "eval_autocast": autocast,
                   "eval_cache": str(Path(args.out) / "cache")}
    return config_from_dict(tree)


def training_data(args):
    """The training images exactly as every run loads them (so the reference cache is shared)."""
    return brightness_terciles(load_dataset(str(args.data), 32, progress=False))


def real_data_floor(args, network) -> dict:
    """n test images (spread evenly over the split) scored against the cached reference of the training data
    (computed here once, on every thread, before any run starts; the runs read it at their first evaluation)."""
    floor_file = Path(args.out) / f"floor_n{args.samples}.json"
    if floor_file.is_file():
        return json.loads(floor_file.read_text())
    features = lambda x: inception_features(x, network=network, progress=True)  # noqa: E731
    images = fid_reference.reference_images(training_data(args).images, args.reference_images)
    path = fid_reference.reference_path(images, str(Path(args.out) / "cache"))
    reference = fid_reference.reference_statistics(path, images, features, f"{args.data}: {len(images)} images")
    held_out = fid_reference.reference_images(load_dataset(str(args.test), 32, progress=False).images, args.samples)
    row = quality_report(FidStatistics.from_features(features(held_out)), reference, kid=True)
    floor = {"kid": row["kid_mean"], "kid_std": row["kid_std"], "fid": row["fid"], "n": row["n_samples"],
             "source": str(args.test)}
    runs.write_text(floor_file, json.dumps(floor))
    return floor


def comparison_settings(args) -> dict:
    """The settings every run of the comparison shares; OUT/settings.json keeps the first choice."""
    path = Path(args.out) / "settings.json"
    wanted = {"minutes": args.minutes, "samples": args.samples, "reference_images": args.reference_images,
              "clock": args.clock, "eval_every": args.eval_every, "data": str(args.data)}
    if path.is_file():
        stored = json.loads(path.read_text())
        differing = [k for k in wanted if stored.get(k) != wanted[k]]
        if differing:
            raise ValueError(f"{path} holds a comparison with other settings ({', '.join(differing)}); use "
                             f"another --out")
        return stored
    model = UNet(unet_preset("tiny", sample_size=32, num_classes=3)).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the training processes evaluate
    with torch.no_grad():
        gain = bf16_choice.sampling_gain(model, (3, 32, 32), torch.device("cpu"))
    torch.set_num_threads(threads)
    wanted["eval_autocast"] = "bf16" if bf16_choice.choose(gain) == "bf16" else "off"
    wanted["bf16_sampling_gain"] = gain
    path.parent.mkdir(parents=True, exist_ok=True)
    runs.write_text(path, json.dumps(wanted, indent=1))
    return wanted


def configs_to_train(jobs: list, args, settings: dict) -> dict:
    """{run name: Config} of the jobs not finished yet (a finished run has processes.PROCESS_RECORD, written when
    its process exits 0); an interrupted one resumes and trains what is left of train.max_minutes."""
    configs = {}
    for spec, seed in jobs:
        config = recipe_config(spec, seed, args, settings["eval_autocast"])
        if not (Path(config.run.out) / PROCESS_RECORD).is_file():
            configs[Path(config.run.out).name] = config
    print(f"to train ({args.minutes:g} min each): {', '.join(configs) or 'none'}", flush=True)
    return configs


def report(args, floor: dict) -> None:
    """Every run of the comparison folder (this invocation's and earlier ones'): curves.csv, curves.png,
    results.json, and report.md with each run's last evaluation beside the baseline's and the real-data floor."""
    out, curves = Path(args.out), {}
    for run_dir in sorted(p.parent for p in out.glob(f"*/{runs.METRICS_FILE}")):
        try:
            curves[run_dir.name] = read_eval_rows(run_dir)
        except ValueError:
            continue
    rows = [{"run": label, **r} for label, evals in curves.items() for r in evals]
    if rows:
        print(format_curve_table(rows))
        write_csv(rows, out / "curves.csv")
        plot_training_curves({**curves, None: floor}, out / "curves.png")
    (out / "results.json").write_text(json.dumps({"floor": floor, "curves": curves}, indent=1))
    (out / "report.md").write_text(final_table(curves, floor, args))
    print(f"real-data floor: {args.test} at n = {floor['n']}: KID {floor['kid']:.4f} +- {floor['kid_std']:.4f}, "
          f"FID {floor['fid']:.2f}")
    print(f"wrote {out / 'report.md'}, {out / 'curves.png'}, {out / 'curves.csv'} and {out / 'results.json'}")


def final_table(curves: dict, floor: dict, args) -> str:
    """Markdown: per run its last evaluation, KID / the baseline's (seed 0) and the KID difference in units of
    the two standard deviations combined (|z| > 2: beyond the subset noise)."""
    base = curves.get("baseline_seed0", [None])[-1]
    lines = [f"Budget {args.minutes:g} min of one thread ({args.clock} clock) per run; n = {floor['n']} samples; "
             f"real-data floor (held-out images, same n): KID {floor['kid']:.4f} +- {floor['kid_std']:.4f}, "
             f"FID {floor['fid']:.2f}.", "",
             "| run | steps | images seen | KID | FID | KID / baseline | z vs baseline | std ratio | tercile share |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, evals in curves.items():
        r = evals[-1]
        ratio = z = ""
        if base is not None:
            ratio = f"{r['kid'] / base['kid']:.2f}"
            z = f"{(r['kid'] - base['kid']) / math.hypot(r['kid_std'], base['kid_std']):+.1f}"
        share = r.get("tercile_share")
        lines.append(f"| {label} | {r['step']} | {r['images_seen']:,} | {r['kid']:.4f} +- {r['kid_std']:.4f} | "
                     f"{r['fid']:.2f} | {ratio} | {z} | {r['std_ratio']:.2f} | "
                     f"{'' if share is None or math.isnan(share) else format(share, '.0%')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--recipes", default="baseline,bf16", help="recipe names (combine with '+'): "
                        + ", ".join(RECIPES))
    parser.add_argument("--seeds", default="0", help="training seeds of every recipe")
    parser.add_argument("--extra", default="", help="more spec:seed jobs, e.g. baseline:1")
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget of each run")
    parser.add_argument("--clock", default="cpu", choices=("cpu", "wall"), help="what the budget counts")
    parser.add_argument("--samples", type=int, default=500, help="samples per evaluation (n)")
    parser.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: at the end only)")
    parser.add_argument("--reference-images", type=int, default=10_000, help="training images of the reference")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--data", type=Path, default=DATA / "train")
    parser.add_argument("--test", type=Path, default=DATA / "test", help="held-out images for the floor")
    parser.add_argument("--out", default=str(ROOT / "runs" / "convergence"))
    parser.add_argument("--report-only", action="store_true", help="tabulate the runs already in --out, train none")
    args = parser.parse_args(argv)
    for folder in (args.data, args.test):
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder")
    jobs = [(spec, int(seed)) for spec in args.recipes.split(",") for seed in args.seeds.split(",")]
    jobs += [(item.split(":")[0], int(item.split(":")[1])) for item in args.extra.split(",") if item]
    for spec, _ in jobs:
        recipe_overrides(spec)
    settings = comparison_settings(args)
    print(f"evaluation sampling precision: {settings['eval_autocast']} (bf16 gain {settings['bf16_sampling_gain']:.2f})")
    network = load_fid_inception("cpu")  # a missing FID wheel fails here, before any training
    if len(list_images(args.test)) < args.samples:
        parser.error(f"{args.test} holds fewer than --samples {args.samples} images")
    configs = {} if args.report_only else configs_to_train(jobs, args, settings)
    # The reference first, on every thread: runs whose first evaluation came before a reference computed beside
    # them each computed their own (the 45-minute confirmation lost an hour that way on 2 cores).
    floor = real_data_floor(args, network)
    train_in_processes(configs, progress=False, threads=1, processes=args.jobs)
    report(args, floor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
