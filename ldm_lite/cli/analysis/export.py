"""`python -m analysis export RUN OUT`: write a run (or any checkpoint `load_model` reads) as a diffusers
DDPMPipeline folder: unet/, scheduler/, model_index.json, and vae/ for a latent run (see `ldm_lite.export`)."""
import json

from ldm_lite.checks import output_folder
from ldm_lite.export import export_diffusers


def add_arguments(parser):
    parser.add_argument("run", metavar="RUN", help="ldm_lite run folder or training checkpoint (or a diffusers "
                        "folder, re-exported)")
    parser.add_argument("out", metavar="OUT", help="output folder (new, empty, or an earlier export)")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA ones")


def run(args):
    output_folder(args.out, "OUT")
    out = export_diffusers(args.run, args.out, use_ema=not args.no_ema)
    index = json.loads((out / "model_index.json").read_text())
    parts = ", ".join(f"{name}/ ({value[1]})" for name, value in index.items() if not name.startswith("_"))
    print(f"wrote a diffusers {index['_class_name']} to {out}: {parts}, model_index.json, README.md")
    if json.loads((out / "unet" / "config.json").read_text())["num_class_embeds"] is not None:
        print("note: DDPMPipeline passes no class_labels, which this class-conditional UNet needs: README.md has "
              "the lines that call the UNet and the scheduler directly")
