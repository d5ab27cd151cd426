"""What the Triton launchers share: the optional import, the interpreter check, input checks.

Triton is optional: without it this module still imports, ``jit`` leaves the kernels as plain
(never launched) functions, and :func:`require_triton` explains why the Triton backend is missing.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend works without Triton
    triton = None
    tl = None

TRITON_AVAILABLE = triton is not None

# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. when the kernel modules
# are imported, not when a kernel is launched: record the value the kernels were built with.
INTERPRETING = TRITON_AVAILABLE and bool(triton.knobs.runtime.interpret)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def jit(fn):
    """``triton.jit`` when Triton is installed; otherwise the function itself (launchers refuse first)."""
    return triton.jit(fn) if TRITON_AVAILABLE else fn


def require_triton(op: str, device: torch.device) -> None:
    """Raise a clear error unless ``op``'s Triton kernels can run on ``device``."""
    if not TRITON_AVAILABLE:
        raise RuntimeError(f"{op}: the Triton backend needs the 'triton' package, which is not installed; "
                           "use the torch backend (DERIS_KERNELS=torch) or install triton")
    if device.type == "cpu" and not INTERPRETING:
        raise RuntimeError(f"{op}: the Triton kernels run on CPU tensors only through Triton's interpreter; "
                           "set TRITON_INTERPRET=1 in the environment before importing deris, "
                           "or use the torch backend for CPU tensors")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{op}: the Triton kernels run on CUDA tensors (or CPU tensors under "
                           f"TRITON_INTERPRET=1), got a tensor on {device}")


def check_float(op: str, name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} has dtype {tensor.dtype}; accepted: float32, float16, bfloat16")


def check_shape(op: str, name: str, tensor: torch.Tensor, expected: tuple[int | str, ...]) -> None:
    """``expected`` holds an int where the size is fixed and a letter where any size goes."""
    actual = tuple(tensor.shape)
    if len(actual) != len(expected) or any(isinstance(e, int) and a != e for a, e in zip(actual, expected)):
        wanted = ", ".join(str(e) for e in expected)
        raise ValueError(f"{op}: {name} has shape {list(actual)}; expected [{wanted}]")


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")
    return next(iter(devices.values()))
