"""What correct GPU runs need from the kernels and the pixel decoder, checked on CPU.

* every launch runs on its tensors' device;
* the pixel decoder's forward neither copies between host and device nor synchronises (so it
  can be captured in a CUDA graph): level sizes stay Python ints, nothing is built from host data;
* a half-precision decoder keeps its normalised reference points in float32;
* the backward honours ``torch.use_deterministic_algorithms``: the value gradient's atomics are
  refused (or warned about) on a GPU, and skipped when value needs no gradient.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_checks import assert_close, fused_inputs, msda_inputs
from torch.overrides import TorchFunctionMode

import deris
import deris.kernels as kernels
import deris.kernels._triton_support as support
from deris.modeling.pixel_decoder import PixelDecoder

msda_module = importlib.import_module("deris.kernels.ms_deform_attn")

# Calls that read device data on the host or build device data from host values: each is a
# blocking copy (and a synchronisation) when the tensors live on a GPU.
HOST_CALLS = {"tensor", "as_tensor", "tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}


class HostTransfers(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_CALLS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def tiny_decoder(dtype: torch.dtype = torch.float32) -> tuple[PixelDecoder, list[torch.Tensor]]:
    cfg = deris.get_config("deris-tiny")
    torch.manual_seed(0)
    decoder = PixelDecoder(cfg).eval().to(dtype)
    size = 64
    features = [torch.randn(1, channels, size // stride, size // stride, dtype=dtype)
                for channels, stride in zip(cfg.swin.channels, (4, 8, 16, 32))]
    return decoder, features


def test_device_guard_selects_the_tensors_gpu():
    guard = support.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(support.device_guard(torch.device("cpu")), torch.cuda.device)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pixel_decoder_forward_makes_no_host_transfer(backend):
    decoder, features = tiny_decoder()
    launches: list[support.Launch] = []
    # Launches are recorded, not run: what is checked is the model and launcher code, not the
    # interpreter, which copies every argument to the host by design.
    with kernels.backend(backend), torch.no_grad(), support.planning_only(launches.append, multiprocessors=1):
        decoder(features)  # builds the per-(shapes, device) level table once
        with HostTransfers() as transfers:
            decoder(features)
    assert transfers.calls == []
    assert len(launches) == (4 if backend == "triton" else 0)  # 2 layers x 2 forwards


def test_half_decoder_keeps_reference_points_in_float32(monkeypatch):
    seen = []
    real = kernels.ms_deform_attn_fused

    def spy(value, shapes, starts, reference_points, *rest):
        seen.append((value.dtype, reference_points.dtype, starts))
        return real(value, shapes, starts, reference_points, *rest)

    monkeypatch.setattr(kernels, "ms_deform_attn_fused", spy)
    decoder, features = tiny_decoder(torch.float16)
    with kernels.backend("torch"), torch.no_grad():
        outs, mask_features = decoder(features)
    assert seen == [(torch.float16, torch.float32, None)] * 2
    assert mask_features.dtype == torch.float16 and torch.isfinite(mask_features).all()


@pytest.fixture
def restore_determinism():
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def test_deterministic_mode_refuses_atomic_value_gradients_on_a_gpu(restore_determinism):
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    support.check_deterministic("op", gpu)  # not requested: fine
    torch.use_deterministic_algorithms(True)
    with pytest.raises(RuntimeError, match="op: the Triton backward adds the value gradient with atomics"):
        support.check_deterministic("op", gpu)
    support.check_deterministic("op", cpu)  # the interpreter runs programs in order: deterministic
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="not deterministic"):
        support.check_deterministic("op", gpu)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_backward_without_value_gradient_skips_the_scatter(monkeypatch, fused):
    """value needs no gradient: the backward must not scatter (value stands in for the unused
    buffer, so a scatter would change it), must not ask for determinism, and the other
    gradients stay exact."""
    checked = []
    monkeypatch.setattr(msda_module, "check_deterministic", lambda op, device: checked.append(device))
    shapes = [(5, 7), (3, 3)]
    if fused:
        value, *rest, grad_out = fused_inputs(1, 2, 16, shapes, 2, 12)
        reference, actual_fn = kernels.ms_deform_attn_fused_reference, kernels.ms_deform_attn_fused
    else:
        value, *rest, grad_out = msda_inputs(1, 2, 16, shapes, 2, 12)
        reference, actual_fn = kernels.ms_deform_attn_reference, kernels.ms_deform_attn
    value, grad_out = value.float(), grad_out.float()
    rest = [t.float() for t in rest]
    expected_leaves = [t.double().requires_grad_() for t in rest]
    reference(value.double(), shapes, None, *expected_leaves).backward(grad_out.double())
    leaves = [t.clone().requires_grad_() for t in rest]
    original = value.clone()
    with kernels.backend("triton"):
        actual_fn(value, shapes, None, *leaves).backward(grad_out)
        assert torch.equal(value, original)
        assert checked == []
        for leaf, expected in zip(leaves, expected_leaves):
            assert_close(leaf.grad, expected.grad, torch.float32, "gradient")
        value.requires_grad_()
        actual_fn(value, shapes, None, *rest).sum().backward()
    assert checked == [value.device]


def test_autotuning_follows_deris_autotune_on_a_gpu(monkeypatch):
    monkeypatch.delenv(support.AUTOTUNE_ENV_VAR, raising=False)
    assert not support.autotuning(), "the interpreter takes the fixed configurations"
    monkeypatch.setattr(support, "INTERPRETING", False)  # as a process that compiles for a GPU
    assert support.autotuning()
    monkeypatch.setenv(support.AUTOTUNE_ENV_VAR, "0")
    assert not support.autotuning()
    monkeypatch.setenv(support.AUTOTUNE_ENV_VAR, "yes")
    with pytest.raises(ValueError, match=r"DERIS_AUTOTUNE='yes'; accepted: 1 .* or 0"):
        support.autotuning()
