"""What the Triton launchers share: the optional import, the interpreter check, input checks,
and :func:`launch`, through which every kernel launch goes (visible to torch.compile and
torch.export through ``torch.library.wrap_triton``).

Triton is optional: without it this module still imports, ``jit`` leaves the kernels as plain
(never launched) functions, and :func:`require_triton` explains why the Triton backend is missing.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

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


def check_deterministic(op: str, device: torch.device) -> None:
    """Honour ``torch.use_deterministic_algorithms`` for a backward that scatters with atomics.

    On a GPU, atomics add in whatever order the programs run, so such a gradient changes in its
    last bits from run to run. (The interpreter runs programs one after another: deterministic.)
    """
    if device.type != "cuda" or not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"{op}: the Triton backward adds the value gradient with atomics, which is not deterministic "
               "on a GPU, and torch.use_deterministic_algorithms(True) is set; leave value out of the gradient, "
               "or pass warn_only=True to accept it")
    if not torch.is_deterministic_algorithms_warn_only_enabled():
        raise RuntimeError(message)
    warnings.warn(message, stacklevel=3)


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher asks for it: grid, positional arguments, keyword meta-parameters."""

    kernel: Any  # a triton.JITFunction
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    meta: dict[str, Any]


@dataclass(frozen=True)
class _Planner:
    multiprocessors: int
    record: Callable[[Launch], None]


_planner: contextvars.ContextVar[_Planner | None] = contextvars.ContextVar("deris_kernels_planner", default=None)


@contextlib.contextmanager
def planning_only(record: Callable[[Launch], None], multiprocessors: int) -> Iterator[None]:
    """Within the block (this context only), launches are handed to ``record`` instead of running,
    and launchers size their grids for a GPU with ``multiprocessors`` SMs.

    With meta tensors this runs the launchers on any machine: it is how the kernels are compiled
    ahead of time, at the very configurations a launch would use, without a GPU.
    """
    token = _planner.set(_Planner(multiprocessors, record))
    try:
        yield
    finally:
        _planner.reset(token)


def multiprocessors(device: torch.device) -> int:
    """SM count of the GPU a launch is for (the planned one inside :func:`planning_only`)."""
    planner = _planner.get()
    if planner is not None:
        return planner.multiprocessors
    return torch.cuda.get_device_properties(device).multi_processor_count


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device for a block (nothing for other devices).

    Triton launches on the current CUDA device, whatever the tensors' device: without the guard a
    kernel given tensors on cuda:1 would run on cuda:0.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(kernel: Any, grid: Sequence[int], *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)`` on the device of its first tensor argument.

    Through ``wrap_triton``: inside a ``triton_op`` traced by torch.compile or torch.export the
    launch becomes a node of the graph; in eager mode (and for the interpreter's kernels) it is
    the plain launch.
    """
    planned = Launch(kernel, tuple(grid), args, meta)
    planner = _planner.get()
    if planner is not None:
        planner.record(planned)
        return
    with device_guard(next(arg.device for arg in args if isinstance(arg, torch.Tensor))):
        torch.library.wrap_triton(kernel)[planned.grid](*args, **meta)


AUTOTUNE_ENV_VAR = "DERIS_AUTOTUNE"


def autotuning() -> bool:
    """Whether launchers that have a tuning space autotune: on a GPU, unless ``DERIS_AUTOTUNE=0``
    (read at every launch). Under the interpreter they always take their fixed configuration."""
    value = os.environ.get(AUTOTUNE_ENV_VAR, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV_VAR}={value!r}; accepted: 1 (autotune on a GPU, the default) or 0 "
                         "(the launchers' fixed configurations)")
    return value == "1" and not INTERPRETING


def launch_tuned(tuner: Any, configs: Sequence[dict[str, Any]], grid: Callable[[dict[str, Any]], tuple[int, ...]],
                 *args: Any, **meta: Any) -> None:
    """Launch the kernel of ``tuner`` (a ``triton.autotune`` of it over the same space as ``configs``).

    ``configs`` are the launch configurations of the space (block sizes and ``num_warps``), the
    fixed one first: it runs when :func:`autotuning` is off; otherwise the tuner times the space
    once per key and launches the fastest. Inside :func:`planning_only` every configuration is
    recorded, so that each one a GPU may pick is compiled ahead of time. ``grid`` maps a
    configuration to the launch grid.
    """
    if _planner.get() is not None:
        for config in configs:
            launch(tuner.fn, grid(config), *args, **meta, **config)
        return
    if not autotuning():
        launch(tuner.fn, grid(configs[0]), *args, **meta, **configs[0])
        return
    with device_guard(next(arg.device for arg in args if isinstance(arg, torch.Tensor))):
        torch.library.wrap_triton(tuner)[grid](*args, **meta)


def triton_op(name: str, body: Callable[..., Any]) -> torch.library.CustomOpDef:
    """``body`` as the custom operator ``deris_kernels::name``, which mutates none of its inputs.

    ``torch.library.triton_op`` makes ``body`` the eager implementation and lets torch.compile and
    torch.export trace into it (to the kernels it launches through :func:`launch`); each caller
    registers a fake implementation (``body`` launches kernels, which fake tensors cannot run).
    """
    return cast(torch.library.CustomOpDef, torch.library.triton_op(f"deris_kernels::{name}", body, mutates_args=()))


def traced_on_cpu(tensor: torch.Tensor) -> bool:
    """Whether torch.compile or torch.export is tracing an operator (its body or its backward) on CPU tensors.

    Inductor traces an op's body, not only its fake implementation, whatever the device, and the
    compiled Triton path needs a GPU (the interpreter's kernels cannot be traced: they read data
    pointers): such a forward computes through the PyTorch reference instead, and its backward
    differentiates that reference (:func:`reference_vjp`).
    """
    return tensor.device.type == "cpu" and torch.compiler.is_compiling()


def skipped_gradient(tensor: torch.Tensor) -> torch.Tensor:
    """What a backward operator returns for a gradient nobody asked for: an operator's outputs are
    fresh tensors, never None and never one of its inputs."""
    return tensor.new_empty(0)


def gradient_like(tensor: torch.Tensor, needed: bool = True) -> torch.Tensor:
    """A backward operator's fake output for the gradient of ``tensor``."""
    return torch.empty_like(tensor) if needed else skipped_gradient(tensor)


def reference_vjp(function: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...],
                  grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of the reference ``function`` at ``inputs`` along ``grad_out``, for the backward of a
    forward traced on CPU.

    Runs in the operator's autograd backward, where autograd still records (inside an operator's
    body it does not); the reference forward is traced again there, a recomputation in the
    backward graph.
    """
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in inputs]
        return torch.autograd.grad(function(*leaves), leaves, grad_out)
