"""`deris-export trt` without TensorRT: everything that can be proven on a CPU.

* the preflight against the parser's support matrix, rule by rule and on exported graphs;
* the command where TensorRT is absent (exit 2, the graphs kept, no engines);
* the build orchestration with a recording stand-in for the ``tensorrt`` module (it checks what
  our code asks TensorRT for: strong typing, profiles, plugin version, timing cache reuse,
  manifest, atomic output; it proves nothing about TensorRT itself);
* the parity machinery (polygraphy's comparator, the end-to-end masks) with ONNX Runtime standing
  in for the engines, passing and failing;
* the triton-plugin: the PTX from the launcher's own kernel for sm_80 and sm_90, its launch
  dimensions against the launcher's, the ONNX node in ONNX Runtime against PyTorch, and the QDP
  definitions type-checked against tensorrt-stubs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import exports
import numpy as np
import onnx
import pytest
import torch
from background import Background
from onnx import TensorProto, helper
from tis import TinyExport

import deris
from deris.cli_support import CheckFailed
from deris.export import cli, tensorrt_build, triton_plugin
from deris.export.tensorrt_build import (
    TrtRequest,
    check_engines,
    network_bytes,
    ort_runner_factory,
    run_trt,
)
from deris.export.trt_preflight import FAIL, PASS, WARN, TrtTarget, check_graph, preflight
from deris.triton_repo.repository import generate_triton_repo

REPO = Path(__file__).resolve().parent.parent
TINY = "deris-tiny"


@pytest.fixture(scope="module")
def tiny_model() -> deris.DeRIS:
    """The weights of the session's tiny exports (conftest.py)."""
    return exports.tiny_model()


# --- preflight -----------------------------------------------------------------------------------


def _graph(tmp_path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any], opset: int = 18,
           initializers: tuple[Any, ...] = (), domains: tuple[str, ...] = ()) -> Path:
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(initializers)), opset_imports=opsets)
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    return path


def _results(path: Path, target: str = "10.13", plugin_version: str | None = None) -> dict[str, tuple[str, str]]:
    entry = {"inputs": [{"name": i.name} for i in onnx.load(str(path)).graph.input]}
    rows = check_graph(path, entry, TrtTarget.parse(target), (1, 1, 8), "batch", plugin_version)
    return {row.check: (row.status, row.detail) for row in rows}


def _tensor(name: str, dtype: int, *shape: int | str) -> Any:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def test_preflight_rules(tmp_path: Path) -> None:
    x = _tensor("x", TensorProto.FLOAT, "batch", 4, 8, 8)
    y = _tensor("y", TensorProto.FLOAT, "batch", 4, 8, 8)
    # GridSample: fine at opset 18; at opset 20 TensorRT reads the renamed modes as nearest.
    grid = _tensor("grid", TensorProto.FLOAT, "batch", 8, 8, 2)
    node = helper.make_node("GridSample", ["x", "grid"], ["y"], mode="bilinear")
    assert _results(_graph(tmp_path, [node], [x, grid], [y]))["restrictions"][0] == PASS
    status, detail = _results(_graph(tmp_path, [node], [x, grid], [y], opset=20), "10.15")["restrictions"]
    assert status == FAIL and "opset-20 modes as nearest" in detail
    assert _results(_graph(tmp_path, [node], [x, grid], [y]), "10.14")["restrictions"][0] == WARN  # NVIDIA/TensorRT#4813
    # Reduce axes from a tensor, Resize modes, an operator the parser lacks, an operator too new.
    axes = _tensor("axes", TensorProto.INT64, 1)
    reduce = helper.make_node("ReduceMean", ["x", "axes"], ["y"])
    assert _results(_graph(tmp_path, [reduce], [x, axes], [y]))["restrictions"] == (FAIL, "ReduceMean: `axes` must be an initializer")
    constant_axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    assert _results(_graph(tmp_path, [reduce], [x], [y], initializers=(constant_axes,)))["restrictions"][0] == PASS
    resize = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic")
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 1, 1])
    assert "mode 'cubic'" in _results(_graph(tmp_path, [resize], [x], [y], initializers=(scales,)))["restrictions"][1]
    unique = helper.make_node("Unique", ["x"], ["y"])
    assert _results(_graph(tmp_path, [unique], [x], [y]))["operators"] == (
        FAIL, "Unique is not in this preflight's table of parser operators")
    # Slice with tensor axes: parsed from TensorRT 10.3 on.
    slice_inputs = [_tensor(n, TensorProto.INT64, 1) for n in ("starts", "ends", "slice_axes")]
    slice_node = helper.make_node("Slice", ["x", "starts", "ends", "slice_axes"], ["y"])
    path = _graph(tmp_path, [slice_node], [x, *slice_inputs], [y])
    assert _results(path, "10.2")["restrictions"][0] == FAIL and _results(path, "10.3")["restrictions"][0] == PASS
    # Opset range: 9..20 documented for 10.0, 9..24 for 10.15.
    relu = helper.make_node("Relu", ["x"], ["y"])
    assert _results(_graph(tmp_path, [relu], [x], [y], opset=21), "10.13")["opset"][0] == FAIL
    assert _results(_graph(tmp_path, [relu], [x], [y], opset=21), "10.15")["opset"][0] == PASS
    # Types: Relu on BOOL is not in the matrix; a dynamic dimension other than the batch has no profile.
    flags = _tensor("x", TensorProto.BOOL, "batch", 4)
    assert _results(_graph(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [flags], [_tensor("y", TensorProto.BOOL, "batch", 4)]))[
        "dtypes"][0] == FAIL
    ragged = _tensor("x", TensorProto.FLOAT, "batch", "length")
    status, detail = _results(_graph(tmp_path, [relu], [ragged], [_tensor("y", TensorProto.FLOAT, "batch", "length")]))["dynamic dims"]
    assert status == FAIL and "x dimension 1 (length) is dynamic" in detail


def test_preflight_plugins(tmp_path: Path) -> None:
    from deris.export.msda import PLUGIN_DOMAIN, PLUGIN_OP

    value = _tensor("value", TensorProto.FLOAT, "batch", 20, 2, 4)
    locations = _tensor("locations", TensorProto.FLOAT, "batch", 20, 2, 2, 1, 2)
    weights = _tensor("weights", TensorProto.FLOAT, "batch", 20, 2, 2, 1)
    out = _tensor("out", TensorProto.FLOAT, "batch", 20, 2, 4)

    def msda(index_type: int) -> Path:
        shapes = helper.make_tensor("shapes", index_type, [2, 2], [4, 4, 2, 2])
        starts = helper.make_tensor("starts", index_type, [2], [0, 16])
        node = helper.make_node(PLUGIN_OP, ["value", "shapes", "starts", "locations", "weights"], ["out"],
                                domain=PLUGIN_DOMAIN, plugin_version="1", plugin_namespace="")
        return _graph(tmp_path, [node], [value, locations, weights], [out], initializers=(shapes, starts),
                      domains=(PLUGIN_DOMAIN,))

    assert _results(msda(TensorProto.INT32), "10.13", plugin_version="2")["plugins"][0] == PASS
    assert _results(msda(TensorProto.INT32), "10.10", plugin_version="2")["plugins"] == (
        FAIL, "MultiscaleDeformableAttnPlugin_TRT version 2 needs TensorRT >= 10.11 (target 10.10); use version 1")
    assert _results(msda(TensorProto.INT32), "10.13", plugin_version="1")["plugins"][0] == WARN  # deprecated
    status, detail = _results(msda(TensorProto.INT64), "10.13", plugin_version="2")["dtypes"]
    assert status == FAIL and "input 1 is INT64, the plugin takes INT32" in detail
    unknown = helper.make_node("Mystery", ["value"], ["out"], domain="acme")
    assert _results(_graph(tmp_path, [unknown], [value], [out], domains=("acme",)))["plugins"] == (
        FAIL, "acme::Mystery is not a plugin this project builds")


def test_preflight_of_exported_graphs_and_cli(tiny_plugin_export: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = preflight(tiny_plugin_export, TrtTarget.parse("10.13.0.35"), (1, 2, 8), "2")
    assert rows[0].detail == "TensorRT 10.13" and all(r.status == PASS for r in rows), rows
    assert {r.check for r in rows[1:]} == {"opset", "operators", "dtypes", "restrictions", "dynamic dims", "size", "plugins"}
    newer = preflight(tiny_plugin_export, TrtTarget.parse("11.4"), (1, 1, 8), "2")
    assert newer[0].status == WARN and "checked with 10.15's rules" in newer[0].detail
    assert cli.main(["trt", "--onnx", str(tiny_plugin_export), "--check-only", "--quiet"]) == 0
    assert "preflight passed for TensorRT 10.13" in capsys.readouterr().out
    assert cli.main(["trt", "--onnx", str(tiny_plugin_export), "--check-only", "--trt-version", "10.9"]) == 1
    captured = capsys.readouterr()
    assert "version 2 needs TensorRT >= 10.11" in captured.out and "preflight check(s) failed" in captured.err
    assert cli.main(["trt", "--onnx", str(tiny_plugin_export), "--check-only", "--trt-version", "10.9",
                     "--plugin-version", "1"]) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--check-only"], "give --onnx DIR, or --preset with --checkpoint (or --random-weights)"),
        (["--preset", TINY, "--random-weights"], "--out is required"),
        (["--onnx", "{export}", "--preset", TINY, "--out", "{tmp}/x"], "--preset describe a model to export; with --onnx"),
        (["--onnx", "{export}", "--precision", "fp16", "--out", "{tmp}/x"], "the export in"),
        (["--onnx", "{export}", "--max-batch", "65", "--out", "{tmp}/x"], "<= 64 (the export's limit)"),
        (["--onnx", "{export}", "--trt-version", "ten", "--check-only"], "TensorRT version must look like 10.13"),
    ],
)
def test_cli_refuses_bad_requests(tiny_plugin_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  args: list[str], message: str) -> None:
    argv = [a.format(export=tiny_plugin_export, tmp=tmp_path) for a in args]
    assert cli.main(["trt", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --- TensorRT absent -----------------------------------------------------------------------------


# `deris-export trt` where `import tensorrt` finds what tensorrt-stubs leaves in site-packages (an
# empty namespace package), run beside the other tests (tests/background.py): argv[1] is the folder
# that receives the stubs and the output, argv[2:] the command line.
NO_TENSORRT_SCRIPT = r"""
import sys
from pathlib import Path
stubs = Path(sys.argv[1]) / "stubs"
(stubs / "tensorrt").mkdir(parents=True)
(stubs / "tensorrt" / "__init__.pyi").write_text("")
sys.path.insert(0, str(stubs))
from deris.export import cli
sys.exit(cli.main(sys.argv[2:]))
"""


def no_tensorrt_job(directory: Path) -> list[str]:
    folder = directory / "without_tensorrt"
    return [sys.executable, "-c", NO_TENSORRT_SCRIPT, str(folder), "trt", "--preset", TINY, "--random-weights",
            "--resolution", "64", "--precision", "fp16", "--out", str(folder / "engines"), "--quiet"]


@pytest.fixture(scope="module")
def without_tensorrt(background: Background) -> subprocess.CompletedProcess[str]:
    return background.result("without_tensorrt")


def test_without_tensorrt_exports_checks_and_exits_2(background: Background,
                                                     without_tensorrt: subprocess.CompletedProcess[str]) -> None:
    result, folder = without_tensorrt, background.folder("without_tensorrt")
    out = folder / "engines"
    assert result.returncode == 2, result.stderr[-4000:]
    assert "ONNX verification passed" in result.stdout and "preflight passed for TensorRT 10.13" in result.stdout
    assert "TensorRT is not installed here" in result.stderr and "pip install tensorrt-cu12" in result.stderr
    assert f"are in {out / 'onnx'}" in result.stderr and f"--onnx {out / 'onnx'} --out {out} --force" in result.stderr
    # The verified export is there; no engines, no engine manifest, no staging folders.
    assert sorted(p.name for p in out.iterdir()) == ["onnx"]
    manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    assert (manifest["precision"], manifest["msda"], manifest["resolution"]) == ("fp16", "trt-plugin", 64)
    assert sorted(p.name for p in folder.iterdir()) == ["engines", "stubs"]


# --- the build, with a recording stand-in for TensorRT -------------------------------------------


class Recorder:
    """A stand-in ``tensorrt`` module: records each build and 'serializes' a plan naming the graph.
    Its timing cache grows by one byte per build, so reuse is visible."""

    def __init__(self) -> None:
        self.builds: list[dict[str, Any]] = []
        self.cache_starts: list[bytes] = []
        self.plugin_namespaces: list[str] = []

    def module(self) -> types.ModuleType:
        recorder = self
        trt = types.ModuleType("tensorrt")
        trt.__version__ = "10.13.0.35"  # type: ignore[attr-defined]

        class Logger:
            WARNING = 2

            def __init__(self, severity: int) -> None:
                self.severity = severity

        class Cache:
            def __init__(self, data: bytes) -> None:
                self.data = bytes(data)

            def serialize(self) -> bytes:
                return self.data

        class Config:
            def __init__(self) -> None:
                self.record: dict[str, Any] = {"cleared": [], "shapes": {}}

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                self.record["workspace"] = size

            def clear_flag(self, flag: str) -> None:
                self.record["cleared"].append(flag)

            def create_timing_cache(self, data: bytes) -> Cache:
                recorder.cache_starts.append(bytes(data))
                return Cache(data)

            def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
                self.cache = cache
                return True

            def add_optimization_profile(self, profile: Profile) -> int:
                self.record["shapes"] = profile.shapes
                return 0

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple[Any, ...]] = {}

            def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
                self.shapes[name] = (low, opt, high)

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags = flags
                self.data, self.path = b"", ""

        class OnnxParser:
            num_errors = 0

            def __init__(self, network: Network, logger: Logger) -> None:
                self.network = network

            def parse(self, data: bytes, path: str) -> bool:
                self.network.data, self.network.path = data, path
                return True

        class Builder:
            def __init__(self, logger: Logger) -> None:
                pass

            def create_network(self, flags: int) -> Network:
                return Network(flags)

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes:
                config.cache.data += b"."
                graph = Path(network.path).stem
                recorder.builds.append(config.record | {"graph": graph, "flags": network.flags, "data": network.data})
                return f"plan of {graph}".encode()

        trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser  # type: ignore[attr-defined]
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)  # type: ignore[attr-defined]
        trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")  # type: ignore[attr-defined]
        trt.BuilderFlag = types.SimpleNamespace(TF32="tf32")  # type: ignore[attr-defined]
        trt.Dims = tuple  # type: ignore[attr-defined]
        trt.init_libnvinfer_plugins = lambda logger, namespace: recorder.plugin_namespaces.append(namespace)  # type: ignore[attr-defined]
        return trt


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", recorder.module())
    monkeypatch.setattr(tensorrt_build, "compute_capability", lambda: 90)
    return recorder


def ort_engines(engines_dir: Path) -> Any:
    """Engines stand-in: the graphs the engine directory was built from, in ONNX Runtime."""
    return ort_runner_factory(engines_dir / "onnx")


def test_build_orchestration(tiny_export: TinyExport, recorder: Recorder, tmp_path: Path) -> None:
    out = tmp_path / "engines"
    request = TrtRequest(out=out, onnx=tiny_export.onnx_dir, opt_batch=2, max_batch=4, workspace_gib=1.5)
    assert run_trt(request, progress=False, engines=ort_engines) == out
    source = json.loads((tiny_export.onnx_dir / "manifest.json").read_text())
    graphs = list(source["graphs"])
    assert [b["graph"] for b in recorder.builds] == graphs
    for build in recorder.builds:
        entry = source["graphs"][build["graph"]]
        assert build["flags"] == 1 << 1  # STRONGLY_TYPED: the graph's dtypes are the engine's
        assert build["cleared"] == ["tf32"] and build["workspace"] == int(1.5 * 2**30)  # an fp32 export
        assert build["shapes"] == {t["name"]: tuple(tuple(b if d == "batch" else d for d in t["shape"]) for b in (1, 2, 4))
                                   for t in entry["inputs"]}
        assert build["data"] == (tiny_export.onnx_dir / entry["file"]).read_bytes()  # no plugin node to rebind
    assert recorder.plugin_namespaces == [""] and recorder.cache_starts == [b""]
    manifest = json.loads((out / "manifest.json").read_text())
    trt = manifest["tensorrt"]
    assert (manifest["onnx_dir"], manifest["preset"], trt["version"], trt["compute_capability"]) == ("onnx", TINY, "10.13.0.35", "9.0")
    assert trt["profile"] == {"min": 1, "opt": 2, "max": 4} and trt["preflight_target"] == "10.13"
    assert trt["strongly_typed"] and trt["msda_plugin"] is None and trt["parity"]["passed"]
    for name in graphs:
        engine = trt["engines"][name]
        assert (out / engine["file"]).read_bytes() == f"plan of {name}".encode()
        assert engine["sha256"] == hashlib.sha256((out / engine["file"]).read_bytes()).hexdigest()
        assert engine["onnx_sha256"] == source["graphs"][name]["files"][0]["sha256"]
    assert (out / "timing.cache").read_bytes() == b"." * len(graphs)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["onnx", "manifest.json", "timing.cache", "parity.txt", *(f"{g}.plan" for g in graphs)])
    assert "PASS" in (out / "parity.txt").read_text() and "FAIL" not in (out / "parity.txt").read_text()
    # Rebuilding over it starts from its timing cache; --timing-cache is read first, and written too.
    n = len(graphs)
    assert run_trt(TrtRequest(out=out, onnx=out / "onnx", max_batch=4, force=True), progress=False, engines=ort_engines)
    assert recorder.cache_starts[-1] == b"." * n and (out / "timing.cache").read_bytes() == b"." * 2 * n
    shared = tmp_path / "shared.cache"
    shared.write_bytes(b"shared")
    run_trt(TrtRequest(out=out, onnx=out / "onnx", max_batch=4, force=True, timing_cache=shared), progress=False,
            engines=ort_engines)
    assert recorder.cache_starts[-1] == b"shared" and shared.read_bytes() == b"shared" + b"." * n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines", "shared.cache"]  # no staging left
    # The engine directory is what the Triton repository generator takes.
    repo = generate_triton_repo(out / "onnx", tmp_path / "repo", "tensorrt", engines_dir=out, spm_path=tiny_export.spm,
                                max_batch_size=4)
    assert (repo / "round_1" / "1" / "model.plan").read_bytes() == b"plan of round_1"


def test_plugin_version_is_the_builds(tiny_plugin_export: Path, recorder: Recorder, tmp_path: Path) -> None:
    from deris.export.msda import PLUGIN_OP

    def versions(data: bytes) -> set[str]:
        model = onnx.ModelProto.FromString(data)
        return {a.s.decode() for n in model.graph.node if n.op_type == PLUGIN_OP for a in n.attribute
                if a.name == "plugin_version"}

    path = tiny_plugin_export / "perception.onnx"
    assert versions(path.read_bytes()) == {"1"}  # as exported
    assert versions(network_bytes(path, "2")) == {"2"}
    out = tmp_path / "engines"
    run_trt(TrtRequest(out=out, onnx=tiny_plugin_export, max_batch=2), progress=False, engines=ort_engines)
    (build,) = [b for b in recorder.builds if b["graph"] == "perception"]
    assert versions(build["data"]) == {"2"} and build["cleared"] == ["tf32"]
    assert json.loads((out / "manifest.json").read_text())["tensorrt"]["msda_plugin"] == {
        "name": "MultiscaleDeformableAttnPlugin_TRT", "version": "2"}
    assert versions((out / "onnx" / "perception.onnx").read_bytes()) == {"1"}  # the graph files stay as verified


class Perturbed:
    """Runner factory: ONNX Runtime with one output negated, as a wrong engine would give it."""

    def __init__(self, onnx_dir: Path, output: str) -> None:
        self.onnx_dir, self.output = onnx_dir, output

    def __call__(self, graph: str) -> Any:
        from polygraphy.backend.onnxrt import OnnxrtRunner

        from deris.export.runtime import ort_session

        output = self.output

        class Negating(OnnxrtRunner):
            def infer_impl(self, feed_dict: Any) -> OrderedDict[str, np.ndarray]:
                outputs: OrderedDict[str, np.ndarray] = super().infer_impl(feed_dict)
                if output in outputs:
                    outputs[output] = -outputs[output]
                return outputs

        entry = json.loads((self.onnx_dir / "manifest.json").read_text())["graphs"][graph]
        return Negating(ort_session(self.onnx_dir / entry["file"], entry["custom_ops"]), name="tensorrt")


def test_parity_passes_and_fails(tiny_export: TinyExport, tiny_model: deris.DeRIS) -> None:
    onnx_dir = tiny_export.onnx_dir
    report = check_engines(onnx_dir, ort_runner_factory(onnx_dir), tiny_model, max_batch=4)
    graphs = json.loads((onnx_dir / "manifest.json").read_text())["graphs"]
    outputs = {(g, len(e["outputs"])) for g, e in graphs.items()}
    assert {(c.graph, c.batch) for c in report.graphs} == {(g, b) for g, _ in outputs for b in (1, 3)}
    assert len(report.graphs) == 2 * sum(n for _, n in outputs)
    assert report.passed and all(c.max_abs == 0.0 for c in report.graphs)  # the same graphs on both sides
    # ONNX Runtime fp32 against PyTorch fp32: masks of both layouts agree with the model's.
    assert {(c.layout, c.sample) for c in report.end_to_end} == {(layout, s) for layout in ("rounds", "fused") for s in range(4)}
    assert all(c.mask_iou >= 0.99 for c in report.end_to_end)
    wrong = check_engines(onnx_dir, Perturbed(onnx_dir, "mask_logits"), tiny_model, max_batch=2)
    failed = {(c.graph, c.output) for c in wrong.graphs if not c.passed}
    assert failed == {(g, "mask_logits") for g, e in graphs.items() if any(t["name"] == "mask_logits" for t in e["outputs"])}
    assert not wrong.passed and min(c.mask_iou for c in wrong.end_to_end) < 0.99
    assert {c.batch for c in wrong.graphs} == {1, 2}  # the batches the profile accepts


def test_failed_parity_keeps_the_engines_marked(tiny_export: TinyExport, recorder: Recorder, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "engines"
    with pytest.raises(CheckFailed, match="engine parity failed .*kept in .*marked as failed"):
        run_trt(TrtRequest(out=out, onnx=tiny_export.onnx_dir, max_batch=2), progress=False,
                engines=lambda d: Perturbed(d / "onnx", "refer_logits"))
    parity = json.loads((out / "manifest.json").read_text())["tensorrt"]["parity"]
    assert not parity["passed"] and parity["end_to_end_reference"] == "fp32 PyTorch"
    assert {c["output"] for c in parity["graphs"] if not c["passed"]} == {"refer_logits"}
    assert "FAIL" in (out / "parity.txt").read_text() and "FAIL" in capsys.readouterr().out


# --- the triton-plugin -----------------------------------------------------------------------------

AOT_SCRIPT = r"""
import json, sys
from deris.kernels import aot
from deris.kernels.ms_deform_attn import _msda_fused_forward_kernel as launcher_kernel
from deris.export.triton_plugin import MsdaShape, compile_kernel, launch_dims, plan_launch

shapes = [MsdaShape(*s) for s in json.loads(sys.argv[1])]
out = []
for index, shape in enumerate(shapes):
    kernels = {cc: compile_kernel(shape, cc) for cc in ((80, 90) if index == 0 else (90,))}
    launcher = aot.compile_launch(plan_launch(shape, 1), aot.ARCHS["sm_90"])
    planned = {b: plan_launch(shape, b) for b in (1, 2, 7)}
    dims = {b: launch_dims(b, shape, kernels[90]) for b in planned}
    out.append({
        "same_kernel": all(p.kernel is launcher_kernel for p in planned.values()),
        "ptx": {cc: k.ptx for cc, k in kernels.items()}, "names": {cc: k.name for cc, k in kernels.items()},
        "grids": {b: [list(p.grid), p.meta["num_warps"] * 32] for b, p in planned.items()},
        "dims": {b: [[d.grid_x, d.grid_y], d.block_x] for b, d in dims.items()},
        "shared": [kernels[90].shared, launcher.metadata.shared],
        "launcher_params": launcher.asm["ptx"].split(".entry")[1].split(")")[0].count(".param"),
    })
print(json.dumps(out))
"""

# (keys, queries, heads, head_dim, levels, points): deris-tiny at 128 px, DeRIS at 384 px, an odd one.
AOT_SHAPES = [(336, 336, 8, 32, 3, 4), (3024, 3024, 8, 32, 3, 4), (41, 50, 4, 16, 2, 2)]


def background_jobs(directory: Path) -> dict[str, list[str]]:
    return {"aot_results": [sys.executable, "-c", AOT_SCRIPT, json.dumps(AOT_SHAPES)],
            "without_tensorrt": no_tensorrt_job(directory)}


@pytest.fixture(scope="module")
def aot_results(background: Background) -> list[dict[str, Any]]:
    """Compiled beside the other tests (tests/background.py), without TRITON_INTERPRET: this process
    defines the kernels for the interpreter."""
    result = background.result("aot_results")
    assert result.returncode == 0, result.stderr[-4000:]
    data: list[dict[str, Any]] = json.loads(result.stdout)
    return data


def test_plugin_ptx_is_the_launchers_kernel_for_sm80_and_sm90(aot_results: list[dict[str, Any]], tmp_path: Path) -> None:
    from triton import knobs

    first = aot_results[0]
    assert first["same_kernel"] and set(first["ptx"]) == {"80", "90"}
    for cc, ptx in first["ptx"].items():
        assert first["names"][cc] == "_msda_fused_forward_kernel"
        # Triton's line table names the source: the kernel module the PyTorch launcher runs.
        assert re.search(r'\.file\s+\d+\s+".*kernels[/\\]ms_deform_attn\.py"', ptx)
        arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)  # type: ignore[union-attr]
        assert arch.startswith(f"sm_{cc}")
        # The entry takes the 5 inputs and the output only: the launcher's entry also has 3 ints
        # (num_keys, num_queries, query_bucket) and Triton's 2 hidden scratch pointers, which
        # TensorRT's AOT launcher would not pass.
        entry = ptx.split(".entry")[1].split(")")[0]
        assert entry.count(".param .u64 .ptr") == 6 and first["launcher_params"] == 11
        source, cubin = tmp_path / f"k{cc}.ptx", tmp_path / f"k{cc}.cubin"
        source.write_text(ptx)
        subprocess.run([knobs.nvidia.ptxas.path, f"--gpu-name={arch}", str(source), "-o", str(cubin)], check=True)
        elf = subprocess.run([knobs.nvidia.cuobjdump.path, "-elf", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
        assert re.search(r"EIATTR_CBANK_PARAM_SIZE\s+Format:\s+EIFMT_HVAL\s+Value:\s+0x30\b", elf)  # 6 x 8 bytes


def test_plugin_launch_dims_are_the_launchers(aot_results: list[dict[str, Any]]) -> None:
    for shape, result in zip(AOT_SHAPES, aot_results):
        assert result["same_kernel"], shape
        assert result["dims"] == result["grids"], shape  # grid (x, y) and block_x at batch 1, 2 and 7
        assert result["shared"][0] == result["shared"][1], shape


def test_hidden_parameters_are_removed_only_when_unread() -> None:
    ptx = (".entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1,\n\t.param .u64 k_param_2\n)\n{\n"
           "\tld.param.b64 %rd1, [k_param_0];\n}\n")
    stripped = triton_plugin._hidden_parameters_removed(ptx, "k", 1)
    assert "k_param_1" not in stripped and "k_param_2" not in stripped and "k_param_0" in stripped
    with pytest.raises(RuntimeError, match="reads its hidden parameter 1"):
        triton_plugin._hidden_parameters_removed(ptx.replace("[k_param_0]", "[k_param_1]"), "k", 1)


def test_triton_plugin_graph_runs_in_onnxruntime(tiny_model: deris.DeRIS, tmp_path: Path) -> None:
    import deris.kernels as kernels
    from deris.export.graphs import build_graph, example_inputs
    from deris.export.runtime import ort_session
    from deris.kernels.ms_deform_attn import _level_table
    from deris.modeling.pixel_decoder import msda_function
    from deris.topology import BATCH, pipeline_topology

    spec = pipeline_topology(tiny_model.cfg, 128).graphs["perception"]
    graph = build_graph(spec, tiny_model)
    args = example_inputs(spec, 2)
    path = tmp_path / "perception.onnx"
    with msda_function(triton_plugin.msda_fused), kernels.backend("torch"), torch.no_grad():
        program = torch.onnx.export(graph, args, dynamo=True, opset_version=18, input_names=["img"],
                                    output_names=[t.name for t in spec.outputs],
                                    dynamic_shapes={"img": {0: torch.export.Dim(BATCH, min=1, max=64)}},
                                    custom_translation_table=triton_plugin.custom_translation_table())
    assert program is not None
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type == triton_plugin.PLUGIN_NAME]
    assert len(nodes) == tiny_model.cfg.pixel_decoder.num_layers and "GridSample" not in {n.op_type for n in model.graph.node}
    initializers = {i.name: i for i in model.graph.initializer}
    expected_table = _level_table(((4, 4), (8, 8), (16, 16)), torch.device("cpu")).tolist()
    for node in nodes:
        assert node.domain == "deris" and {a.name: helper.get_attribute_value(a) for a in node.attribute} == {
            "plugin_namespace": b"deris", "aot": 1}
        table = initializers[node.input[1]]
        assert table.data_type == TensorProto.INT32 and onnx.numpy_helper.to_array(table).tolist() == expected_table
    triton_plugin.register_ort_kernel()
    session = ort_session(path, ["deris::msda_fused"])
    image = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    produced = session.run(None, {"img": image.numpy()})
    with kernels.backend("torch"), torch.inference_mode():
        expected = graph(image)
    for name, value, reference in zip((t.name for t in spec.outputs), produced, expected):
        scale = float(reference.abs().max())
        assert np.abs(value - reference.numpy()).max() <= 1e-4 * scale + 1e-5, name
    # The preflight binds the node to the AOT plugin from TensorRT 10.9 on.
    entry = {"inputs": [{"name": "img"}]}
    assert check_graph(path, entry, TrtTarget.parse("10.9"), (1, 1, 8), "batch")[-1].status == PASS
    assert check_graph(path, entry, TrtTarget.parse("10.8"), (1, 1, 8), "batch")[-1].detail == (
        "ahead-of-time Python plugins need TensorRT >= 10.9 (target 10.8)")


def test_plugin_module_keeps_real_annotations() -> None:
    # tensorrt.plugin checks the QDP functions' annotations with issubclass: no string annotations.
    assert not hasattr(triton_plugin, "annotations")


# --- tensorrt-stubs --------------------------------------------------------------------------------


def _fix_stubs_module() -> Any:
    spec = importlib.util.spec_from_file_location("fix_trt_stubs", REPO / ".ci" / "fix_trt_stubs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stub_fixups() -> None:
    fixed = _fix_stubs_module().fix_stub(
        "from __future__ import annotations\nimport tensorrt_libs\nbool: DataType\n"
        "def f(self, in: int, a: int = 1, b: str) -> bool: ...\n__all__ = ['bool']\n"
    )
    compile(fixed, "<stub>", "exec")
    assert fixed.splitlines()[:2] == ["from __future__ import annotations", "import builtins"]
    assert "tensorrt_libs" not in fixed and "\nbool: DataType\n" in fixed and "['bool']" in fixed
    assert "def f(self, in_: int, a: int = 1, b: str = ...) -> builtins.bool: ..." in fixed


def test_tensorrt_code_type_checks_against_stubs(tmp_path: Path) -> None:
    typings = REPO / "typings"
    if not (typings / "tensorrt" / "plugin.pyi").is_file():
        typings = tmp_path / "typings"
        _fix_stubs_module().main(["--out", str(typings)])
    # A misuse the stubs must catch, next to the real modules.
    bad = tmp_path / "misuse.py"
    bad.write_text("import tensorrt as trt\nimport tensorrt.plugin as trtp\n\n\n"
                   "def f(parser: trt.OnnxParser) -> int:\n    p = trtp.KernelLaunchParams()\n    p.grid_x = 'x'\n"
                   "    return parser.num_error\n")
    config = tmp_path / "mypy.ini"
    config.write_text(f"[mypy]\npython_version = 3.11\nignore_missing_imports = true\ncheck_untyped_defs = true\n"
                      f"warn_unused_ignores = true\nmypy_path = {typings}\n\n[mypy-tensorrt.*,tensorrt_bindings.*]\n"
                      "ignore_errors = True\n")
    # Errors are reported for the files named here only (imports are followed silently); a cache of
    # its own, since mypy's shared one can replay a same-named module's errors from another folder.
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), "--follow-imports=silent",
                             "--cache-dir", str(tmp_path / "mypy_cache"),
                             str(REPO / "export" / "triton_plugin.py"),
                             str(REPO / "export" / "tensorrt_build.py"), str(bad)], capture_output=True, text=True, cwd=REPO)
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert all(line.startswith(str(bad)) for line in errors), result.stdout
    assert any('has no attribute "num_error"' in e for e in errors) and any("grid_x" in e or '"str"' in e for e in errors)
