"""Triton mask pooling against the PyTorch reference, forward and backward.

Runs on CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1). Expected
values come from the reference in float64 on the stored inputs (upcast), with autograd for the
gradients. The kernels compute in float32 ("ieee" tl.dot, no TF32), so:
  * float32: max error <= 1e-5 * max|expected|;
  * float16 / bfloat16: plus one final rounding of each result to the storage dtype, at most half
    an ulp: 2^-11 (float16) relative to the value. For bfloat16 the bound is a whole ulp, 2^-7,
    because Triton 3.7's interpreter converts float32 to bfloat16 by truncation (compiled kernels
    round to nearest, half an ulp).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_checks import assert_close, check_mask_pool, triton_backend  # noqa: F401 (autouse fixture)

import deris.kernels as kernels

# The package's mask_pool attribute is the public function, which hides the submodule.
mask_pool_module = importlib.import_module("deris.kernels.mask_pool")


@pytest.mark.parametrize("batch, masks, channels, height, width", [
    pytest.param(1, 1, 16, 4, 4, id="one-cell"),
    pytest.param(3, 20, 37, 32, 48, id="batch3-20masks"),
    pytest.param(2, 7, 64, 16, 28, id="non-square"),
    pytest.param(1, 5, 130, 8, 12, id="130-channels"),
])
def test_mask_pool_float32(batch, masks, channels, height, width):
    check_mask_pool(batch, masks, channels, height, width, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mask_pool_half_storage(dtype):
    check_mask_pool(2, 10, 48, 24, 32, dtype)


def test_mask_pool_several_blocks_and_splits(monkeypatch):
    """Force 16-wide blocks so masks, channels and cells all span several blocks, the last partial,
    and split the 60 cells into ranges of 32 and 28 (the split a small batch gets on a GPU)."""
    monkeypatch.setattr(mask_pool_module, "mask_pool_launch_config", lambda masks, channels, cells: dict(
        BLOCK_N=16, BLOCK_C=16, BLOCK_K=16, num_warps=4, num_stages=1))
    monkeypatch.setattr(mask_pool_module, "_cell_splits", lambda programs, cells, block_k, device: 2)
    check_mask_pool(2, 20, 37, 24, 40, torch.float32)


def test_mask_pool_non_contiguous_inputs():
    logits = torch.randn(2, 3, 16, 12)
    features = torch.randn(2, 5, 16, 12)
    expected = kernels.mask_pool_reference(logits, features)
    logits_view = logits.transpose(2, 3).contiguous().transpose(2, 3)
    features_view = torch.stack([features, features], dim=2)[:, :, 0]
    assert not (logits_view.is_contiguous() or features_view.is_contiguous())
    assert_close(kernels.mask_pool(logits_view, features_view), expected.double(), torch.float32, "output")


@pytest.mark.parametrize("logits, features, message", [
    (torch.zeros(1, 3, 16), torch.zeros(1, 4, 16, 16),
     r"mask_logits has shape \[1, 3, 16\]; expected \[B, N, H, W\]"),
    (torch.zeros(1, 3, 16, 16), torch.zeros(2, 4, 16, 16),
     r"features has shape \[2, 4, 16, 16\]; expected \[1, C, 16, 16\]"),
    (torch.zeros(1, 3, 16, 18), torch.zeros(1, 4, 16, 18), "H and W must be divisible by 4, got 16x18"),
    (torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 8, 8, dtype=torch.float16), "must share one dtype"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.int64), torch.zeros(1, 4, 8, 8),
     "mask_logits has dtype torch.int64; accepted"),
    (torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 8, 8, device="meta"), "must be on one device"),
])
def test_bad_inputs_raise_clear_errors(logits, features, message):
    with pytest.raises(ValueError, match=message):
        kernels.mask_pool(logits, features)
