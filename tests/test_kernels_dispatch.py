"""Backend selection of deris.kernels: backend() per context, set_backend process-wide,
DERIS_KERNELS, the device default, the errors when the Triton backend cannot run, and that an
export's choices stay in the exporting thread."""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator

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


def test_backend_blocks_beat_the_process_default_and_restore_it():
    kernels.set_backend("torch")
    with kernels.backend("triton"):
        assert kernels.select_backend(CPU) == "triton"
        with kernels.backend(None):  # lifts the enclosing block: the process default shows again
            assert kernels.select_backend(CUDA) == "torch"
        assert kernels.select_backend(CPU) == "triton"
    assert kernels.select_backend(CUDA) == "torch"
    kernels.set_backend(None)
    with kernels.backend(None):
        assert kernels.select_backend(CUDA) == "triton"
        assert kernels.select_backend(CPU) == "torch"


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


@contextlib.contextmanager
def held_open_in_thread(block: Callable[[], contextlib.AbstractContextManager], inside: Callable[[], object]
                        ) -> Iterator[list]:
    """Run ``with block(): inside()`` in a second thread and keep that block open while the caller's
    ``with`` body runs; yields the list that receives inside()'s result (or its exception)."""
    entered, release = threading.Event(), threading.Event()
    results: list = []

    def hold() -> None:
        try:
            with block():
                results.append(inside())
                entered.set()
                release.wait(timeout=120)
        except BaseException as error:  # reported to the caller below
            results.append(error)
            entered.set()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert entered.wait(timeout=120), "the other thread never entered its block"
        yield results
    finally:
        release.set()
        thread.join(timeout=120)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def test_backend_block_stays_in_its_thread():
    kernels.set_backend("triton")
    with held_open_in_thread(lambda: kernels.backend("torch"), lambda: kernels.select_backend(CUDA)) as seen:
        assert kernels.select_backend(CPU) == "triton"  # the process default, not the other thread's block
        assert seen == ["torch"]
        # A thread started later sees the process default too.
        later: list[str] = []
        thread = threading.Thread(target=lambda: later.append(kernels.select_backend(CPU)))
        thread.start()
        thread.join()
        assert later == ["triton"]


def test_export_representation_stays_in_the_exporting_thread(monkeypatch):
    """While an 'exporter' thread holds msda_representation("trt-plugin") open, a 'predictor' (this
    thread) running the same layer still reaches the Triton kernel chosen by DERIS_KERNELS; the
    exporter's layer computes through the plugin's function and takes no kernel path at all."""
    from deris.export.msda import msda_representation
    from deris.modeling.pixel_decoder import DeformableSelfAttention

    monkeypatch.setenv("DERIS_KERNELS", "triton")
    reached = []
    for name in ("ms_deform_attn_fused_triton", "ms_deform_attn_fused_reference"):
        real = getattr(kernels, name)

        def spy(*args, _name=name, _real=real):
            reached.append((threading.current_thread().name, _name))
            return _real(*args)
        monkeypatch.setattr(kernels, name, spy)

    torch.manual_seed(0)
    layer = DeformableSelfAttention(dim=16, num_heads=2, num_levels=2, num_points=2)
    shapes = [(4, 4), (2, 2)]
    query = torch.randn(1, 20, 16)
    reference_points = torch.rand(1, 20, 2, 2)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return layer(query, query, reference_points, shapes)

    with held_open_in_thread(lambda: msda_representation("trt-plugin"), forward) as exported:
        predicted = forward()
    assert reached == [(threading.current_thread().name, "ms_deform_attn_fused_triton")]
    # Same layer, same inputs: the plugin's reference computation and the Triton kernel agree.
    torch.testing.assert_close(exported[0], predicted, atol=1e-5, rtol=0)


def test_torch_compile_traces_dispatch_and_layer_in_one_graph():
    """fullgraph=True: neither the backend selection nor the layer's MSDA lookup (both read
    context variables) breaks the graph; forward and backward match eager (reference path)."""
    from deris.modeling.pixel_decoder import DeformableSelfAttention

    torch.manual_seed(0)
    layer = DeformableSelfAttention(dim=16, num_heads=2, num_levels=2, num_points=2)
    shapes = [(4, 4), (2, 2)]
    query = torch.randn(1, 20, 16, requires_grad=True)
    reference_points = torch.rand(1, 20, 2, 2)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for run in (layer, compiled):
        out = run(query, query, reference_points, shapes)
        (grad,) = torch.autograd.grad(out.square().sum(), query)
        results.append((out, grad))
    (eager_out, eager_grad), (compiled_out, compiled_grad) = results
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-5, rtol=1e-5)
