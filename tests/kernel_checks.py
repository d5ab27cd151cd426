"""Shared by the kernel tests: the Triton backend for every test, tolerance-aware comparison, and
MSDA inputs whose samples keep clear of pixel edges."""

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
