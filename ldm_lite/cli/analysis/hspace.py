"""`python -m analysis hspace --ckpt RUN_OR_FOLDER --out DIR`: PCA of the UNet middle-block output h over many
sampled seeds (Haas et al. 2024, arXiv:2310.09912) and a grid of edits along the principal directions (Kwon et al.
2023, arXiv:2210.10960): rows are components, columns scales in standard deviations, with the same x_T and
noises in every cell (hspace_grid.png). Also hspace_pca.csv / hspace_explained.png (explained variance) and
hspace_pca.pt (the directions)."""
from pathlib import Path

import torch

from ldm_lite import hspace
from ldm_lite.checks import output_folder
from ldm_lite.metrics import format_table
from ldm_lite.plots import plot_edit_grid, plot_pca_explained, write_csv

from ldm_lite.cli.analysis.common import add_model_arguments, load_model_and_scheduler, parse_floats, positive


def add_arguments(parser):
    add_model_arguments(parser, steps=20)
    parser.add_argument("--num-samples", type=int, default=64, help="samples whose h feed the PCA (default 64)")
    parser.add_argument("--components", type=int, default=3, help="principal components shown (default 3)")
    parser.add_argument("--scales", default="-2,-1,0,1,2", help="edit scales in standard deviations, written "
                        "with '=' when the first is negative: --scales=-2,-1,0,1,2 (the default)")
    parser.add_argument("--edit-steps", default=None, help="sampling steps that get the edit: 'all', START:STOP "
                        "(step indices, 0 = noisiest) or a comma list (default: the first half)")
    parser.add_argument("--per-timestep", action="store_true", help="edit along one PCA per timestep instead of "
                        "the joint PCA over all timesteps (each sample's h at every step concatenated)")
    parser.add_argument("--grid-samples", type=int, default=2, help="images per grid row (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the PCA samples and of the grid (default 0)")
    parser.add_argument("--out", default="runs/analysis/hspace", help="output folder")


def parse_steps(text: str | None, num_steps: int) -> list:
    """Step indices from 'all', 'START:STOP' (0 <= START < STOP <= num_steps) or 'I,J,...'; default: the first half."""
    if text is None:
        return list(range(max(num_steps // 2, 1)))
    if text == "all":
        return list(range(num_steps))
    try:
        if ":" in text:
            start, stop = (int(v) if v.strip() else default for v, default in zip(text.split(":", 1), (0, num_steps)))
            indices = list(range(start, stop)) if 0 <= start < stop <= num_steps else []
        else:
            indices = [int(v) for v in text.split(",")]
    except ValueError:
        indices = []
    if not indices or not all(0 <= i < num_steps for i in indices):
        raise ValueError(f"--edit-steps must be 'all', START:STOP or a comma list of step indices within "
                         f"[0, {num_steps}) (--steps {num_steps}), got {text!r}")
    return indices


def run(args):
    out = output_folder(args.out)
    scales = parse_floats(args.scales, "--scales")
    for value, name, minimum in ((args.num_samples, "--num-samples", 2), (args.components, "--components", 1),
                                 (args.grid_samples, "--grid-samples", 1)):
        positive(value, name, minimum)
    if args.components > args.num_samples:
        raise ValueError(f"--components ({args.components}) must not exceed --num-samples ({args.num_samples})")
    loaded, scheduler = load_model_and_scheduler(args)
    if loaded.vae is not None:
        raise ValueError("hspace supports pixel-space models only (this checkpoint has a VAE)")
    edit_timesteps = [int(scheduler.timesteps[i]) for i in parse_steps(args.edit_steps, args.steps)]
    captured = hspace.capture_h(loaded.unet, scheduler, args.num_samples, batch_size=args.batch_size,
                                seed=args.seed)
    joint = hspace.pca_all_timesteps(captured, args.components)
    per_timestep = hspace.pca_per_timestep(captured, args.components)
    x_T = torch.randn(args.grid_samples, *captured["samples"].shape[1:],
                      generator=torch.Generator().manual_seed(args.seed + 1))
    components = list(range(args.components))
    grid = hspace.edit_grid(loaded.unet, scheduler, per_timestep if args.per_timestep else joint, components,
                            scales, x_T, timesteps=edit_timesteps, seed=args.seed + 2, batch_size=args.batch_size)
    files = write_outputs(out, grid, joint, per_timestep, components, scales)
    print(f"h {tuple(captured['h'].shape[2:])} at {len(captured['timesteps'])} timesteps x {args.num_samples} "
          f"samples; edits ({'per-timestep' if args.per_timestep else 'joint'} PCA) at timesteps "
          f"{edit_timesteps[0]}..{edit_timesteps[-1]}")
    print(format_table(summary_rows(grid, joint, components, scales)))
    print(f"wrote {', '.join(f.name for f in files)} to {args.out}")


def write_outputs(out: Path, grid, joint, per_timestep: dict, components: list, scales: list) -> list:
    """hspace_grid.png, hspace_explained.png (joint PCA and ~4 timesteps), hspace_pca.csv, hspace_pca.pt."""
    out.mkdir(parents=True, exist_ok=True)
    pcas = {"joint": joint, **{f"t={t}": p for t, p in per_timestep.items()}}
    rows = [dict(pca=label, component=k, explained=float(p.explained[k]), std=float(p.std[k]))
            for label, p in pcas.items() for k in components]
    shown = list(pcas)[:1] + list(pcas)[1::max(len(per_timestep) // 4, 1)]
    torch.save({"joint": _fields(joint), "per_timestep": {t: _fields(p) for t, p in per_timestep.items()}},
               out / "hspace_pca.pt")
    return [plot_edit_grid(grid, out / "hspace_grid.png", components, scales),
            plot_pca_explained({label: pcas[label].explained for label in shown}, out / "hspace_explained.png"),
            write_csv(rows, out / "hspace_pca.csv"), out / "hspace_pca.pt"]


def summary_rows(grid, joint, components: list, scales: list) -> list:
    """Per component: explained variance, std and the mean |edited - unedited| pixel change at each scale."""
    rows = []
    for k in components:
        row = dict(component=f"PC {k}", explained=float(joint.explained[k]), std=float(joint.std[k]))
        if 0 in scales:
            unedited = grid[k, scales.index(0)]
            row.update({f"change at {s:+g}": float((grid[k, j] - unedited).abs().mean())
                        for j, s in enumerate(scales) if s != 0})
        rows.append(row)
    return rows


def _fields(p) -> dict:
    return {"mean": p.mean, "directions": p.directions, "std": p.std, "explained": p.explained, "shape": p.shape,
            "timesteps": p.timesteps}
