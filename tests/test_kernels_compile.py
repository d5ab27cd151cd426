"""Every Triton kernel compiles for sm_80 and sm_90 at the launch configurations a GPU run uses.

No GPU needed: deris.kernels.aot records the launches the launchers make on meta tensors of
DeRIS's shapes (3 levels at 384 and 1024 px, 8 heads of 32, 4 points; mask pooling of 20 masks
over 256 channels at 96x96) and compiles each with Triton's bundled ptxas, for float32, float16
and bfloat16. A compile error, a register spill or any local memory fails.

The compiler runs in subprocesses without TRITON_INTERPRET (this test process defines the
kernels for the interpreter, whose block sizes differ), one per (architecture, dtype), started
beside the other tests when the session starts (tests/background.py). About eight CPU-minutes
when Triton's cache is cold, seconds when warm.
"""

from __future__ import annotations

import collections
import itertools
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import deris.kernels.aot as aot  # noqa: E402
from deris.kernels.mask_pool import mask_pool_launch_config  # noqa: E402
from deris.kernels.ms_deform_attn import (  # noqa: E402
    msda_forward_config,
    msda_forward_configs,
)

ARCHS = ("sm_80", "sm_90")
DTYPES = ("fp32", "fp16", "bf16")
MSDA_FORWARD_KERNELS = {"_msda_forward_kernel", "_msda_fused_forward_kernel"}
MSDA_BACKWARD_KERNELS = {"_msda_backward_kernel", "_msda_fused_backward_kernel"}
MSDA_KERNELS = MSDA_FORWARD_KERNELS | MSDA_BACKWARD_KERNELS
MASK_POOL_KERNELS = {"_mask_pool_forward_kernel", "_mask_pool_grad_logits_kernel", "_mask_pool_grad_features_kernel"}
RECORDS = "aot.json"  # what each compile job writes into its folder


def background_jobs(directory: Path) -> dict[str, list[str]]:
    return {_job(arch, dtype): [sys.executable, "-m", "deris.kernels.aot", "--arch", arch, "--dtypes", dtype,
                                "--json", str(directory / _job(arch, dtype) / RECORDS)]
            for arch, dtype in itertools.product(ARCHS, DTYPES)}


def _job(arch: str, dtype: str) -> str:
    return f"compiled:{arch}-{dtype}"


@pytest.fixture(scope="module")
def compiled(background) -> list[dict]:
    records = []
    for arch, dtype in itertools.product(ARCHS, DTYPES):
        result = background.result(_job(arch, dtype))
        assert result.returncode == 0, f"compiling for {arch} {dtype} failed:\n{result.stderr[-6000:]}"
        records += json.loads((background.folder(_job(arch, dtype)) / RECORDS).read_text())
    return records


def test_every_kernel_compiles_for_every_arch_dtype_and_shape(compiled):
    seen = {(r["arch"], r["dtype"], r["kernel"], r["resolution"]) for r in compiled}
    expected = {(arch, dtype, kernel, resolution) for arch in ARCHS for dtype in DTYPES
                for kernel, resolution in [*((k, px) for k in MSDA_KERNELS for px in (384, 1024)),
                                           *((k, 384) for k in MASK_POOL_KERNELS)]}
    assert seen == expected


def test_no_spills_and_no_local_memory(compiled):
    bad = [f"{r['arch']} {r['dtype']} {r['kernel']}: {r['registers']} registers, stack {r['stack']} B, "
           f"local {r['local']} B, {r['spill_instructions']} LDL/STL" for r in compiled
           if r["spill_instructions"] or r["stack"] or r["local"]]
    assert not bad, "\n".join(bad)
    # 255 is the hardware limit; more registers than that would have spilled above.
    assert all(0 < r["registers"] <= 255 and r["sass_instructions"] > 0 for r in compiled)


def launch_configs(record: dict) -> tuple[list[dict], list[dict]]:
    """(GPU, interpreter) configurations the launchers may choose for a record's kernel and shapes:
    the MSDA forward's whole autotuning space, one fixed configuration for the others."""
    def choose(interpreting: bool) -> list[dict]:
        if record["kernel"] in MASK_POOL_KERNELS:
            return [mask_pool_launch_config(aot.MASKS, aot.MASK_CHANNELS, (aot.MASK_SIZE // 4) ** 2, interpreting)]
        if record["kernel"] in MSDA_FORWARD_KERNELS:
            return msda_forward_configs(queries(record), aot.HEAD_DIM, aot.DTYPES[record["dtype"]].itemsize,
                                        interpreting)
        # The backward: the forward's fixed configuration in chunks of 4 float32 channels.
        return [msda_forward_config(queries(record), aot.HEAD_DIM, 4, interpreting)]

    return choose(interpreting=False), choose(interpreting=True)


def queries(record: dict) -> int:
    return sum(h * w for h, w in aot.msda_levels(record["resolution"]))


def test_compiled_at_the_gpu_launch_configurations(compiled):
    """The configurations compiled are exactly those a GPU launch may use (every one the forward's
    autotuning may pick), none of which is the interpreter's."""
    by_launch = collections.defaultdict(list)
    for r in compiled:
        by_launch[r["arch"], r["dtype"], r["kernel"], r["resolution"]].append(r)
    for records in by_launch.values():
        gpu, interpreter = launch_configs(records[0])
        chosen = [{name: r["config"][name] for name in gpu[0]} for r in records]
        assert sorted(map(str, chosen)) == sorted(map(str, gpu)), (records[0]["kernel"], chosen)
        assert not any(config in interpreter for config in chosen)
        if records[0]["kernel"] in MSDA_KERNELS:
            assert all(r["grid"] == [-(-queries(r) // r["config"]["BLOCK_Q"]), aot.HEADS] for r in records)


def test_the_forward_tunes_over_several_program_sizes():
    configs = msda_forward_configs(21504, aot.HEAD_DIM, 2, interpreting=False)
    assert configs[0] == msda_forward_config(21504, aot.HEAD_DIM, 2, interpreting=False)
    assert len({c["BLOCK_Q"] for c in configs}) == len(configs) >= 4
    assert all(c["BLOCK_Q"] == 32 * c["num_warps"] for c in configs)  # one lane per query in each
