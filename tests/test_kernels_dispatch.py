"""Backend selection of deris.kernels: set_backend / backend(), DERIS_KERNELS, the device default,
and the errors when the Triton backend cannot run."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest
import torch

import deris.kernels as kernels

triton_support = importlib.import_module("deris.kernels._triton_support")

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only a device description: nothing here allocates on it


@pytest.fixture(autouse=True)
def clean_selection(monkeypatch):
    monkeypatch.delenv("DERIS_KERNELS", raising=False)
    kernels.set_backend(None)
    yield
    kernels.set_backend(None)


@pytest.fixture
def calls(monkeypatch):
    """Replace the six implementations with recorders: which one did each public call reach?"""
    record = []
    for name in ("ms_deform_attn_reference", "ms_deform_attn_triton", "ms_deform_attn_fused_reference",
                 "ms_deform_attn_fused_triton", "mask_pool_reference", "mask_pool_triton"):
        monkeypatch.setattr(kernels, name, lambda *args, _name=name: record.append(_name))
    return record


def call_all(device_tensor: torch.Tensor) -> None:
    kernels.ms_deform_attn(device_tensor, None, None, None, None)
    kernels.ms_deform_attn_fused(device_tensor, None, None, None, None, None)
    kernels.mask_pool(device_tensor, None)


def test_default_is_reference_on_cpu_and_triton_on_cuda():
    assert kernels.select_backend(CPU) == "torch"
    assert kernels.select_backend(CUDA) == "triton"


def test_default_routes_cpu_tensors_to_the_references(calls):
    call_all(torch.zeros(1))
    assert calls == ["ms_deform_attn_reference", "ms_deform_attn_fused_reference", "mask_pool_reference"]


def test_environment_variable_forces_a_backend(monkeypatch, calls):
    monkeypatch.setenv("DERIS_KERNELS", "triton")
    call_all(torch.zeros(1))
    assert calls == ["ms_deform_attn_triton", "ms_deform_attn_fused_triton", "mask_pool_triton"]
    monkeypatch.setenv("DERIS_KERNELS", "torch")
    assert kernels.select_backend(CUDA) == "torch"


def test_empty_environment_variable_means_unset(monkeypatch):
    monkeypatch.setenv("DERIS_KERNELS", "")
    assert kernels.select_backend(CPU) == "torch"
    assert kernels.select_backend(CUDA) == "triton"


def test_bad_environment_variable_names_the_accepted_values(monkeypatch):
    monkeypatch.setenv("DERIS_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"DERIS_KERNELS.*'cuda'.*accepted: 'torch', 'triton'"):
        kernels.mask_pool(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))


def test_set_backend_beats_the_environment(monkeypatch):
    monkeypatch.setenv("DERIS_KERNELS", "triton")
    kernels.set_backend("torch")
    assert kernels.select_backend(CUDA) == "torch"
    kernels.set_backend(None)
    assert kernels.select_backend(CPU) == "triton"


def test_backend_context_manager_restores_the_previous_override():
    kernels.set_backend("torch")
    with kernels.backend("triton"):
        assert kernels.select_backend(CPU) == "triton"
        with kernels.backend(None):
            assert kernels.select_backend(CUDA) == "triton"
            assert kernels.select_backend(CPU) == "torch"
        assert kernels.select_backend(CPU) == "triton"
    assert kernels.select_backend(CUDA) == "torch"


def test_backend_context_manager_restores_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with kernels.backend("triton"):
            raise RuntimeError("boom")
    assert kernels.select_backend(CPU) == "torch"


def test_bad_backend_names_are_rejected():
    with pytest.raises(ValueError, match=r"unknown kernel backend 'gpu'; accepted: 'torch', 'triton'"):
        kernels.set_backend("gpu")
    with pytest.raises(ValueError, match="accepted"):
        with kernels.backend("Triton"):
            pass


def test_triton_on_cpu_without_the_interpreter_says_how_to_enable_it(monkeypatch):
    monkeypatch.setattr(triton_support, "INTERPRETING", False)
    kernels.set_backend("triton")
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 .* before importing deris"):
        kernels.mask_pool(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))


def test_import_and_torch_backend_work_without_triton():
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        import deris.kernels as kernels
        assert kernels.select_backend(torch.device("cuda")) == "torch"
        out = kernels.mask_pool(torch.randn(1, 2, 8, 8), torch.randn(1, 3, 8, 8))
        assert out.shape == (1, 2, 3)
        kernels.set_backend("triton")
        try:
            kernels.mask_pool(torch.randn(1, 2, 8, 8), torch.randn(1, 3, 8, 8))
        except RuntimeError as error:
            assert "not installed" in str(error), error
        else:
            raise AssertionError("the Triton backend ran without triton")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
