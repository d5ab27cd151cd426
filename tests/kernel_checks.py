"""Shared by the kernel tests: the Triton backend for every test, tolerance-aware comparison, MSDA
inputs whose samples keep clear of pixel edges, and the checks of each kernel against its reference
(on any device: tests/test_kernels_gpu.py runs them compiled on a GPU at DeRIS's shapes)."""

from __future__ import annotations

import pytest
import torch

import deris.kernels as kernels

FP32_TOLERANCE = 1e-5
# Half an ulp of the one final rounding to the storage dtype, on top of fp32 arithmetic (see the
# test modules' docstrings; bf16 is a whole ulp because the interpreter truncates).
ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.delenv("DERIS_KERNELS", raising=False)
    with kernels.backend("triton"):
        yield


def assert_close(actual: torch.Tensor | None, expected: torch.Tensor | None, dtype: torch.dtype, what: str) -> None:
    assert actual is not None and expected is not None, f"{what}: missing (a gradient that was never computed?)"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    scale = expected.abs().max().item()
    error = (actual.double() - expected).abs().max().item()
    tolerance = (FP32_TOLERANCE + ROUNDING[dtype]) * scale
    assert error <= tolerance, f"{what}: max error {error:.3g} > {tolerance:.3g} (max|expected| {scale:.3g})"


def pixel_locations(shapes, batch, queries, heads, points, generator) -> torch.Tensor:
    """[B, Q, H, L, P, 2] float64 normalised locations whose pixel coordinates stay >= 0.05 px
    from an integer, so that no rounding (storage or float32) moves a sample across a pixel edge,
    where the location gradient jumps. Pixel coordinates run over [-1.95, W + 1.95): inside,
    partly outside and entirely outside the level (locations outside [0, 1])."""
    levels = []
    for height, width in shapes:
        size = torch.tensor([width, height], dtype=torch.float64)
        cells = torch.floor(torch.rand(batch, queries, heads, points, 2, generator=generator, dtype=torch.float64)
                            * (size + 4)) - 2
        fractions = 0.05 + 0.9 * torch.rand(batch, queries, heads, points, 2, generator=generator, dtype=torch.float64)
        # align_corners=False: pixel coordinate x = loc * W - 0.5.
        levels.append((cells + fractions + 0.5) / size)
    return torch.stack(levels, dim=3)


def msda_inputs(batch, heads, head_dim, shapes, points, queries, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = sum(h * w for h, w in shapes)
    value = torch.randn(batch, keys, heads, head_dim, generator=generator, dtype=torch.float64)
    locations = pixel_locations(shapes, batch, queries, heads, points, generator)
    logits = torch.randn(batch, queries, heads, len(shapes) * points, generator=generator, dtype=torch.float64)
    weights = logits.softmax(-1).view(batch, queries, heads, len(shapes), points)
    grad_out = torch.randn(batch, queries, heads * head_dim, generator=generator, dtype=torch.float64)
    return value, locations, weights, grad_out


def fused_inputs(batch, heads, head_dim, shapes, points, queries, seed=0):
    """Raw projections whose locations ref + offset / size are pixel-safe (see pixel_locations)."""
    generator = torch.Generator().manual_seed(seed)
    value, locations, _, grad_out = msda_inputs(batch, heads, head_dim, shapes, points, queries, seed)
    reference_points = torch.rand(batch, queries, len(shapes), 2, generator=generator, dtype=torch.float64)
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)[:, None, :]  # [L, 1, (W, H)]
    offsets = (locations - reference_points[:, :, None, :, None, :]) * sizes
    logits = 2 * torch.randn(batch, queries, heads, len(shapes) * points, generator=generator, dtype=torch.float64)
    return value, reference_points, offsets, logits, grad_out


def run(fn, inputs, grad_out, *args):
    """fn(inputs[0], *args, *inputs[1:]) and the gradients of (output * grad_out).sum()."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(leaves[0], *args, *leaves[1:])
    out.backward(grad_out)
    return out.detach(), [leaf.grad for leaf in leaves]


def check_msda(batch, heads, head_dim, shapes, points, queries, dtype, spatial_as_tensor=False, device="cpu"):
    value, locations, weights, grad_out = msda_inputs(batch, heads, head_dim, shapes, points, queries)
    grad_out = grad_out.to(device)
    stored = [t.to(device, dtype) for t in (value, locations, weights)]
    spatial = torch.tensor(shapes) if spatial_as_tensor else shapes
    starts = torch.tensor([0] + [h * w for h, w in shapes], device=device).cumsum(0)[:-1]
    expected, expected_grads = run(kernels.ms_deform_attn_reference, [t.double() for t in stored],
                                   grad_out.to(dtype).double(), spatial, starts)
    actual, grads = run(kernels.ms_deform_attn, stored, grad_out.to(dtype), spatial, starts)
    assert actual.shape == (batch, queries, heads * head_dim)
    assert_close(actual, expected, dtype, "output")
    for name, grad, expected_grad in zip(("value", "locations", "weights"), grads, expected_grads):
        assert_close(grad, expected_grad, dtype, f"grad {name}")


def check_fused(batch, heads, head_dim, shapes, points, queries, dtype, device="cpu"):
    value, reference_points, offsets, logits, grad_out = fused_inputs(batch, heads, head_dim, shapes, points, queries)
    grad_out = grad_out.to(device)
    stored = [t.to(device, dtype) for t in (value, reference_points, offsets, logits)]
    expected, expected_grads = run(kernels.ms_deform_attn_fused_reference, [t.double() for t in stored],
                                   grad_out.to(dtype).double(), shapes, None)
    actual, grads = run(kernels.ms_deform_attn_fused, stored, grad_out.to(dtype), shapes, None)
    assert_close(actual, expected, dtype, "output")
    for name, grad, expected_grad in zip(("value", "reference_points", "offsets", "logits"), grads, expected_grads):
        assert_close(grad, expected_grad, dtype, f"grad {name}")


def check_mask_pool(batch, masks, channels, height, width, dtype, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    # Logits of a few units so the sigmoid is neither flat nor saturated everywhere.
    logits = (3 * torch.randn(batch, masks, height, width, generator=generator, dtype=torch.float64)).to(device, dtype)
    features = torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64).to(device, dtype)
    grad_out = torch.randn(batch, masks, channels, generator=generator, dtype=torch.float64).to(device, dtype)

    expected_inputs = [t.double().requires_grad_() for t in (logits, features)]
    expected = kernels.mask_pool_reference(*expected_inputs)
    expected.backward(grad_out.double())
    inputs = [t.clone().requires_grad_() for t in (logits, features)]
    actual = kernels.mask_pool(*inputs)
    actual.backward(grad_out)

    assert actual.shape == (batch, masks, channels)
    assert_close(actual, expected.detach(), dtype, "output")
    assert_close(inputs[0].grad, expected_inputs[0].grad, dtype, "grad mask_logits")
    assert_close(inputs[1].grad, expected_inputs[1].grad, dtype, "grad features")
