"""AutoencoderKL parity with diffusers on random weights, in every file format `load_vae` reads.

No real SD weights can be downloaded here, so the proof is: diffusers' AutoencoderKL with the real SD config
(and a reduced 3-level config for the format grid), random weights, fixed seed, written out in each format;
our loader must reproduce its posterior and decoded images to 1e-4 (float32, absolute).
"""
import dataclasses
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ldm_lite.models.vae import AutoencoderKL, DiagonalGaussian, tile_starts, tiled_apply, vae_preset
from ldm_lite.models.vae_loading import (infer_architecture, infer_config, load_vae, original_from_diffusers,
                                         read_vae_state_dict, save_vae_original)

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402

ATOL = 1e-4  # float32 parity, absolute; outputs are O(1)
SD = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
REDUCED = dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4)


def diffusers_vae(**config):
    """diffusers AutoencoderKL, seed 0; 1-D parameters (GroupNorm affine, biases) moved off their init so a
    swapped norm or bias cannot hide behind ones and zeros."""
    torch.manual_seed(0)
    levels = len(config["block_out_channels"])
    model = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                    up_block_types=("UpDecoderBlock2D",) * levels, **config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def images(batch=2, size=32, seed=1):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def reference(ref, x):
    posterior = ref.encode(x).latent_dist
    return posterior.mean, posterior.logvar, ref.decode(posterior.mean).sample


@torch.no_grad()
def assert_parity(ours, expected, x):
    mean, logvar, decoded = expected
    posterior = ours.encode(x)
    torch.testing.assert_close(posterior.mean, mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(posterior.logvar, logvar, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.decode(mean), decoded, atol=ATOL, rtol=0)


def old_attention_names(state_dict):
    """diffusers' pre-0.14 names (query/key/value/proj_attn) with 1x1-conv shaped weights."""
    renamed = {}
    for key, value in state_dict.items():
        for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                         (".to_out.0.", ".proj_attn.")):
            key = key.replace(new, old)
        renamed[key] = value[:, :, None, None] if value.ndim == 2 else value
    return renamed


def fake_sd_checkpoint(vae_original: dict) -> dict:
    """A whole-SD-checkpoint-like dict: the VAE under first_stage_model. beside other components and EMA copies."""
    other = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
             "model_ema.diffusion_modelinput_blocks00weight": torch.randn(8, 4, 3, 3),
             "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(8)}
    return {**other, **{"first_stage_model." + k: v for k, v in vae_original.items()}}


# ----------------------------------------------------------------------------------------------- the format grid

@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """(diffusers model, its outputs on `images()`, {format name: path})."""
    root = tmp_path_factory.mktemp("vae_formats")
    ref = diffusers_vae(**REDUCED)
    state_dict = {k: v.contiguous() for k, v in ref.state_dict().items()}
    original = original_from_diffusers(state_dict)
    paths = {}
    ref.save_pretrained(root / "diffusers", safe_serialization=True)
    ref.save_pretrained(root / "diffusers_bin", safe_serialization=False)
    paths["diffusers folder"], paths["diffusers folder .bin"] = root / "diffusers", root / "diffusers_bin"
    (root / "diffusers_old").mkdir()
    (root / "diffusers_old" / "config.json").write_text((root / "diffusers" / "config.json").read_text())
    save_file(old_attention_names(state_dict), str(root / "diffusers_old" / "diffusion_pytorch_model.safetensors"))
    paths["diffusers folder, old names"] = root / "diffusers_old"
    paths["diffusers file"] = root / "diffusers" / "diffusion_pytorch_model.safetensors"
    shutil.copytree(root / "diffusers", root / "pipeline" / "vae")
    paths["diffusers pipeline folder"] = root / "pipeline"
    save_file(fake_sd_checkpoint(original), str(root / "full.safetensors"))
    torch.save({"state_dict": fake_sd_checkpoint(original), "global_step": 10}, root / "full.ckpt")
    paths["checkpoint .safetensors"], paths["checkpoint .ckpt"] = root / "full.safetensors", root / "full.ckpt"
    save_file(original, str(root / "vae.safetensors"))
    training_only = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
                     "model_ema.decay": torch.tensor(0.999)}
    torch.save({"state_dict": {**original, **training_only}}, root / "vae.ckpt")
    paths["vae .safetensors"], paths["vae .ckpt"] = root / "vae.safetensors", root / "vae.ckpt"
    return ref, reference(ref, images()), paths, original


@pytest.mark.parametrize("name", ["diffusers folder", "diffusers folder .bin", "diffusers folder, old names",
                                  "diffusers file", "diffusers pipeline folder", "checkpoint .safetensors",
                                  "checkpoint .ckpt", "vae .safetensors", "vae .ckpt"])
def test_every_format_matches_diffusers(reduced, name):
    _, expected, paths, _ = reduced
    vae = load_vae(paths[name])
    assert vae.config.block_out_channels == REDUCED["block_out_channels"] and vae.config.layers_per_block == 1
    assert_parity(vae, expected, images())


def test_detected_formats(reduced):
    _, _, paths, _ = reduced
    assert read_vae_state_dict(paths["checkpoint .ckpt"])[1] == "original checkpoint"
    assert read_vae_state_dict(paths["vae .ckpt"])[1] == "original VAE"
    assert read_vae_state_dict(paths["diffusers folder, old names"])[1] == "diffusers folder"
    assert read_vae_state_dict(paths["diffusers file"])[1] == "diffusers file"


def test_our_key_mapping_agrees_with_diffusers_converter(reduced):
    """diffusers ships original -> diffusers; applied to our diffusers -> original output it must give the start."""
    ref, _, _, original = reduced
    levels = len(REDUCED["block_out_channels"])
    converted = convert_ldm_vae_checkpoint(fake_sd_checkpoint(original), {
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels})
    expected = ref.state_dict()
    assert converted.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key


# ----------------------------------------------------------------------------------------------- full SD config

@pytest.fixture(scope="module")
def full_sd():
    """The SD-config reference with float16-representable weights, so a float16 file (half the disk: 167 MB,
    not 335 MB) holds them exactly and the float32 parity below is unaffected."""
    ref = diffusers_vae(**SD)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
    return ref, reference(ref, images(batch=1, size=32))


@pytest.mark.parametrize("name", ["diffusers", "sd.safetensors"])
def test_full_sd_config_matches_diffusers(full_sd, name, tmp_path):
    """The real SD architecture (83.7M parameters) at 32x32 (4x4 latents), from a diffusers folder and from an
    SD checkpoint, each written in float16 and read back in float32; the file is deleted before the comparison
    (CI's /tmp is small)."""
    ref, expected = full_sd
    if name == "diffusers":
        try:
            ref.half().save_pretrained(tmp_path / name)
        finally:
            ref.float()  # exact: the weights are float16-representable
    else:
        half = {k: v.half().contiguous() for k, v in ref.state_dict().items()}
        save_file(fake_sd_checkpoint(original_from_diffusers(half)), str(tmp_path / name))
    vae = load_vae(tmp_path / name, dtype=torch.float32)
    shutil.rmtree(tmp_path)
    assert (vae.variant, vae.scaling_factor, vae.downscale) == ("sd", 0.18215, 8)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert vae.decoder.conv_in.weight.dtype == torch.float32
    assert_parity(vae, expected, images(batch=1, size=32))


# ----------------------------------------------------------------------------------------------- variants

def meta_model(variant):
    with torch.device("meta"):
        return AutoencoderKL(vae_preset(variant))


@pytest.mark.parametrize("variant, count", [("sd", 83_653_863), ("sdxl", 83_653_863),
                                            ("sd3", 83_819_683), ("flux", 83_819_683)])
def test_parameter_counts(variant, count):
    config = vae_preset(variant)
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                                      layers_per_block=2, latent_channels=config.latent_channels,
                                      use_quant_conv=config.use_quant_conv,
                                      use_post_quant_conv=config.use_post_quant_conv)
    assert sum(p.numel() for p in meta_model(variant).parameters()) == count
    assert sum(p.numel() for p in ref.parameters()) == count


def test_variant_scalings():
    expected = {"sd": (4, 0.18215, 0.0), "sdxl": (4, 0.13025, 0.0), "sd3": (16, 1.5305, 0.0609),
                "flux": (16, 0.3611, 0.1159)}
    for variant, (channels, scaling, shift) in expected.items():
        c = vae_preset(variant)
        assert (c.latent_channels, c.scaling_factor, c.shift_factor) == (channels, scaling, shift)
    assert vae_preset("sdxl").force_upcast and not vae_preset("sd").force_upcast
    with pytest.raises(ValueError, match="variant"):
        vae_preset("sd4")


def test_variant_inferred_from_shapes_and_config():
    flux_shapes = meta_model("flux").state_dict()
    with pytest.warns(UserWarning, match="sd3"):
        assert infer_config(flux_shapes, "original VAE", None).variant == "flux"
    with pytest.warns(UserWarning, match="flux"):
        assert infer_config(flux_shapes, "original checkpoint", None).variant == "sd3"
    sd3_config = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
    assert infer_config(flux_shapes, "diffusers folder", sd3_config).variant == "sd3"
    sd_shapes = meta_model("sd").state_dict()
    assert infer_config(sd_shapes, "original VAE", None).variant == "sd"
    sdxl = infer_config(sd_shapes, "diffusers folder", {"scaling_factor": 0.13025})
    assert (sdxl.variant, sdxl.force_upcast) == ("sdxl", True)
    custom = infer_config(sd_shapes, "diffusers folder", {"scaling_factor": 0.5, "force_upcast": False})
    assert (custom.variant, custom.scaling_factor) == ("sd", 0.5)
    assert infer_architecture({"encoder.conv_in.weight": torch.zeros(1)}) is None


# ----------------------------------------------------------------------------------------------- files: safety

def test_round_trip_through_original_file_is_bit_exact(tmp_path):
    vae = load_vae("test", seed=3)
    vae.config = dataclasses.replace(vae.config, scaling_factor=0.5, shift_factor=0.25)  # stored, not guessed
    x = images(size=16)
    for name, prefix in (("vae.safetensors", ""), ("full.ckpt", "first_stage_model.")):
        extra = {"model.diffusion_model.w": torch.ones(2)} if prefix else None   # a UNet beside it, as in SD
        save_vae_original(vae, tmp_path / name, prefix=prefix, extra=extra)
        loaded = load_vae(tmp_path / name)
        assert loaded.config == vae.config and loaded.identity() == vae.identity()
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))
        with torch.no_grad():
            assert torch.equal(loaded.to_latents(x), vae.to_latents(x))


class _CodePayload:
    """Unpickling this calls open(marker, "w"), i.e. runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"
    torch.save({"state_dict": {"decoder.conv_in.weight": torch.zeros(1)}, "hook": _CodePayload(marker)},
               tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="safetensors"):
        load_vae(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_wrong_file_lists_missing_unexpected_and_misshapen_keys(reduced, tmp_path):
    _, _, _, original = reduced
    broken = dict(original)
    del broken["decoder.conv_out.bias"]
    broken["decoder.extra.weight"] = torch.zeros(3)
    broken["decoder.mid.block_1.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError) as error:
        load_vae(tmp_path / "broken.safetensors")
    message = str(error.value)
    for part in ("detected format: original VAE", "1 missing", "decoder.conv_out.bias", "1 unexpected",
                 "decoder.extra.weight", "1 wrongly shaped", "decoder.mid.block_1.conv1.weight"):
        assert part in message
    with pytest.raises(ValueError, match="wrongly shaped"):   # a reduced VAE is not an SD one
        load_vae(reduced[2]["vae .safetensors"], variant="sd")
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_vae(tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match="path_or_variant"):
        load_vae(tmp_path / "nothing.safetensors")
    for name in ("garbage.safetensors", "garbage.ckpt"):
        (tmp_path / name).write_bytes(b"not weights")
        with pytest.raises(ValueError, match="not a readable"):
            load_vae(tmp_path / name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_and_upcast(reduced, tmp_path, dtype):
    _, _, _, original = reduced
    save_file({k: v.to(dtype) for k, v in original.items()}, str(tmp_path / "half.safetensors"))
    assert load_vae(tmp_path / "half.safetensors").decoder.conv_in.weight.dtype == dtype
    upcast = load_vae(tmp_path / "half.safetensors", dtype=torch.float32)
    for key, value in upcast.state_dict().items():
        expected = original[key].to(dtype).float().reshape(value.shape)
        assert value.dtype == torch.float32 and torch.equal(value, expected), key


def test_force_upcast_decodes_float16_weights_in_float32():
    """SDXL's fp16 decode overflows; force_upcast decodes float16 weights with float32 arithmetic instead."""
    vae = load_vae("test", seed=0)
    with torch.no_grad():  # large activations, as in SDXL's VAE: fine in float32, inf in float16
        vae.decoder.conv_in.weight.mul_(1000.0)
    latents = (100 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))).half()
    half = dataclasses.replace(vae.config, force_upcast=True)
    with torch.no_grad():
        plain = AutoencoderKL(vae.config).half().eval()
        plain.load_state_dict(vae.state_dict())
        assert not torch.isfinite(plain.decode(latents)).all()
        upcast = AutoencoderKL(half).half().eval()
        upcast.load_state_dict(vae.state_dict())
        reference_fp32 = AutoencoderKL(half).eval()
        reference_fp32.load_state_dict(upcast.state_dict())            # float16-rounded weights, float32 model
        decoded = upcast.decode(latents)
        assert decoded.dtype == torch.float32 and torch.isfinite(decoded).all()
        torch.testing.assert_close(decoded, reference_fp32.decode(latents.float()), atol=1e-5, rtol=0)
    assert upcast.decoder.conv_in.weight.dtype == torch.float16       # the module itself is left as it was


# ----------------------------------------------------------------------------------------------- the model

def test_posterior_matches_diffusers():
    moments = torch.randn(2, 8, 4, 4) * 20   # beyond the clamp range on both sides
    ours, ref = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert ours.logvar.min() == -30.0 and ours.logvar.max() == 20.0
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), atol=0, rtol=1e-6)
    torch.testing.assert_close(ours.kl(), ref.kl(), atol=0, rtol=1e-5)
    sample = ours.sample(torch.Generator().manual_seed(5))
    assert torch.equal(sample, ref.sample(torch.Generator().manual_seed(5)))
    assert torch.equal(ours.mode(), moments[:, :4])


def test_latent_scaling_and_inverse():
    vae = load_vae("test", seed=1)
    vae.config = dataclasses.replace(vae.config, scaling_factor=1.5305, shift_factor=0.0609)
    x = images(size=16)
    with torch.no_grad():
        posterior = vae.encode(x)
        z = vae.to_latents(x)
        torch.testing.assert_close(z, (posterior.mean - 0.0609) * 1.5305, atol=1e-6, rtol=0)
        torch.testing.assert_close(vae.from_latents(z), vae.decode(posterior.mean), atol=1e-5, rtol=0)
        drawn = vae.to_latents(x, sample=True, generator=torch.Generator().manual_seed(2))
        expected = (posterior.sample(torch.Generator().manual_seed(2)) - 0.0609) * 1.5305
        torch.testing.assert_close(drawn, expected, atol=1e-6, rtol=0)
    assert z.shape == (2, 4, 8, 8) and vae.downscale == 2
    with pytest.raises(ValueError, match="images"):
        vae.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 3, 8, 8))


def test_tile_starts_cover_with_overlap():
    for size, tile, overlap in ((128, 64, 8), (100, 64, 8), (64, 64, 8), (40, 64, 8), (129, 32, 4)):
        starts = tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(tile, size) == size
        assert all(0 < b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    assert tile_starts(128, 64, 8) == [0, 32, 64]


def test_tiled_blending_is_exact_for_a_local_function():
    """With fn local (nearest x4 upsampling) blended tiles must give the untiled result: weights sum to one."""
    x = torch.randn(1, 2, 20, 36, generator=torch.Generator().manual_seed(0))
    fn = lambda t: F.interpolate(t, scale_factor=4.0, mode="nearest")  # noqa: E731
    torch.testing.assert_close(tiled_apply(fn, x, tile=8, overlap=3, in_scale=1, out_scale=4), fn(x),
                               atol=1e-6, rtol=0)
    fn = lambda t: t[:, :, ::2, ::2]  # noqa: E731   (encode-like: in_scale 2)
    torch.testing.assert_close(tiled_apply(fn, x, tile=6, overlap=2, in_scale=2, out_scale=1), fn(x),
                               atol=1e-6, rtol=0)


def test_tiled_encode_decode():
    """Where only one tile reaches, the tiled result is that tile's own result; one big tile is no tiling."""
    vae = load_vae("test", seed=0)
    x = images(batch=1, size=48)
    with torch.no_grad():
        whole = vae.encode(x)
        assert torch.equal(vae.encode(x, tile_size=48).mean, whole.mean)
        tiled = vae.encode(x, tile_size=32, tile_overlap=16)           # latent tiles start at 0 and 8 (of 24)
        torch.testing.assert_close(tiled.mean[..., :8, :8], vae.encode(x[..., :32, :32]).mean[..., :8, :8],
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(tiled.mean[..., 16:, 16:], vae.encode(x[..., 16:, 16:]).mean[..., 8:, 8:],
                                   atol=1e-6, rtol=0)
        z = whole.mean                                                  # (1, 4, 24, 24): tiles at 0 and 8
        assert torch.equal(vae.decode(z, tile_size=48), vae.decode(z))
        decoded = vae.decode(z, tile_size=32, tile_overlap=16)
        assert decoded.shape == x.shape
        torch.testing.assert_close(decoded[..., :16, :16], vae.decode(z[..., :16, :16])[..., :16, :16],
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(decoded[..., 32:, 32:], vae.decode(z[..., 8:, 8:])[..., 16:, 16:],
                                   atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="tile_size"):
        vae.decode(z, tile_size=31)


def test_identity_and_random_variants():
    a, b = load_vae("test", seed=0), load_vae("test", seed=0)
    assert a.identity() == b.identity() and a.identity().startswith("test-")
    assert load_vae("test", seed=1).identity() != a.identity()
    b.config = dataclasses.replace(b.config, scaling_factor=0.5)
    assert b.identity() != a.identity()
    with torch.no_grad():
        a.decoder.conv_out.bias[0] += 1e-3
    assert a.identity() != load_vae("test", seed=0).identity()
    assert load_vae("test").decoder.conv_in.weight.dtype == torch.float32
    assert math.isclose(load_vae("test").scaling_factor, 1.0)


def test_gradients_flow():
    vae = load_vae("test", seed=0).train()
    reconstruction, posterior = vae(images(batch=1, size=16), generator=torch.Generator().manual_seed(0))
    (reconstruction.square().mean() + posterior.kl().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vae.parameters())
    json.dumps(dataclasses.asdict(vae.config))  # configs stay JSON-serialisable (stored in saved files)
