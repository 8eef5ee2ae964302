"""ldm_lite.models.ops against the textbook forms: nearest 2x + 3x3 conv, pad + stride-2 conv, F.silu; values and
gradients in float64, layouts and dtypes kept, SiLU in place exactly when autograd does not need its input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_lite.models.ops import Downsample, Upsample, inplace_silu, norm_silu, upsample_conv

LAYOUTS = [torch.contiguous_format, torch.channels_last]


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def grads(output, inputs):
    """Gradients of a fixed random projection of `output`, so every output element weighs differently."""
    return torch.autograd.grad((output * randn(*output.shape, seed=9)).sum(), inputs)


def textbook_upsample(x, weight, bias):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_upsample_conv_equals_nearest_then_conv_with_gradients(layout, with_bias):
    x = randn(2, 5, 6, 7, seed=1).contiguous(memory_format=layout).requires_grad_()  # odd, non-square size
    weight = randn(4, 5, 3, 3, seed=2).requires_grad_()
    bias = randn(4, seed=3).requires_grad_() if with_bias else None
    inputs = (x, weight) + ((bias,) if with_bias else ())
    ours, expected = upsample_conv(x, weight, bias), textbook_upsample(x, weight, bias)
    assert ours.shape == (2, 4, 12, 14) and ours.dtype == torch.float64
    assert ours.is_contiguous(memory_format=layout)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)  # |values| ~ 10: float64 rounding only
    for got, want in zip(grads(ours, inputs), grads(expected, inputs)):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=0)  # sums of up to ~300 products


@pytest.mark.parametrize("layout", LAYOUTS)
def test_upsample_in_bf16_is_close_to_float64_and_keeps_dtype_and_layout(layout):
    x, weight, bias = randn(2, 8, 5, 5, seed=4), randn(8, 8, 3, 3, seed=5) / 8, randn(8, seed=6)
    expected = textbook_upsample(x, weight, bias)
    ours = upsample_conv(x.bfloat16().contiguous(memory_format=layout), weight.bfloat16(), bias.bfloat16())
    assert ours.dtype == torch.bfloat16 and ours.is_contiguous(memory_format=layout)
    assert (ours.double() - expected).abs().max() < 0.05  # |values| < 5; bf16 keeps 8 significant bits


def test_upsample_module_keeps_the_conv_parameter_names():
    torch.manual_seed(0)
    module = Upsample(3).double()
    assert sorted(module.state_dict()) == ["conv.bias", "conv.weight"]
    x = randn(1, 3, 4, 4, seed=7)
    expected = textbook_upsample(x, module.conv.weight, module.conv.bias)
    torch.testing.assert_close(module(x), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("padding", [0, 1])
def test_downsample_equals_explicit_pad_then_strided_conv(layout, padding):
    torch.manual_seed(0)
    module = Downsample(4, padding).double()
    assert sorted(module.state_dict()) == ["conv.bias", "conv.weight"]
    x = randn(2, 4, 8, 6, seed=8).contiguous(memory_format=layout).requires_grad_()
    w, b = module.conv.weight, module.conv.bias
    pads = (0, 1, 0, 1) if padding == 0 else (1, 1, 1, 1)  # DDPM / CompVis: right and bottom only; ADM: all sides
    expected = F.conv2d(F.pad(x, pads), w, b, stride=2)
    ours = module(x)
    assert ours.shape == (2, 4, 4, 3) and ours.is_contiguous(memory_format=layout)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)
    for got, want in zip(grads(ours, (x, w, b)), grads(expected, (x, w, b))):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="padding must be 0 or 1"):
        Downsample(4, 2)


def test_silu_without_autograd_overwrites_its_input():
    x = randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    expected = F.silu(x)  # not in place
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            fresh = x.clone()
            out = inplace_silu(fresh)
        assert out.data_ptr() == fresh.data_ptr() and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
    fresh = x.clone()  # autograd on, but nothing requires grad (frozen weights): nothing needs the input
    assert inplace_silu(fresh).data_ptr() == fresh.data_ptr()


def test_silu_with_autograd_keeps_its_input_and_has_the_textbook_gradient():
    leaf = randn(2, 3, 4, 5).requires_grad_()
    h = leaf * 2.0  # a non-leaf that autograd tracks, like a GroupNorm output during training
    before = h.detach().clone()
    out = inplace_silu(h)
    assert out.data_ptr() != h.data_ptr() and torch.equal(h.detach(), before)
    (got,) = grads(out, (leaf,))
    (want,) = grads(F.silu(leaf * 2.0), (leaf,))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with torch.no_grad():  # a tensor that requires grad is never overwritten, even with autograd off
        assert inplace_silu(leaf).data_ptr() != leaf.data_ptr()


@pytest.mark.parametrize("grad", [False, True])
def test_norm_silu_equals_silu_of_group_norm(grad):
    torch.manual_seed(0)
    norm = nn.GroupNorm(2, 6, eps=1e-6).double()
    with torch.no_grad():  # off the ones / zeros init, so a swapped weight and bias would show
        norm.weight.copy_(randn(6, seed=10))
        norm.bias.copy_(randn(6, seed=11))
    x = randn(2, 6, 4, 4, seed=12).requires_grad_(grad)
    expected = F.silu(F.group_norm(x, 2, norm.weight, norm.bias, 1e-6))
    with torch.set_grad_enabled(grad):
        ours = norm_silu(x, norm)
    torch.testing.assert_close(ours, expected, atol=1e-14, rtol=0)
    if grad:
        inputs = (x, norm.weight, norm.bias)
        for got, want in zip(grads(ours, inputs), grads(expected, inputs)):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
