"""The kernels as custom operators (torch.library.triton_op) in compiled and exported graphs.

* torch.export keeps ``deris_kernels::msda_forward``, ``msda_fused_forward`` and
  ``mask_pool_forward`` as nodes of the graph, and the exported program computes what eager does;
* torch.compile(fullgraph=True) captures them in one graph and runs forward and backward. On CPU
  the traced bodies compute through the PyTorch reference (the compiled Triton path needs a GPU);
  on CUDA (the ``gpu`` test, in a process without the interpreter) Inductor and AOTInductor
  compile the Triton kernels themselves.

Eager results here run the kernels through Triton's interpreter (tests/conftest.py). Each result
is held to the tolerance of the kernel tests against the float64 reference (kernel_checks).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from kernel_checks import assert_close, fused_inputs, msda_inputs, triton_backend  # noqa: F401 (autouse fixture)
from torch import nn

import deris.kernels as kernels

SHAPES = [(5, 7), (3, 3)]
OPS = {torch.ops.deris_kernels.msda_forward.default, torch.ops.deris_kernels.msda_fused_forward.default,
       torch.ops.deris_kernels.mask_pool_forward.default}


class AllOps(nn.Module):
    """Every public entry, each reaching its custom operator under the Triton backend."""

    def forward(self, value, locations, weights, reference_points, offsets, logits, mask_logits, features):
        return (kernels.ms_deform_attn(value, SHAPES, None, locations, weights),
                kernels.ms_deform_attn_fused(value, SHAPES, None, reference_points, offsets, logits),
                kernels.mask_pool(mask_logits, features))


def float64_inputs() -> list[torch.Tensor]:
    """Inputs of AllOps in float64, with pixel-safe sampling locations (see kernel_checks)."""
    value, locations, weights, _ = msda_inputs(1, 2, 16, SHAPES, 2, 12)
    _, reference_points, offsets, logits, _ = fused_inputs(1, 2, 16, SHAPES, 2, 12)
    generator = torch.Generator().manual_seed(1)
    mask_logits = 3 * torch.randn(1, 3, 16, 12, generator=generator, dtype=torch.float64)
    features = torch.randn(1, 5, 16, 12, generator=generator, dtype=torch.float64)
    return [value, locations, weights, reference_points, offsets, logits, mask_logits, features]


def forward_backward(module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs, then the gradients of every input, of a fixed weighting of the outputs."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = module(*leaves)
    sum(out.square().sum() for out in outputs).backward()
    return [out.detach() for out in outputs] + [leaf.grad for leaf in leaves]


def assert_matches_reference(results: list[torch.Tensor], inputs: list[torch.Tensor], what: str) -> None:
    """``results`` (outputs, then optionally gradients, as forward_backward lists them) against the
    float64 reference on the same inputs."""
    with kernels.backend("torch"):
        expected = forward_backward(AllOps(), [t.double() for t in inputs])
    for index, (actual, wanted) in enumerate(zip(results, expected)):
        assert_close(actual, wanted, torch.float32, f"{what}: result {index}")


def graph_ops(graph: torch.fx.Graph) -> set:
    return {node.target for node in graph.nodes if node.op == "call_function"} & OPS


def test_export_keeps_the_custom_operators():
    inputs = [t.float() for t in float64_inputs()]
    exported = torch.export.export(AllOps(), tuple(inputs))
    assert graph_ops(exported.graph) == OPS
    for actual, expected in zip(exported.module()(*inputs), AllOps()(*inputs)):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_forward_and_backward_on_cpu(compiler):
    """One Dynamo graph holding the three operators; the compiled forward and backward (the
    reference, traced on CPU) match eager (the interpreter's kernels) within the kernel tolerance."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(compiler)
    inputs = [t.float() for t in float64_inputs()]
    compiled = forward_backward(torch.compile(AllOps(), fullgraph=True, backend=counter), inputs)
    assert counter.frame_count == 1 and graph_ops(counter.graphs[0].graph) == OPS
    assert_matches_reference(compiled, inputs, f"compiled ({compiler})")
    assert_matches_reference(forward_backward(AllOps(), inputs), inputs, "eager")


GPU_SCRIPT = textwrap.dedent("""
    import torch
    from torch._inductor.utils import run_and_get_code
    import deris.kernels as kernels
    import test_kernels_graph as graph

    inputs = [t.float().cuda() for t in graph.float64_inputs()]
    with kernels.backend("triton"):
        module = graph.AllOps()
        compiled = torch.compile(module, fullgraph=True)
        results, code = run_and_get_code(graph.forward_backward, compiled, inputs)
        # Inductor compiled the kernels themselves, not a call into the operators.
        source = "\\n".join(code)
        for kernel in ("_msda_forward_kernel", "_msda_fused_forward_kernel", "_msda_backward_kernel",
                       "_msda_fused_backward_kernel", "_mask_pool_forward_kernel", "_mask_pool_grad_logits_kernel",
                       "_mask_pool_grad_features_kernel"):
            assert kernel in source, kernel
        assert "torch.ops.deris_kernels" not in source
        graph.assert_matches_reference([t.cpu() for t in results], [t.cpu() for t in inputs], "inductor (cuda)")

        exported = torch.export.export(module, tuple(inputs))
        assert graph.graph_ops(exported.graph) == graph.OPS
        package = torch._inductor.aoti_compile_and_package(exported)
        outputs = torch._inductor.aoti_load_package(package)(*inputs)
        # Forward only: the results compared are the three outputs.
        graph.assert_matches_reference([t.cpu() for t in outputs], [t.cpu() for t in inputs], "AOTInductor (cuda)")
    print("ok")
""")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_and_aot_inductor_run_the_triton_kernels_on_cuda():
    """In a process that defines the kernels for the GPU (no TRITON_INTERPRET): Inductor compiles
    forward and backward with the Triton kernels inlined, AOTInductor the exported forward."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", GPU_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    assert result.stdout.strip().endswith("ok")
