"""`ldm_lite.export.export_diffusers` and `python -m analysis export`: a run written as a diffusers folder must load
in diffusers 0.42.1 (the reference) with the same UNet outputs, schedule and VAE, and load back into ldm_lite
sampling the same images. Runs are random-weight UNets saved as training checkpoints (no training needed): every
parameter, GroupNorm affines included, is moved off its initial value, so no output is trivially zero.
"""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm_lite.cli import run_main
from ldm_lite.cli.analysis import main as analysis_main
from ldm_lite.config_io import load_config
from ldm_lite.export import diffusers_unet_config, diffusers_vae_state_dict, export_diffusers
from ldm_lite.models.unet import UNet, unet_preset
from ldm_lite.models.vae import AutoencoderKL, vae_preset
from ldm_lite.models.vae_loading import original_from_diffusers
from ldm_lite.runs import CHECKPOINT_NAME, atomic_save, checkpoint_payload, load_model
from ldm_lite.sampling import sample, sample_generators
from ldm_lite.schedulers import from_config

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "synthetic_tiny.toml"
ATOL = 1e-5  # float32 parity bar for a whole network output / sampling chain
# Unconditional DDPM layout (additive, sin-cos, padding 0); class-conditional ADM layout (scale-shift with a mid
# attention GroupNorm, learned sigma, two heads of 32 channels given as num_heads); a 1-channel scale-shift model
# without the mid GroupNorm, ADM sinusoids, symmetric padding, fractional timesteps.
UNETS = {
    "ddpm": dict(sample_size=16),
    "adm_classes": dict(sample_size=16, num_classes=3, time_conditioning="scale_shift", learn_sigma=True,
                        head_channels=None, num_heads=2),
    "scale_shift_gray": dict(sample_size=8, in_channels=1, time_conditioning="scale_shift", mid_attention_norm=False,
                             flip_sin_to_cos=True, freq_shift=0.0, downsample_padding=1, channel_mult=(1, 2)),
}
DIFFUSION = {  # [diffusion] overrides per run: the TINY config's scaled_linear / epsilon, or linear / v-prediction
    "ddpm": {}, "adm_classes": {"diffusion.beta_schedule": "linear", "diffusion.beta_start": "0.0001",
                                "diffusion.beta_end": "0.02", "diffusion.prediction_type": "v_prediction"},
    "scale_shift_gray": {"diffusion.beta_schedule": "squaredcos_cap_v2"},
}


def random_unet(config, seed: int) -> UNet:
    torch.manual_seed(seed)
    model = UNet(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def save_run(folder: Path, unet_overrides: dict, overrides: dict) -> Path:
    """A run folder holding checkpoint.pt (embedded config) with distinct raw and EMA weights."""
    config = load_config(TINY, {"train.num_threads": "1", **overrides})
    unet_config = unet_preset("tiny", **unet_overrides)
    model, ema = random_unet(unet_config, 0), random_unet(unet_config, 1)
    folder.mkdir(parents=True)
    optimizer = torch.optim.AdamW(model.parameters())
    atomic_save(checkpoint_payload(config, model, ema, optimizer, step=7), folder / CHECKPOINT_NAME)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """{name: (run folder, export folder)} for every UNETS entry."""
    root = tmp_path_factory.mktemp("export")
    pairs = {}
    for name, unet in UNETS.items():
        run = save_run(root / name, unet, DIFFUSION[name])
        pairs[name] = (run, export_diffusers(run, root / f"{name}_diffusers"))
    return pairs


def inputs(config, batch: int = 4, seed: int = 1):
    """x (B, C, H, W), timesteps [0, 3.5 or 3, 500, 999] (fractional where the model allows it), labels with the
    null class (num_classes) included."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    timesteps = torch.tensor([0.0, 3.5, 500.0, 999.0])[:batch]
    labels = None if config.num_classes is None else torch.arange(batch) % (config.num_classes + 1)
    return x, timesteps, labels


@pytest.mark.parametrize("name", list(UNETS))
def test_diffusers_unet_matches_ours(exported, name):
    diffusers = pytest.importorskip("diffusers")
    run, out = exported[name]
    ours = load_model(run).unet
    reference = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    assert set(reference.state_dict()) == set(ours.state_dict())  # every tensor found, none left at its init
    x, timesteps, labels = inputs(ours.config)
    with torch.no_grad():
        expected = reference(x, timesteps, class_labels=labels).sample
        actual = ours(x, timesteps, labels)
    assert actual.shape == expected.shape == (4, ours.config.out_channels, *x.shape[2:])
    assert (actual - expected).abs().max().item() <= ATOL
    assert expected.abs().max().item() > 0.1  # not two near-zero outputs
    if labels is not None:  # the labels change the output: the class embedding rows line up, null row last
        with torch.no_grad():
            other = reference(x, timesteps, class_labels=labels.roll(1)).sample
        assert (other - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", list(UNETS))
def test_diffusers_scheduler_matches_ours(exported, name):
    diffusers = pytest.importorskip("diffusers")
    run, out = exported[name]
    reference = diffusers.DDIMScheduler.from_pretrained(out / "scheduler")
    ours = from_config(load_model(run).scheduler_config)
    assert torch.equal(reference.alphas_cumprod, ours.alphas_cumprod)
    for steps in (10, 50):
        reference.set_timesteps(steps)
        ours.set_timesteps(steps)
        assert torch.equal(reference.timesteps, ours.timesteps), steps
    assert reference.config.prediction_type == ours.prediction_type


def test_ddpm_pipeline_samples_what_we_sample(exported):
    """DDPMPipeline.from_pretrained(out), given our per-sample generators, draws the same x_T and runs DDIM (the
    exported scheduler class) to the images we sample from the run. Two steps: measured gap 4.6e-6. Each step
    magnifies the 1e-6 UNet gap of random weights (x0 = (x - sqrt(1 - ab) eps) / sqrt(ab) at ab[901] = 0.014):
    1.8e-7 after one step, 9.6e-5 after ten."""
    diffusers = pytest.importorskip("diffusers")
    run, out = exported["ddpm"]
    pipeline = diffusers.DDPMPipeline.from_pretrained(out)
    assert type(pipeline.scheduler).__name__ == "DDIMScheduler"
    loaded = load_model(run)
    ours = sample(loaded.unet, from_config(loaded.scheduler_config), 3, num_inference_steps=2, seed=5,
                  progress=False)
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(batch_size=3, generator=sample_generators(5, 0, 3), num_inference_steps=2,
                      output_type="np").images  # (B, H, W, C) in [0, 1]
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2) * 2 - 1
    assert (ours - theirs).abs().max().item() <= ATOL
    assert ours.std().item() > 0.1


@pytest.mark.parametrize("name", list(UNETS))
def test_round_trip_samples_the_same_images(exported, name):
    run, out = exported[name]
    before, after = load_model(run), load_model(out)
    assert after.source["kind"] == "diffusers pipeline"
    assert after.scheduler_config == before.scheduler_config
    labels = None if before.unet.config.num_classes is None else [0, 1, 3]
    images = [sample(m.unet, from_config(m.scheduler_config), 3, num_inference_steps=4, class_labels=labels,
                     seed=11, progress=False) for m in (before, after)]
    assert (images[0] - images[1]).abs().max().item() <= ATOL
    assert images[0].std().item() > 0.1


def test_readme_samples_the_class_conditional_export_in_diffusers(exported, monkeypatch):
    """The README's lines (4 steps instead of 50), run in the export folder, sample the learned-sigma
    3-class model in diffusers with labels 0, 1, 2: the images ldm_lite samples from the run, within ATOL
    (measured 3.2e-6)."""
    pytest.importorskip("diffusers")
    run, out = exported["adm_classes"]
    code = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    assert "steps = 50" in code and "class_labels=labels" in code
    monkeypatch.chdir(out)
    theirs = {}
    exec(code.replace("steps = 50", "steps = 4"), theirs)
    loaded = load_model(run)
    scheduler = from_config(loaded.scheduler_config)
    scheduler.set_timesteps(4)
    ours = sample(loaded.unet, scheduler, 3, x_T=theirs["noise"] * scheduler.init_noise_sigma, class_labels=[0, 1, 2],
                  num_inference_steps=4, progress=False)
    assert (ours - theirs["x"]).abs().max().item() <= ATOL
    assert ours.std().item() > 0.1


def test_class_names_are_exported(exported, tmp_path, capsys):
    """`sample --ckpt EXPORT --class dark` resolves the name as it does for the run."""
    from ldm_lite.cli.sample import main as sample_main
    run, out = exported["adm_classes"]
    assert load_model(out).class_names == load_model(run).class_names == ("dark", "mid", "bright")
    capsys.readouterr()
    code = run_main(sample_main, ["--ckpt", str(out), "--out", str(tmp_path), "--class", "dark", "--n", "1",
                                  "--steps", "2"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "manifest.json").read_text())["class_label"] == 0


def test_exports_the_ema_weights_unless_told(exported, tmp_path):
    run, out = exported["ddpm"]
    checkpoint = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    exported_weights = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported_weights[k], v) for k, v in checkpoint["ema"].items())
    raw = load_file(export_diffusers(run, tmp_path / "raw", use_ema=False) / "unet" /
                    "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(raw[k], v) for k, v in checkpoint["model"].items())
    assert not torch.equal(raw["conv_in.weight"], exported_weights["conv_in.weight"])


def test_latent_run_exports_its_vae(tmp_path):
    """A latent run (the seeded random 'test' VAE, 16x16 images -> 4 x 8 x 8 latents): vae/ loads in diffusers
    with the same decoder output, and back into ldm_lite as the same VAE (config and every weight byte)."""
    run = save_run(tmp_path / "latent", dict(sample_size=8, in_channels=4), {"latent.vae": "test"})
    out = export_diffusers(run, tmp_path / "latent_diffusers")
    assert json.loads((out / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    before, after = load_model(run), load_model(out)
    assert after.vae.identity() == before.vae.identity()
    assert after.scheduler_config["clip_sample"] is False  # latents are not clipped
    latents = [sample(m.unet, from_config(m.scheduler_config), 2, num_inference_steps=4, seed=3, progress=False)
               for m in (before, after)]
    assert (latents[0] - latents[1]).abs().max().item() <= ATOL
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.AutoencoderKL.from_pretrained(out / "vae").eval()
    assert reference.config.scaling_factor == before.vae.scaling_factor
    with torch.no_grad():
        expected = reference.decode(latents[0] / reference.config.scaling_factor).sample
    actual = before.vae.from_latents(latents[0])
    assert (actual - expected).abs().max().item() <= ATOL
    assert expected.std().item() > 0.01


def test_vae_renaming_inverts_the_loader():
    """Every original-layout key maps to a distinct diffusers key that the loader maps back to itself."""
    vae = AutoencoderKL(vae_preset("sd", block_out_channels=(8, 16, 32, 32), norm_groups=8))  # SD's layout, narrow
    renamed = diffusers_vae_state_dict(vae)
    assert len(renamed) == len(vae.state_dict())
    assert original_from_diffusers({k: 0 for k in renamed}).keys() == vae.state_dict().keys()
    assert renamed["decoder.up_blocks.0.upsamplers.0.conv.weight"].shape == (32, 32, 3, 3)  # lowest resolution
    assert renamed["encoder.mid_block.attentions.0.to_q.weight"].shape == (32, 32)


@pytest.mark.parametrize("overrides,message", [
    (dict(head_channels=None, num_heads=4, attention_resolutions=(16, 8)), "num_heads=4"),  # widths 32 and 64
    (dict(mid_attention_norm=False), "mid_attention_norm=False"),  # additive: diffusers always adds the norm
])
def test_inexpressible_unets_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        diffusers_unet_config(unet_preset("tiny", sample_size=16, **overrides))


def test_config_round_trips_through_the_loader():
    """Our preset -> diffusers config -> `unet_fields_from_diffusers` -> the same UNetConfig (closed form)."""
    from ldm_lite.models.unet import unet_config_from_dict
    from ldm_lite.models.unet_loading import unet_fields_from_diffusers
    for overrides in (dict(), dict(num_classes=5, time_conditioning="scale_shift", learn_sigma=True)):
        config = unet_preset("tiny", **overrides)
        assert unet_config_from_dict(unet_fields_from_diffusers(diffusers_unet_config(config))) == config
    ddpm = unet_preset("ddpm_cifar10")
    written = diffusers_unet_config(ddpm)
    assert written["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    assert written["num_class_embeds"] is None and math.isclose(written["norm_eps"], 1e-6)


# ----------------------------------------------------------------------------- the command

def run_cli(argv, capsys) -> tuple:
    capsys.readouterr()
    code = run_main(analysis_main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_command_writes_the_folder(exported, tmp_path, capsys):
    run, _ = exported["adm_classes"]
    code, out, err = run_cli(["export", run, tmp_path / "out"], capsys)
    assert code == 0, err
    assert out.count("\n") == 2 and "scheduler/ (DDIMScheduler), unet/ (UNet2DModel), model_index.json" in out
    assert "note: DDPMPipeline passes no class_labels" in out  # the model has 3 classes
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "classes.json", "README.md"):
        assert (tmp_path / "out" / name).is_file(), name
    assert json.loads((tmp_path / "out" / "unet" / "config.json").read_text())["num_class_embeds"] == 4


@pytest.mark.parametrize("case", ["missing run", "foreign output folder", "quadratic spacing"])
def test_command_bad_input_ends_in_one_line(exported, tmp_path, capsys, case):
    if case == "missing run":
        argv = ["export", tmp_path / "no_such_run", tmp_path / "out"]
    elif case == "quadratic spacing":  # DDIM's quadratic spacing, which diffusers lacks: refused, nothing written
        folder = tmp_path / "quadratic"
        shutil.copytree(exported["ddpm"][1], folder)
        config_path = folder / "scheduler" / "scheduler_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "timestep_spacing": "quadratic"}))
        argv = ["export", folder, tmp_path / "out"]
    else:
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "notes.txt").write_text("mine")
        argv = ["export", exported["ddpm"][0], tmp_path / "busy"]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert {"missing run": "does not exist", "foreign output folder": "not empty",
            "quadratic spacing": "timestep_spacing='quadratic'"}[case] in err
    assert not (tmp_path / "out").exists()
