"""The kernels compiled on a GPU at DeRIS's shapes, against their references (the ``gpu`` tests,
which benchmarks/gpu_check.sh runs).

The interpreter tests cover the kernels' logic at small shapes; these run the machine code a GPU
executes, at the shapes deris.kernels.aot compiles for (3 levels at 384 and 1024 px, 8 heads of
32, 4 points, queries = keys; mask pooling of 20 masks over 256 channels at 96 x 96), in float32,
float16 and bfloat16, forward and backward, with the interpreter tests' tolerances. They also
check that the forward's autotuned launch gives the very bits of its fixed configuration (every
configuration runs the same per-lane code).

The checks run in a subprocess that defines the kernels for the GPU (this process defines them
for the interpreter). The same script runs in every test run on the CPU, under the interpreter at
a small shape, so that it cannot rot while no GPU is at hand.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = r"""
import importlib
import os
import sys

import torch
from kernel_checks import check_fused, check_mask_pool, check_msda, fused_inputs

import deris.kernels as kernels
import deris.kernels.aot as aot
from deris.kernels._triton_support import AUTOTUNE_ENV_VAR, autotuning

device, resolutions, mask_size = sys.argv[1], [int(r) for r in sys.argv[2].split(",")], int(sys.argv[3])
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fused_forward(shapes, queries, dtype, autotune):
    os.environ[AUTOTUNE_ENV_VAR] = "1" if autotune else "0"
    value, reference_points, offsets, logits, _ = fused_inputs(1, aot.HEADS, aot.HEAD_DIM, shapes, aot.POINTS,
                                                               queries)
    inputs = [t.to(device, dtype) for t in (value, reference_points, offsets, logits)]
    inputs[1] = inputs[1].float()  # as the pixel decoder passes them
    return kernels.ms_deform_attn_fused(inputs[0], shapes, None, *inputs[1:])


with kernels.backend("triton"):
    for resolution in resolutions:
        shapes = aot.msda_levels(resolution)
        queries = sum(height * width for height, width in shapes)
        for dtype in DTYPES:
            check_msda(1, aot.HEADS, aot.HEAD_DIM, shapes, aot.POINTS, queries, dtype, device=device)
            check_fused(1, aot.HEADS, aot.HEAD_DIM, shapes, aot.POINTS, queries, dtype, device=device)
            tuned = fused_forward(shapes, queries, dtype, autotune=True)
            tuned_here = autotuning()
            fixed = fused_forward(shapes, queries, dtype, autotune=False)
            assert torch.equal(tuned, fixed), f"{resolution} px {dtype}: the autotuned launch changed the output"
            print(f"msda {resolution} px {dtype}: ok (autotuned: {tuned_here})", flush=True)
    for dtype in DTYPES:
        check_mask_pool(1, aot.MASKS, aot.MASK_CHANNELS, mask_size, mask_size, dtype, device=device)
        print(f"mask_pool {mask_size}x{mask_size} {dtype}: ok", flush=True)
print("ok")
"""


def run_checks(device: str, resolutions: str, mask_size: int, interpret: bool) -> str:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", SCRIPT, device, resolutions, str(mask_size)], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_match_the_references_at_deris_shapes():
    out = run_checks("cuda", "384,1024", 96, interpret=False)
    assert out.count(": ok (autotuned: True)") == 6 and out.count("mask_pool") == 3 and out.endswith("ok\n")


def test_the_gpu_checks_run_under_the_interpreter():
    """The script above on the CPU, at 64 px (2x2, 4x4 and 8x8 levels) and 16 x 16 masks."""
    out = run_checks("cpu", "64", 16, interpret=True)
    assert out.count(": ok (autotuned: False)") == 3 and out.count("mask_pool") == 3 and out.endswith("ok\n")
