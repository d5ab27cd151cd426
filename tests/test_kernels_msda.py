"""Triton MSDA (plain and fused entries) against the PyTorch reference, forward and backward.

Runs on CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1). The
interpreter runs programs one after another at ~0.1 s each, so the shapes keep B * H small and
Q <= 64: the launcher then uses one program per (batch, head).

Expected values come from the reference evaluated in float64 on the very values the kernel reads
(the stored inputs, upcast), with autograd for the gradients. The kernel's own error is then:
  * float32 storage: float32 arithmetic only -> max error <= 1e-5 * max|expected|;
  * float16 / bfloat16 storage: the same float32 arithmetic plus one final rounding of each result
    to the storage dtype (the kernel computes and accumulates in float32, the value gradient in a
    float32 buffer). Rounding to nearest costs at most half an ulp, 2^-11 (float16) or 2^-8
    (bfloat16) relative to the value, hence <= 2^-11 * max|expected| (2^-8 for bfloat16). The
    tolerance is that plus the float32 budget. Exception: Triton 3.7's interpreter converts
    float32 to bfloat16 by truncation, which costs up to a whole ulp (2^-7 relative); compiled
    kernels round to nearest. The bfloat16 bound is 2^-7 so the test holds for both.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_checks import (  # noqa: F401 (triton_backend: autouse fixture)
    assert_close,
    check_fused,
    check_msda,
    fused_inputs,
    msda_inputs,
    run,
    triton_backend,
)

import deris.kernels as kernels

# The package's ms_deform_attn attribute is the public function, which hides the submodule.
msda_module = importlib.import_module("deris.kernels.ms_deform_attn")


# (batch, heads, head_dim, level shapes, points, queries): odd, non-square and 1-pixel-wide levels,
# 1-4 levels, 1-8 points, 1-8 heads, head dims 16-64 (48 and 24 are not powers of two).
MSDA_CASES = [
    pytest.param(1, 1, 16, [(7, 5)], 1, 10, id="1level-1point"),
    pytest.param(3, 2, 32, [(9, 13), (5, 7)], 4, 37, id="batch3-2levels"),
    pytest.param(1, 8, 64, [(6, 6), (3, 3), (2, 2), (1, 1)], 2, 20, id="8heads-4levels"),
    pytest.param(2, 3, 48, [(11, 4), (6, 2), (3, 1)], 8, 50, id="8points-dim48"),
    pytest.param(1, 2, 24, [(40, 17), (20, 9)], 3, 64, id="wide-levels-dim24"),
    pytest.param(3, 8, 32, [(12, 12), (6, 6), (3, 3)], 4, 64, id="deris-like-batch3-8heads"),
]


@pytest.mark.parametrize("batch, heads, head_dim, shapes, points, queries", MSDA_CASES)
def test_msda_float32(batch, heads, head_dim, shapes, points, queries):
    check_msda(batch, heads, head_dim, shapes, points, queries, torch.float32)


def test_msda_spatial_shapes_as_tensor():
    check_msda(1, 2, 16, [(5, 9), (3, 5)], 2, 12, torch.float32, spatial_as_tensor=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_msda_half_storage(dtype):
    check_msda(3, 2, 32, [(9, 13), (5, 7), (3, 4)], 4, 33, dtype)


def test_msda_mixed_dtypes():
    """float16 values with float32 locations and weights: output and value grad in float16."""
    value, locations, weights, grad_out = msda_inputs(1, 2, 16, [(6, 10), (3, 5)], 2, 16)
    stored = [value.half(), locations.float(), weights.float()]
    expected, expected_grads = run(kernels.ms_deform_attn_reference, [t.double() for t in stored],
                                   grad_out.half().double(), [(6, 10), (3, 5)], None)
    actual, grads = run(kernels.ms_deform_attn, stored, grad_out.half(), [(6, 10), (3, 5)], None)
    assert_close(actual, expected, torch.float16, "output")
    for name, grad, expected_grad, dtype in zip(("value", "locations", "weights"), grads, expected_grads,
                                                (torch.float16, torch.float32, torch.float32)):
        assert_close(grad, expected_grad, dtype, f"grad {name}")


FUSED_CASES = [
    pytest.param(3, 2, 32, [(9, 13), (5, 7)], 4, 37, torch.float32, id="fp32-batch3"),
    pytest.param(1, 4, 16, [(6, 6), (3, 3), (2, 2), (1, 1)], 3, 24, torch.float32, id="fp32-4levels"),
    pytest.param(1, 2, 64, [(11, 7)], 8, 20, torch.float32, id="fp32-8points-dim64"),
    pytest.param(2, 2, 32, [(9, 13), (5, 7), (3, 4)], 4, 30, torch.float16, id="fp16"),
    pytest.param(1, 2, 16, [(8, 6), (4, 3)], 2, 16, torch.bfloat16, id="bf16"),
]


@pytest.mark.parametrize("batch, heads, head_dim, shapes, points, queries, dtype", FUSED_CASES)
def test_msda_fused(batch, heads, head_dim, shapes, points, queries, dtype):
    check_fused(batch, heads, head_dim, shapes, points, queries, dtype)


def test_several_query_blocks(monkeypatch):
    """Force BLOCK_Q = 16 (forward and backward) so 40 queries take three programs, the last one
    partly past the end."""
    forward = msda_module.msda_forward_config
    monkeypatch.setattr(msda_module, "msda_forward_config", lambda queries, head_dim, element_size, interpreting: dict(
        forward(queries, head_dim, element_size, interpreting), BLOCK_Q=16))
    check_msda(2, 1, 16, [(5, 7), (3, 3)], 2, 40, torch.float32)
    check_fused(1, 1, 16, [(5, 7), (3, 3)], 2, 40, torch.float32)


def test_non_contiguous_inputs():
    value, locations, weights, grad_out = msda_inputs(2, 2, 16, [(5, 6), (2, 3)], 2, 12)
    value, locations, weights = value.float(), locations.float(), weights.float()
    expected = kernels.ms_deform_attn_reference(value, [(5, 6), (2, 3)], None, locations, weights)
    # The same values behind transposed and sliced views.
    value_view = value.transpose(1, 2).contiguous().transpose(1, 2)
    locations_view = torch.cat([locations, locations], dim=-1)[..., :2]
    weights_view = weights.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (value_view.is_contiguous() or locations_view.is_contiguous() or weights_view.is_contiguous())
    actual = kernels.ms_deform_attn(value_view, [(5, 6), (2, 3)], None, locations_view, weights_view)
    assert_close(actual, expected.double(), torch.float32, "output")


def test_far_outside_locations_read_only_padding():
    """Locations far outside every level (and huge ones) read only padding: zero output and grads."""
    value = torch.randn(1, 20, 1, 16)
    locations = torch.tensor([-5.0, 1e9]).repeat(1, 3, 1, 1, 2, 1)
    weights = torch.full((1, 3, 1, 1, 2), 0.5)
    value.requires_grad_()
    out = kernels.ms_deform_attn(value, [(4, 5)], None, locations, weights)
    out.sum().backward()
    assert value.grad is not None
    assert out.abs().max() == 0 and value.grad.abs().max() == 0


def _good_args():
    value, locations, weights, _ = msda_inputs(1, 2, 16, [(4, 4), (2, 2)], 2, 8)
    return dict(value=value.float(), spatial_shapes=[(4, 4), (2, 2)], level_start_index=torch.tensor([0, 16]),
                sampling_locations=locations.float(), attention_weights=weights.float())


@pytest.mark.parametrize("change, message", [
    (dict(value=torch.zeros(1, 20, 32)), r"value has shape \[1, 20, 32\]; expected \[B, S, H, D\]"),
    (dict(value=torch.zeros(1, 20, 2, 16, dtype=torch.int32)), "value has dtype torch.int32; accepted"),
    (dict(spatial_shapes=[(4, 4), (2, 3)]), "value has 20 keys .* hold 22"),
    (dict(spatial_shapes=torch.tensor([[4.0, 4.0], [2.0, 2.0]])), "spatial_shapes must be an integer tensor"),
    (dict(spatial_shapes=[(4, 4), (0, 2)]), "all sizes positive"),
    (dict(level_start_index=torch.tensor([0, 16, 20])), r"level_start_index must have shape \[L\] = \[2\]"),
    (dict(sampling_locations=torch.zeros(1, 8, 2, 3, 2, 2)),
     r"sampling_locations has shape \[1, 8, 2, 3, 2, 2\]; expected \[1, Q, 2, 2, P, 2\]"),
    (dict(attention_weights=torch.zeros(1, 8, 2, 2, 3)),
     r"attention_weights has shape \[1, 8, 2, 2, 3\]; expected \[1, 8, 2, 2, 2\]"),
    (dict(attention_weights=torch.zeros(1, 8, 2, 2, 2, device="meta")), "must be on one device"),
])
def test_bad_inputs_raise_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        kernels.ms_deform_attn(**{**_good_args(), **change})


@pytest.mark.parametrize("change, message", [
    (dict(reference_points=torch.zeros(1, 8, 3, 2)),
     r"reference_points has shape \[1, 8, 3, 2\]; expected \[1, 8, 2, 2\]"),
    (dict(attention_logits=torch.zeros(1, 8, 2, 2, 2)),
     r"attention_logits has shape \[1, 8, 2, 2, 2\]; expected \[1, 8, 2, 4\]"),
    (dict(sampling_offsets=torch.zeros(1, 8, 2, 2, 2, 2, dtype=torch.float64)),
     "sampling_offsets has dtype torch.float64"),
])
def test_fused_bad_inputs_raise_clear_errors(change, message):
    value, reference_points, offsets, logits, _ = fused_inputs(1, 2, 16, [(4, 4), (2, 2)], 2, 8)
    args = dict(value=value.float(), spatial_shapes=[(4, 4), (2, 2)], level_start_index=None,
                reference_points=reference_points.float(), sampling_offsets=offsets.float(),
                attention_logits=logits.float())
    with pytest.raises(ValueError, match=message):
        kernels.ms_deform_attn_fused(**{**args, **change})


def test_first_call_in_inference_mode_then_training():
    """The per-shape level table is cached; one first built under inference_mode must still be
    usable by a later call that saves it for backward."""
    msda_module._level_table.cache_clear()
    value, locations, weights, _ = msda_inputs(1, 1, 16, [(3, 5)], 1, 4)
    value, locations, weights = value.float(), locations.float(), weights.float()
    with torch.inference_mode():
        kernels.ms_deform_attn(value, [(3, 5)], None, locations, weights)
    value.requires_grad_()
    kernels.ms_deform_attn(value, [(3, 5)], None, locations, weights).sum().backward()
    assert value.grad is not None
