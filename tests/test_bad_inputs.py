"""Bad inputs against every command, in-process through each command's main function: each ends with a non-zero
exit, exactly one line on stderr and no traceback, and the line names the cause.

The rows cover missing, empty and unwritable paths, an existing file where a folder is meant, a pickle named
.safetensors, truncated files, NaN and infinity, and zero and negative counts. We run as root, so chmod cannot
make a folder unwritable: "unwritable" is a path under /proc (no files can be created there) or under an
existing regular file (NotADirectoryError).
"""
import pytest
import torch

from ldm_lite import runs
from ldm_lite.cli import analysis, run_main
from ldm_lite.cli import sample as sample_cli
from ldm_lite.cli import train as train_cli
from ldm_lite.config_io import load_config
from ldm_lite.data import SYNTHETIC_CLASSES
from ldm_lite.export import export_diffusers
from ldm_lite.models import UNet, unet_preset
from ldm_lite.models.unet import save_unet
from ldm_lite.training import new_state

from test_training import TINY, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A run folder (an untrained 8x8 tiny model: only its shape matters), a UNet file and a diffusers export
    with truncated weights, a torch.save pickle named .safetensors, an empty folder, a regular file and a TOML
    config holding nan."""
    root = tmp_path_factory.mktemp("bad_inputs")
    config = load_config(TINY, tiny_overrides(root / "run"))
    torch.manual_seed(0)
    model = UNet(unet_preset("tiny", in_channels=3, sample_size=8, num_classes=len(SYNTHETIC_CLASSES)))
    (root / "run").mkdir()
    runs.atomic_save(new_state(config, model).payload(config), root / "run" / runs.CHECKPOINT_NAME)
    (root / "run" / runs.RUN_CONFIG_FILE).write_text(open(TINY).read().replace("resolution = 16", "resolution = 8"))
    save_unet(model, root / "unet.safetensors")
    weights = (root / "unet.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(weights[:len(weights) // 2])
    (root / "truncated.pt").write_bytes((root / "run" / "checkpoint.pt").read_bytes()[:5000])
    export = export_diffusers(root / "run", root / "export")
    unet_weights = export / "unet" / "diffusion_pytorch_model.safetensors"
    unet_weights.write_bytes(unet_weights.read_bytes()[:-100])
    torch.save({"weight": torch.zeros(2)}, root / "pickle.safetensors")
    (root / "empty").mkdir()
    (root / "afile").write_text("not a folder")
    (root / "nan.toml").write_text(open(TINY).read().replace("lr = 1e-3", "lr = nan"))
    return root


MAINS = {"train": train_cli.main, "sample": sample_cli.main, "analysis": analysis.main}
SAMPLE = ["sample", "--ckpt", "{run}", "--num-images", "2", "--steps", "2"]
FILE_OUT = ["--out", "{afile}"]
UNDER_FILE = ["--out", "{afile}/sub"]
# (command line with {placeholders} for the fixture's files, a fragment the one line must hold)
ROWS = [
    # missing paths
    (["train", "--config", "{root}/missing.toml"], "not found"),
    (["sample", "--ckpt", "{root}/missing", "--out", "{root}/s"], "does not exist"),
    (["analysis", "leak-stats", "--data", "{root}/missing", "--out", "{root}/l.safetensors"], "missing"),
    (["analysis", "fid", "--samples", "{root}/missing", "--ref", "{root}/missing.safetensors"], "missing"),
    (["analysis", "fid", "--samples", "{root}/s", "--ref", "{root}/nope"], "nope"),  # --ref checked first
    (["analysis", "brightness", "--samples", "{root}/missing"], "does not exist"),
    (["analysis", "invert", "--ckpt", "{run}", "--images", "{root}/missing"], "--images"),
    (["analysis", "export", "{root}/missing", "{root}/e"], "does not exist"),
    # empty folders
    (["analysis", "leak-stats", "--data", "{root}/empty", "--out", "{root}/l.safetensors"], "no images"),
    (["analysis", "fid-stats", "--data", "{root}/empty", "--out", "{root}/f.safetensors"], "no images"),
    (["analysis", "invert", "--ckpt", "{run}", "--images", "{root}/empty"], "--images"),
    (["analysis", "spectrum", "--samples", "{root}/empty"], "holds 0 image"),
    (["analysis", "bands", "--data", "{root}/empty"], "holds 0 image"),
    # an existing file where a folder is meant
    (["train", "--config", "{tiny}", *FILE_OUT], "is a file"),
    ([*SAMPLE, *FILE_OUT], "is a file"),
    (["analysis", "brightness", "--samples", "{root}/s", *FILE_OUT], "is a file"),
    (["analysis", "spectrum", "--samples", "{root}/s", *FILE_OUT], "is a file"),
    (["analysis", "bands", *FILE_OUT], "is a file"),
    (["analysis", "study", "--data", "synthetic", *FILE_OUT], "is a file"),
    (["analysis", "exposure", "--ckpt", "{run}", *FILE_OUT], "is a file"),
    (["analysis", "hspace", "--ckpt", "{run}", *FILE_OUT], "is a file"),
    (["analysis", "invert", "--ckpt", "{run}", "--images", "synthetic", *FILE_OUT], "is a file"),
    (["analysis", "export", "{run}", "{afile}"], "is a file"),
    (["analysis", "fid", "--samples", "{root}/s", "--ref", "synthetic", "--out", "{root}/empty"], "is a folder"),
    # unwritable: under a regular file, or in /proc
    (["train", "--config", "{tiny}", *UNDER_FILE], "cannot be made"),
    ([*SAMPLE, "--out", "/proc/ldm_lite_samples"], "cannot be written"),
    (["analysis", "leak-stats", "--data", "{root}", "--out", "{afile}/l.safetensors"], "cannot be written"),
    (["analysis", "fid-stats", "--data", "synthetic", "--out", "/proc/f.safetensors"], "cannot be written"),
    (["analysis", "fid", "--samples", "{root}/s", "--ref", "synthetic", "--out", "/proc/fid.csv"], "cannot be"),
    (["analysis", "bands", "--out", "/proc/bands"], "cannot be written"),
    # a pickle named .safetensors, truncated files
    (["sample", "--ckpt", "{root}/pickle.safetensors", "--out", "{root}/s2"], "not a readable safetensors file"),
    ([*SAMPLE, "--leak", "{root}/pickle.safetensors", "--out", "{root}/s2"], "not a readable"),
    ([*SAMPLE, "--fid", "{root}/pickle.safetensors", "--out", "{root}/s2"], "not a readable"),
    (["analysis", "fid", "--samples", "{root}/s", "--ref", "{root}/pickle.safetensors"], "not a readable"),
    (["analysis", "leak-stats", "--data", "{root}", "--resolution", "8", "--vae", "{root}/pickle.safetensors",
      "--out", "{root}/l.safetensors"], "not a readable safetensors file"),
    (["sample", "--ckpt", "{root}/truncated.safetensors", "--out", "{root}/s2"], "truncated"),
    (["sample", "--ckpt", "{root}/export", "--out", "{root}/s2"], "truncated"),
    (["sample", "--ckpt", "{root}/truncated.pt", "--out", "{root}/s2"], "not a readable PyTorch"),
    (["analysis", "hspace", "--ckpt", "{root}/truncated.safetensors"], "truncated"),
    # NaN and infinity: the option parser, the comma lists, TOML and --section.key=value
    ([*SAMPLE, "--class", "dark", "--guidance", "nan", "--out", "{root}/s2"], "--guidance must be a finite"),
    ([*SAMPLE, "--eps-scale", "inf", "--out", "{root}/s2"], "--eps-scale must be a finite"),
    ([*SAMPLE, "--leak-dc", "0=nan", "--out", "{root}/s2"], "--leak-dc"),
    (["analysis", "bands", "--offset-noise", "nan"], "--offset-noise must be a finite"),
    (["analysis", "exposure", "--ckpt", "{run}", "--eps-scale", "nan"], "--eps-scale must be a finite"),
    (["analysis", "exposure", "--ckpt", "{run}", "--scan", "1,inf"], "--scan must hold finite"),
    (["analysis", "hspace", "--ckpt", "{run}", "--scales", "nan,inf"], "--scales must hold finite"),
    (["analysis", "study", "--data", "synthetic", "--eps-scales", "1,nan"], "eps_scales must hold finite"),
    (["analysis", "study", "--data", "synthetic", "--minutes", "inf"], "--minutes must be a finite"),
    (["train", "--config", "{tiny}", "--train.ema_decay=nan"], "train.ema_decay must be a finite"),
    (["train", "--config", "{root}/nan.toml"], "train.lr must be a finite"),
    # zero and negative counts
    ([*SAMPLE[:3], "--num-images", "0", "--out", "{root}/s2"], "n must be an integer >= 1"),
    ([*SAMPLE[:3], "--steps", "-1", "--out", "{root}/s2"], "steps must be an integer >= 1"),
    (["analysis", "bands", "--num-images", "0"], "--num-images must be >= 2"),
    (["analysis", "hspace", "--ckpt", "{run}", "--num-samples", "0"], "--num-samples must be >= 2"),
    (["analysis", "exposure", "--ckpt", "{run}", "--steps", "0"], "--steps must be >= 1"),
    (["analysis", "invert", "--ckpt", "{run}", "--images", "synthetic", "--num-images", "-1"], "--num-images"),
    (["analysis", "fid-stats", "--data", "synthetic", "--out", "{root}/f.safetensors", "--max-images", "-1"],
     "max_images must be >= 0"),
    (["analysis", "study", "--data", "synthetic", "--unconditional-samples", "0"], "unconditional_samples"),
    (["train", "--config", "{tiny}", "--steps", "0"], "train.steps"),
    (["train", "--config", "{tiny}", "--train.batch_size=-8"], "train.batch_size"),
]


@pytest.mark.parametrize("argv, fragment", ROWS, ids=[" ".join(argv[:2]) + f" {i}" for i, (argv, _) in
                                                      enumerate(ROWS)])
def test_a_bad_input_ends_in_one_line_and_a_non_zero_exit(files, argv, fragment, capsys, monkeypatch):
    monkeypatch.chdir(files)  # default --out folders land in the fixture's folder
    (files / "s").mkdir(exist_ok=True)
    names = dict(root=files, run=files / "run", afile=files / "afile", tiny=TINY)
    command, *args = [part.format(**names) for part in argv]
    code = run_main(MAINS[command], args)
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert fragment in err


def test_exposure_warns_when_the_resolution_is_not_the_models(files, capsys):
    args = ["exposure", "--ckpt", str(files / "run"), "--resolution", "16", "--num-images", "2", "--steps", "1",
            "--out", str(files / "exposure")]
    assert run_main(analysis.main, args) == 0
    assert "warning: --resolution 16, but the model was trained at 8" in capsys.readouterr().err


def test_statistics_files_get_the_usual_permissions(files):
    import os
    from ldm_lite.leak import LeakStats
    path = files / "leak.safetensors"
    LeakStats.fit(torch.zeros(4, 3, 2, 2), kind="pixel").save(path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("error, line", [
    (OSError(28, "No space left on device", "/data/out/00001.png"), "No space left on device: '/data/out/00001.png'"),
    (FileExistsError(17, "File exists", "runs/x"), "File exists: 'runs/x'"),
    (ValueError("two\nlines"), "two lines")])
def test_any_remaining_os_error_is_one_line_naming_the_path(error, line, capsys):
    def main(argv):
        raise error
    assert run_main(main, []) == 2
    assert capsys.readouterr().err == f"error: {line}\n"



def test_a_closed_pipe_stays_quiet(monkeypatch):
    """BrokenPipeError is an OSError too, but output piped into `head` is not an error: no message, exit 0."""
    import io
    import sys
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)

    def main(argv):
        raise BrokenPipeError(32, "Broken pipe")
    assert run_main(main, []) == 0
    assert stderr.closed  # closed unread: nothing was written (a write would have come before the close)
