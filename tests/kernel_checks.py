"""Shared by the kernel tests: the Triton backend for every test, and tolerance-aware comparison."""

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


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    scale = expected.abs().max().item()
    error = (actual.double() - expected).abs().max().item()
    tolerance = (FP32_TOLERANCE + ROUNDING[dtype]) * scale
    assert error <= tolerance, f"{what}: max error {error:.3g} > {tolerance:.3g} (max|expected| {scale:.3g})"
