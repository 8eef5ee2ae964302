"""UNet: parameter counts, parity with diffusers' UNet2DModel, weight loading, h-space hook, conditioning."""
import dataclasses
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_lite.models.unet import (AttentionBlock, UNet, UNetConfig, attention, dropout, load_unet, save_unet,
                                  timestep_embedding, unet_config_from_dict, unet_preset)
from ldm_lite.models.unet_loading import write_unet_weights

# google/ddpm-cifar10-32's config.json, key for key (Ho et al. 2020's CIFAR-10 model).
DDPM_CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# ADM-style: scale-shift norm, 4-head attention at two levels, class conditional, learned variance (6 outputs),
# [cos, sin] sinusoids without shift, symmetric downsample padding; the mid attention has no GroupNorm here.
SCALE_SHIFT_CONFIG = {
    "sample_size": 16, "in_channels": 3, "out_channels": 6, "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1,
    "attention_head_dim": 16, "norm_num_groups": 8, "norm_eps": 1e-5, "resnet_time_scale_shift": "scale_shift",
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "num_class_embeds": 4,
}
# Attention at full resolution only, 8-channel heads, widths (1, 2, 3) x 16, no mid attention, diffusers defaults
# for everything left out (flip_sin_to_cos True, freq_shift 0, eps 1e-5).
FULL_RES_ATTENTION_CONFIG = {
    "sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [16, 32, 48],
    "down_block_types": ["AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D"], "layers_per_block": 2,
    "attention_head_dim": 8, "norm_num_groups": 4, "add_attention": False,
}
PARITY_CONFIGS = {"ddpm_cifar10_32": DDPM_CIFAR10_CONFIG, "scale_shift_multihead": SCALE_SHIFT_CONFIG,
                  "full_res_attention": FULL_RES_ATTENTION_CONFIG}
ATOL = 1e-5  # float32 parity bar for the whole network output


def diffusers_model(config: dict, seed: int = 0):
    """A diffusers UNet2DModel with random weights, GroupNorm affines and biases included (not the init values)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    return model


def inputs(config: dict, batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    x = torch.randn(batch, config["in_channels"], size, size, generator=generator)
    timesteps = torch.tensor([3, 977, 500, 0][:batch])
    labels = torch.arange(batch) % config["num_class_embeds"] if config.get("num_class_embeds") else None
    return x, timesteps, labels


def tiny_model(seed: int = 0, **overrides) -> UNet:
    torch.manual_seed(seed)
    return UNet(unet_preset("tiny", sample_size=16, **overrides)).eval()


def test_parameter_counts():
    counts = {name: sum(p.numel() for p in UNet(unet_preset(name)).parameters())
              for name in ("ddpm_cifar10", "small", "tiny")}
    assert counts["ddpm_cifar10"] == 35_746_307
    assert 8_000_000 <= counts["small"] <= 15_000_000
    assert counts["tiny"] <= 2_000_000


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_diffusers_folder_parity(name, tmp_path):
    config = PARITY_CONFIGS[name]
    reference = diffusers_model(config)
    reference.save_pretrained(tmp_path)  # config.json + diffusion_pytorch_model.safetensors
    ours = load_unet(tmp_path).eval()
    x, timesteps, labels = inputs(config)
    with torch.no_grad():
        expected = reference(x, timesteps, class_labels=labels).sample
        actual = ours(x, timesteps, class_labels=labels)
    assert actual.shape == expected.shape == (2, config["out_channels"], *x.shape[2:])
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero outputs


def test_ddpm_cifar10_config_is_the_preset(tmp_path):
    from ldm_lite.models.unet_loading import unet_fields_from_diffusers
    fields = unet_fields_from_diffusers(DDPM_CIFAR10_CONFIG)
    assert unet_config_from_dict(fields) == unet_preset("ddpm_cifar10", dropout=0.0)


def legacy_names(state_dict: dict) -> dict:
    new_to_old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    renamed = {}
    for key, value in state_dict.items():
        for new, old in new_to_old.items():
            key = key.replace(new, old)
        renamed[key] = value
    return renamed


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
def test_legacy_attention_names(weights_format, tmp_path):
    config = SCALE_SHIFT_CONFIG
    reference = diffusers_model(config, seed=3)
    reference.save_pretrained(tmp_path, safe_serialization=weights_format == "safetensors")
    weight_file = tmp_path / f"diffusion_pytorch_model.{weights_format}"
    if weights_format == "safetensors":
        old = legacy_names(load_file(weight_file))
        save_file(old, weight_file)
    else:
        old = legacy_names(torch.load(weight_file, weights_only=True))
        torch.save(old, weight_file)
    assert any(".proj_attn." in k for k in old) and not any(".to_q." in k for k in old)
    x, timesteps, labels = inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(load_unet(tmp_path)(x, timesteps, labels), reference(x, timesteps, labels).sample,
                                   atol=ATOL, rtol=0)


class RunsCodeWhenUnpickled:
    ran = False

    def __reduce__(self):
        return (setattr, (RunsCodeWhenUnpickled, "ran", True))


def test_bin_is_read_without_running_pickled_code(tmp_path):
    model = diffusers_model(FULL_RES_ATTENTION_CONFIG)
    model.save_pretrained(tmp_path, safe_serialization=False)
    state_dict = torch.load(tmp_path / "diffusion_pytorch_model.bin", weights_only=True)
    torch.save({**state_dict, "payload": RunsCodeWhenUnpickled()}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        load_unet(tmp_path)
    assert not RunsCodeWhenUnpickled.ran
    with pytest.raises(pickle.UnpicklingError):  # the same file is refused by torch itself, as the message says
        torch.load(tmp_path / "diffusion_pytorch_model.bin", weights_only=True)


def test_mismatched_weights_list_missing_unexpected_and_shapes(tmp_path):
    model = tiny_model()
    state_dict = dict(model.state_dict())
    del state_dict["conv_out.bias"]
    state_dict["mid_block.extra.weight"] = torch.zeros(3)
    state_dict["conv_in.weight"] = torch.zeros(7, 3, 3, 3)
    path = tmp_path / "bad.safetensors"
    write_unet_weights(path, dataclasses.asdict(model.config), state_dict)
    with pytest.raises(ValueError) as error:
        load_unet(path)
    message = str(error.value)
    assert "missing (1): ['conv_out.bias']" in message
    assert "unexpected (1): ['mid_block.extra.weight']" in message
    assert "conv_in.weight: file (7, 3, 3, 3) vs model (32, 3, 3, 3)" in message


def test_unsupported_diffusers_config_is_refused(tmp_path):
    from ldm_lite.models.unet_loading import unet_fields_from_diffusers
    with pytest.raises(ValueError, match="attention must sit at the same levels"):
        unet_fields_from_diffusers({**DDPM_CIFAR10_CONFIG, "up_block_types": ["UpBlock2D"] * 4})
    with pytest.raises(ValueError, match="time_embedding_type"):
        unet_fields_from_diffusers({**DDPM_CIFAR10_CONFIG, "time_embedding_type": "fourier"})


def test_save_load_roundtrip_and_training_checkpoints(tmp_path):
    model = tiny_model(num_classes=3, learn_sigma=True)
    ema = tiny_model(seed=1, num_classes=3, learn_sigma=True)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.tensor([0, 3])
    with torch.no_grad():
        expected, expected_ema = model(x, t, y), ema(x, t, y)
    save_unet(model, tmp_path / "unet.safetensors")
    checkpoint = {"format": "ldm_lite.train.v1", "unet_config": dataclasses.asdict(model.config),
                  "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": {}, "step": 7, "rng": None,
                  "config": {}}
    (tmp_path / "run").mkdir()
    torch.save(checkpoint, tmp_path / "run" / "checkpoint.pt")
    cases = [(tmp_path / "unet.safetensors", True, expected), (tmp_path / "run" / "checkpoint.pt", False, expected),
             (tmp_path / "run" / "checkpoint.pt", True, expected_ema), (tmp_path / "run", True, expected_ema)]
    for path, use_ema, reference in cases:
        loaded = load_unet(path, use_ema=use_ema).eval()
        assert loaded.config == model.config
        with torch.no_grad():
            assert torch.equal(loaded(x, t, y), reference), (path, use_ema)


def test_mid_block_hook_reads_and_edits_h():
    model = tiny_model()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 600])
    captured = []

    def capture(h):
        captured.append(h.clone())
        return h

    with torch.no_grad():
        baseline = model(x, t)
        model.mid_block_hook = capture
        same = model(x, t)
        direction = torch.randn_like(captured[0][0])
        model.mid_block_hook = lambda h: h + 2.0 * direction
        edited = model(x, t)
        model.mid_block_hook = None
        after = model(x, t)
    assert captured[0].shape == (2, 64, 4, 4)  # (B, C_mid, 16 / 4, 16 / 4) for tiny at 16x16
    assert torch.equal(same, baseline) and torch.equal(after, baseline)
    assert (edited - baseline).abs().mean() > 1e-3


def test_class_conditioning_null_label():
    model = tiny_model(num_classes=3)
    x, t = torch.randn(4, 3, 16, 16), torch.full((4,), 250)
    with torch.no_grad():
        out_none = model(x, t)
        out_null = model(x, t, torch.full((4,), 3))
        out_cls = model(x, t, torch.tensor([0, 1, 2, 0]))
    assert model.class_embedding.num_embeddings == 4  # 3 classes + the null class
    assert torch.equal(out_none, out_null)
    assert (out_cls - out_null).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    with pytest.raises(ValueError, match="unconditional"):
        tiny_model()(x, t, torch.zeros(4, dtype=torch.long))


def test_learned_sigma_and_scalar_timestep():
    model = tiny_model(learn_sigma=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x, 400)
        assert out.shape == (2, 6, 16, 16) and out.is_contiguous()
        assert torch.equal(out, model(x, torch.tensor([400, 400])))
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.tensor([1, 2, 3]))


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 250.5])
    emb = timestep_embedding(t, 6, flip_sin_to_cos=False, freq_shift=1)  # freqs 10000^(-i/2), i = 0, 1, 2
    freqs = torch.tensor([1.0, 0.01, 1e-4])
    torch.testing.assert_close(emb, torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1))
    emb = timestep_embedding(t, 7, flip_sin_to_cos=True, freq_shift=0)  # freqs 10000^(-i/3), cos first, pad
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)])
    angles = t[:, None] * freqs
    torch.testing.assert_close(emb[:, :6], torch.cat([torch.cos(angles), torch.sin(angles)], 1))
    assert torch.equal(emb[:, 6], torch.zeros(3)) and math.isclose(emb[1, 0].item(), math.cos(1.0), rel_tol=1e-6)


def test_every_parameter_gets_a_gradient_in_training():
    model = tiny_model(num_classes=2, dropout=0.1, time_conditioning="scale_shift").train()
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 999]), torch.tensor([0, 2]))
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_bf16_autocast_output_close_to_float32():
    model = tiny_model()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    with torch.no_grad():
        reference = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t)
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()
    model.mid_block_hook = lambda h: h + torch.ones(h.shape[1:])  # a float32 edit inside a bf16 forward
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x, t).shape == reference.shape


def test_model_cast_to_bf16_takes_float32_input():
    model = tiny_model()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    with torch.no_grad():
        reference = model(x, t)
        low = model.to(torch.bfloat16)(x, t)  # weights, activations and time embedding all bf16
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_config_errors():
    with pytest.raises(ValueError, match="unknown UNet preset"):
        unet_preset("huge")
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        unet_preset("tiny", channels=3)
    with pytest.raises(ValueError, match="time_conditioning"):
        UNetConfig(time_conditioning="film")
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(base_channels=48)
    assert unet_config_from_dict(dataclasses.asdict(unet_preset("small"))) == unet_preset("small")
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\)"):
        tiny_model()(torch.randn(2, 1, 16, 16), 0)


def textbook_attention_block(block, x):
    """GroupNorm, q/k/v/out Linear layers applied as written in Vaswani et al. eq. 1, per head, then + x."""
    B, C, H, W = x.shape
    d = C // block.heads
    h = block.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    q, k, v = (layer(h).view(B, H * W, block.heads, d).transpose(1, 2)
               for layer in (block.to_q, block.to_k, block.to_v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = block.to_out[0]((weights @ v).transpose(1, 2).reshape(B, H * W, C))
    return x + out.transpose(1, 2).view(B, C, H, W)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_block_matches_the_textbook_form_with_gradients(heads, channels_last):
    """The folded form (one 1x1 conv for q, k, v; 1 / sqrt(d) in q's weights; one head's W_o inside v's)
    against the plain formula in float64: outputs and every parameter's gradient."""
    torch.manual_seed(0)
    block = AttentionBlock(16, heads, UNetConfig(base_channels=16, channel_mult=(1,), norm_groups=4)).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 16, 4, 5, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    x.requires_grad_()
    grad_out = torch.randn(2, 16, 4, 5, dtype=torch.float64)
    outputs, grads = [], []
    for form in (block, lambda x: textbook_attention_block(block, x)):
        block.zero_grad()
        x.grad = None
        out = form(x)
        (out * grad_out).sum().backward()
        outputs.append(out)
        grads.append([p.grad.clone() for p in block.parameters()] + [x.grad.clone()])
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-12, rtol=0)
    for ours, expected in zip(*grads):
        torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)
    assert outputs[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with torch.no_grad():  # the in-place bias add of the sampling path
        torch.testing.assert_close(block(x), outputs[1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_bf16_attention_block_is_close_to_the_textbook_form(grad):
    """The bf16 path (explicit matmuls, in-place bias add without autograd) against float64."""
    torch.manual_seed(0)
    block = AttentionBlock(32, 1, UNetConfig(base_channels=32, channel_mult=(1,), norm_groups=8))
    x = torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        expected = textbook_attention_block(block.double(), x.double())
    with torch.set_grad_enabled(grad):
        actual = block.bfloat16()(x.bfloat16())
    assert actual.dtype == torch.bfloat16
    assert (actual.double() - expected).abs().max() < 0.05  # |values| < 4; bf16 keeps 8 bits


def test_bf16_attention_matches_sdpa():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=generator) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    actual = attention(*(t.transpose(-1, -2).bfloat16() for t in (q, k, v))).transpose(-1, -2)
    assert actual.dtype == torch.bfloat16
    assert (actual.float() - expected).abs().max() < 0.03  # bf16 has 8 mantissa bits; |values| < 3 here


def test_dropout_keeps_the_right_fraction_and_mean():
    torch.manual_seed(0)
    x = torch.ones(64, 32, 32, 32)
    out = dropout(x, 0.1, training=True)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002  # 2M draws: std of the fraction is 0.0002
    assert abs(out.mean().item() - 1.0) < 0.003
    assert torch.allclose(out[kept], torch.full_like(out[kept], 65536 / (65536 - 6554)))
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0, training=True) is x
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.1, training=True), out)  # follows torch.manual_seed


@pytest.mark.parametrize("channels_last", [True, False])
def test_memory_format_does_not_change_outputs(channels_last):
    model = tiny_model(time_conditioning="scale_shift")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    with torch.no_grad():
        reference = model(x, t)
        model.channels_last = channels_last
        torch.testing.assert_close(model(x, t), reference, atol=1e-5, rtol=1e-5)


def _level_layouts(model, x, t) -> list:
    """Memory layout ("cl" or "nchw") of the first residual block's input at each level: down levels 0, 1, ...,
    then up levels from the deepest to 0 (an up block's input is its upsampled h concatenated with a skip)."""
    layouts = []
    hooks = [block.resnets[0].register_forward_pre_hook(
        lambda module, args: layouts.append("cl" if not args[0].is_contiguous() else "nchw"))
        for block in [*model.down_blocks, *model.up_blocks]]
    try:
        model(x, t)
    finally:
        for hook in hooks:
            hook.remove()
    return layouts


def test_layout_policy_per_level_and_mode():
    model = tiny_model()  # levels at 32x32, 16x16, 8x8 for a 32x32 input
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 700])
    sampling_layout = ["cl", "nchw", "nchw", "nchw", "nchw", "cl"]  # channels_last from 32x32 up, down then up
    with torch.no_grad():
        assert _level_layouts(model, x, t) == ["cl"] * 6  # float32: channels_last throughout
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _level_layouts(model, x, t) == sampling_layout  # bf16 sampling
            reference = model(x, t).float()
            model.channels_last = False
            assert _level_layouts(model, x, t) == ["nchw"] * 6
            forced = model(x, t).float()
    assert (forced - reference).abs().max() < 0.02 * reference.abs().max()  # same maths, bf16 rounding apart
    model.channels_last = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _level_layouts(model, x, t) == ["nchw"] * 6  # bf16 training: NCHW
    with torch.no_grad():
        assert _level_layouts(model.to(torch.bfloat16), x, t) == sampling_layout  # bf16 weights, no autocast
