"""The benchmark harness (benchmarks/harness.py), the latency sweep (benchmarks/latency.py), the
offline ONNX Runtime optimisation (export/ort_optimize.py) and the GPU check's CPU dry run.

The sweep runs on fake backends whose calls report a chosen time (the clock is replaced), so the
ratios, exponents and tables are checked against exact values; the real CPU path (deris-tiny,
one run) is what ``benchmarks/gpu_check.sh --dry-run`` runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

from deris.export import ort_optimize

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.append(str(BENCHMARKS))  # appended: benchmarks/kernels.py must not shadow the kernels package
import harness  # noqa: E402
import latency  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- harness ----------------------------------------------------------------------------------------


def test_interleaved_rounds_alternate_and_warm_up_every_callable(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(harness, "time_ms", lambda call, cuda: call() or 1.0)
    times = harness.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, runs=4, cuda=False)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then A B, B A, ...
    assert times == {"a": [1.0] * 4, "b": [1.0] * 4}


def test_pair_ratio_is_the_median_of_same_round_ratios():
    baseline = [10.0, 20.0, 30.0, 40.0, 1000.0]  # the machine drifts and one round is disturbed
    other = [5.0, 10.0, 15.0, 20.0, 100.0]
    ratio = harness.pair_ratio(baseline, other)
    assert ratio.median == pytest.approx(2.0)
    assert (ratio.low, ratio.high, ratio.pairs) == (pytest.approx(2.0), pytest.approx(2.0), 5)
    assert ratio.text() == "2.00x [2.00-2.00]"
    # Medians of the two series taken apart would say 2.0 too here, but not under drift:
    assert harness.pair_ratio([10.0, 100.0, 100.0], [5.0, 50.0, 200.0]).median == pytest.approx(2.0)
    with pytest.raises(ValueError, match="equally long"):
        harness.pair_ratio([1.0, 2.0], [1.0])


def test_fit_exponent_recovers_the_power_law():
    pixels = [r * r for r in (384, 512, 640, 1024)]
    assert harness.fit_exponent(pixels, [3.0 * p**0.8 for p in pixels]) == pytest.approx(0.8)
    assert harness.fit_exponent(pixels, [7.0 * p for p in pixels]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two different pixel counts"):
        harness.fit_exponent([100, 100], [1.0, 2.0])


def test_percentiles_and_the_closed_loop():
    assert harness.percentiles(list(range(101))) == [50.0, 90.0, 99.0]
    seen: list[tuple[int, int]] = []
    run = harness.closed_loop("x", lambda worker: lambda i: seen.append((worker, i)), requests=7, concurrency=3, warmup=1)
    assert run.requests == 7 and run.concurrency == 3 and run.throughput > 0
    assert sorted(w for w, _ in seen) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]  # 1 warm-up each, 3 + 2 + 2 timed


def test_closed_loop_reports_a_failing_client():
    def sender(worker: int):
        def send(i: int) -> None:
            raise ConnectionError("server gone")
        return send

    with pytest.raises(ConnectionError, match="server gone"):
        harness.closed_loop("x", sender, requests=2, concurrency=2, warmup=0)


def test_writers(tmp_path):
    rows = [{"a": 1, "b": "x,y"}, {"a": 2, "c": 3.5}]
    with open(harness.write_csv(tmp_path / "t.csv", rows)) as f:
        assert list(csv.DictReader(f)) == [{"a": "1", "b": "x,y", "c": ""}, {"a": "2", "b": "", "c": "3.5"}]
    assert harness.markdown_table(("k", "v"), [("a", 1)], [False, True]) == "| k | v |\n|---|---:|\n| a | 1 |"
    assert not list(tmp_path.glob(".*")), "a temporary file was left behind"


def test_cpu_peak_memory_sees_an_allocation():
    def allocate() -> None:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
        assert block.sum() > 0

    peak = harness.peak_memory_mib(allocate, cuda=False)
    assert peak is not None and peak >= 64


# --- the sweep, on fake backends ---------------------------------------------------------------------


class FakeBackend(latency.Backend):
    """Each call "takes" scale * pixels^exponent ms (the clock is replaced by the calls' results)."""

    def __init__(self, ctx, name: str, scale: float, exponent: float = 0.5, fail_at_batch: int | None = None):
        super().__init__(ctx)
        self.name, self.scale, self.exponent, self.fail_at_batch = name, scale, exponent, fail_at_batch
        self.loaded: list[int] = []

    def load(self, resolution: int) -> None:
        super().load(resolution)
        self.loaded.append(resolution)

    def stages(self, batch: int, request):
        if batch == self.fail_at_batch:
            raise MemoryError("out of memory")
        assert len(request.images) == batch and len(request.texts) == batch
        ms = self.scale * batch * (self.resolution**2) ** self.exponent
        return {stage: (lambda ms=ms: ms) for stage in latency.STAGES}

    def peak_memory(self, call):
        return 123.0

    def msda_share(self):
        return 0.25

    def unload(self) -> None:
        self.loaded.remove(self.resolution)


def fake_context(tmp_path: Path, **overrides) -> latency.Context:
    args = argparse.Namespace(resolutions=(384, 640, 1024), batch=(1, 2), stages=latency.STAGES, runs=3, warmup=1,
                              settle_ms=0.0, checkpoint=None, concurrency=2, device="cpu", threads=2)
    for key, value in overrides.items():
        setattr(args, key, value)
    return latency.Context(args, torch.nn.Module(), tmp_path, tmp_path / "spm", None, b"jpeg")


class Silent:
    def write(self, text: str) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def test_sweep_interleaves_backends_and_takes_ratios_against_the_first(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "time_ms", lambda call, cuda: float(call()))
    ctx = fake_context(tmp_path)
    base, fast = FakeBackend(ctx, "slow", 2.0), FakeBackend(ctx, "fast", 0.5, exponent=0.9, fail_at_batch=2)
    results = latency.sweep([base, fast], ctx, Silent())
    assert not base.loaded and not fast.loaded, "every loaded resolution is unloaded"

    ok = [m for m in results.measurements if m.error is None]
    assert {(m.backend, m.stage, m.resolution, m.batch) for m in ok} == (
        {("slow", s, r, b) for s in latency.STAGES for r in (384, 640, 1024) for b in (1, 2)}
        | {("fast", s, r, 1) for s in latency.STAGES for r in (384, 640, 1024)})
    assert all(len(m.times) == 3 for m in ok)
    failed = [m for m in results.measurements if m.error is not None]
    assert {m.error for m in failed} == {"OOM"} and {(m.backend, m.batch) for m in failed} == {("fast", 2)}
    point = results.get("fast", "perception", 640, 1)
    assert point is not None and point.speedup is not None
    assert point.speedup.median == pytest.approx(2.0 * 640 / (0.5 * 640**1.8))
    assert results.get("slow", "perception", 640, 1).speedup is None  # the baseline
    assert results.get("slow", "end_to_end", 384, 2).peak_mib == 123.0
    assert results.get("slow", "cognition", 384, 2).peak_mib is None  # memory is taken end to end
    assert results.msda == [(name, r, 1, 0.25) for r in (384, 640, 1024) for name in ("slow", "fast")]

    fitted = latency.exponents(results, ["slow", "fast"], batch=1)
    assert fitted["slow"][0] == pytest.approx(0.5) and fitted["fast"][0] == pytest.approx(0.9)
    assert fitted["slow"][1] == (384, 640, 1024)


def test_exponent_range_falls_back_to_all_resolutions(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "time_ms", lambda call, cuda: float(call()))
    ctx = fake_context(tmp_path, resolutions=(128, 256, 384), batch=(1,), stages=("end_to_end",))
    results = latency.sweep([FakeBackend(ctx, "a", 1.0, exponent=0.7)], ctx, Silent())
    (k, used), = latency.exponents(results, ["a"], 1).values()
    assert used == (128, 256, 384) and k == pytest.approx(0.7)


def test_an_interrupted_sweep_keeps_what_it_measured(tmp_path, monkeypatch):
    """A time limit's SIGTERM (turned into KeyboardInterrupt) stops the sweep; the points measured
    so far stay and every backend is unloaded."""
    monkeypatch.setattr(harness, "time_ms", lambda call, cuda: float(call()))

    class Stopped(FakeBackend):
        def stages(self, batch, request):
            if self.resolution == 640:
                raise KeyboardInterrupt
            return super().stages(batch, request)

    ctx = fake_context(tmp_path, stages=("end_to_end",), batch=(1,))
    backend = Stopped(ctx, "a", 1.0)
    results = latency.sweep([backend], ctx, Silent())
    assert results.interrupted and not backend.loaded
    assert [(m.resolution, m.error) for m in results.measurements] == [(384, None)]


def test_report_csv_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "time_ms", lambda call, cuda: float(call()))
    ctx = fake_context(tmp_path, resolutions=(384, 1024))
    model = torch.nn.Module()
    model.cfg = type("Cfg", (), {"name": "fake", "mini_image_size": 224, "max_text_len": 16, "num_queries": 5})()
    ctx.model = model
    backends = [FakeBackend(ctx, "slow", 2.0), FakeBackend(ctx, "fast", 1.0)]
    results = latency.sweep(backends, ctx, Silent())
    stamp = harness.Stamp("cpu", "Test CPU", "none", "none", 2, "glibc malloc keeps freed memory", "Python x", "2026-12-01", "abc123", 0.5)
    report = latency.markdown(results, backends, ctx, stamp, "python benchmarks/latency.py")
    assert "| end_to_end | 384 | 1 | fast | 384.0 | 384.0 | 384.0 | 2.60 | 123.0 | 2.00x [2.00-2.00] |" in report
    assert "| slow | 0.50 | 384, 1024 |" in report and "| fast | 0.50 | 384, 1024 |" in report
    assert "git commit abc123" in report and "Test CPU" in report and "seeded random" in report
    assert "- CPU memory: glibc malloc keeps freed memory" in report

    out = tmp_path / "out"
    written = latency.write_outputs(out, results, backends, ctx, stamp, report)
    assert {p.name for p in written} == {"latency.md", "summary.csv", "samples.csv", "latency_vs_resolution.png",
                                         "throughput_vs_batch.png"}
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 2 * 4 * 2 * 2 and {r["commit"] for r in summary} == {"abc123"}
    assert {r["malloc"] for r in summary} == {"glibc malloc keeps freed memory"}
    fast = next(r for r in summary if (r["backend"], r["stage"], r["resolution"], r["batch"]) == ("fast", "decoder", "1024", "2"))
    assert float(fast["speedup"]) == pytest.approx(2.0) and float(fast["p50_ms"]) == pytest.approx(2048.0)
    with open(out / "samples.csv") as f:
        assert sum(1 for _ in csv.DictReader(f)) == 2 * 4 * 2 * 2 * 3
    for png in ("latency_vs_resolution.png", "throughput_vs_batch.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


def test_the_stamp_says_how_malloc_was_set(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for name in [n for n in os.environ if n.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    assert harness.set_malloc("default") == "the C library's malloc defaults (--malloc default)"
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")  # the user's own setting wins, and this process is left alone
    assert harness.set_malloc("keep") == "malloc as the environment sets it (MALLOC_MMAP_MAX_=0)"


def background_jobs(directory: Path) -> dict[str, list[str]]:
    """The issue's command, as a user runs it (the user's own malloc settings would change the report),
    run beside the other tests (tests/background.py): the shipped demo model (its weights are the
    default for its preset), PyTorch against ONNX Runtime's optimised graphs, two resolutions, three runs."""
    unset = [f"--unset={name}" for name in os.environ if name.startswith("MALLOC_") or name == "GLIBC_TUNABLES"]
    return {"demo_sweep": ["env", *unset, sys.executable, str(BENCHMARKS / "latency.py"), "--preset", "deris-demo",
                           "--backends", "torch,onnxruntime", "--resolutions", "288,416", "--batch", "1", "--runs", "3",
                           "--quiet", "--out", str(directory / "demo_sweep")]}


@pytest.fixture(scope="module")
def demo_sweep(background) -> Path:
    result = background.result("demo_sweep")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return background.folder("demo_sweep")


def test_the_demo_model_sweep_on_the_cpu(demo_sweep):
    out = demo_sweep
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    points = {(r["backend"], r["stage"], r["resolution"]) for r in rows}
    assert points == {(b, s, px) for b in ("torch", "onnxruntime") for s in latency.STAGES for px in ("288", "416")}
    assert all(r["error"] == "" and float(r["p50_ms"]) > 0 for r in rows)
    assert all(math.isfinite(float(r["speedup"])) for r in rows if r["backend"] == "onnxruntime")
    report = (out / "latency.md").read_text()
    assert "deris-demo.safetensors" in report and "seeded random" not in report
    assert "- CPU memory: glibc malloc keeps freed memory (--malloc keep)" in report
    for png in ("latency_vs_resolution.png", "throughput_vs_batch.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


def test_command_line_errors_and_help():
    with pytest.raises(SystemExit):
        latency.parse_args(["--resolutions", "300"])  # not a multiple of 32
    with pytest.raises(SystemExit):
        latency.parse_args(["--backends", "torch,cuda-magic"])
    with pytest.raises(SystemExit):
        latency.parse_args(["--device", "cpu", "--backends", "torch,torch-fp16"])  # fp16 needs a GPU
    args = latency.parse_args(["--device", "cpu", "--resolutions", "416,288,288", "--batch", "4,1"])
    assert args.resolutions == (288, 416) and args.batch == (1, 4) and args.backends == ("torch", "onnxruntime")
    assert args.ort_pool == "shared" and latency.parse_args(["--ort-pool", "per-session"]).ort_pool == "per-session"
    help_text = latency.build_parser().format_help()
    for option in ("--preset", "--checkpoint", "--backends", "--resolutions", "--batch", "--runs", "--warmup",
                   "--concurrency", "--ort-pool", "--out", "interleaved", "exponent"):
        assert option in help_text


# --- export/ort_optimize.py --------------------------------------------------------------------------


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.nn.functional.gelu(self.fc(x)))


def _fake_export(directory: Path) -> np.ndarray:
    """A one-graph export directory (the manifest fields optimize_export reads) and a test input."""
    directory.mkdir()
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16)
    program = torch.onnx.export(_Block().eval(), (x,), dynamo=True, opset_version=18, input_names=["x"], verbose=False)
    program.save(str(directory / "cognition.onnx"))
    manifest = {"format_version": 1, "graphs": {"cognition": {"file": "cognition.onnx", "custom_ops": []}},
                "topology": {"graphs": {"cognition": {"kind": "cognition"}}}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return x.numpy()


def test_optimize_export_fuses_gelu_keeps_outputs_and_records_the_graph(tmp_path):
    directory = tmp_path / "export"
    x = _fake_export(directory)
    manifest = ort_optimize.optimize_export(directory)
    entry = manifest["graphs"]["cognition"]["optimized"]
    assert entry["file"] == "cognition.opt.onnx" and entry["fused"].get("BiasGelu") == 1
    assert entry["nodes_after"] < entry["nodes_before"]
    assert json.loads((directory / "manifest.json").read_text())["graphs"]["cognition"]["optimized"] == entry
    plain = onnxruntime.InferenceSession(str(directory / "cognition.onnx"), providers=["CPUExecutionProvider"])
    fused = ort_optimize.optimized_session(directory, "cognition", threads=1)
    assert {n.op_type for n in onnx.load(str(directory / "cognition.opt.onnx")).graph.node} >= {"BiasGelu"}
    np.testing.assert_allclose(fused.run(None, {"x": x})[0], plain.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_fusions_keep_a_transpose_that_other_nodes_read():
    """ORT 1.32's optimizer deletes the first of two equal Transposes even when another node reads
    it (the Swin attention-mask subgraph); the optimisation must leave such a graph valid."""
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
         helper.make_node("Transpose", ["t1"], ["y"], perm=[1, 0]),
         helper.make_node("Relu", ["t1"], ["r"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]), helper.make_tensor_value_info("r", TensorProto.FLOAT, [3, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    fused = ort_optimize._fuse(model, "perception")
    onnx.checker.check_model(fused)
    for got, want in zip(_run(fused, {"x": x}), (x, np.maximum(x.T, 0))):
        np.testing.assert_array_equal(got, want)


def _online_ops(model: onnx.ModelProto, options: onnxruntime.SessionOptions, tmp_path: Path) -> list[str]:
    """The node types of ``model`` after ONNX Runtime's online optimisation with ``options``."""
    options.optimized_model_filepath = str(tmp_path / "online.onnx")
    onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def test_session_options(tmp_path):
    options = ort_optimize.session_options(3)
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert ort_optimize.session_options(spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    # A post-LN residual as the pixel decoder has them: ORT fuses it into its slow CPU
    # SkipLayerNormalization unless the CPU options turn the fusion off (export/ort_optimize.py).
    shape = [1, 6, 8]
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["s"]), helper.make_node("LayerNormalization", ["s", "g", "b"], ["z"], axis=-1)],
        "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "xy"],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, shape)],
        [helper.make_tensor("g", TensorProto.FLOAT, [8], [1.0] * 8), helper.make_tensor("b", TensorProto.FLOAT, [8], [0.0] * 8)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert _online_ops(model, ort_optimize.session_options(1, cpu=False), tmp_path) == ["SkipLayerNormalization"]
    assert _online_ops(model, ort_optimize.session_options(1), tmp_path) == ["Add", "LayerNormalization"]
    assert options.use_per_session_threads and ort_optimize.shared_pool_threads() is None


# The shared pool is the process's for good: checked in a fresh interpreter.
SHARED_POOL_SCRIPT = """
import numpy as np, onnxruntime, pytest
from onnx import TensorProto, helper
from deris.export import ort_optimize
for bad in (0, 1.5, True):
    with pytest.raises(ValueError, match="positive int"):
        ort_optimize.share_thread_pool(bad)
ort_optimize.share_thread_pool(2)
ort_optimize.share_thread_pool(2)  # the same size again: nothing to do
with pytest.raises(RuntimeError, match="already shares an ONNX Runtime pool of 2 threads"):
    ort_optimize.share_thread_pool(3)
assert ort_optimize.shared_pool_threads() == 2
options = ort_optimize.session_options(3, spinning=False)
assert not options.use_per_session_threads
with pytest.raises(RuntimeError, match="allow_spinning"):  # not set: the shared pool spins
    options.get_session_config_entry("session.intra_op.allow_spinning")
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
x = np.array([-1, 0, 2, -3], dtype=np.float32)
np.testing.assert_array_equal(session.run(None, {"x": x})[0], np.maximum(x, 0))
# A session with a pool of its own is what ONNX Runtime refuses once the shared pool exists.
with pytest.raises(Exception, match="use_per_session_threads must be false"):
    onnxruntime.InferenceSession(model, onnxruntime.SessionOptions(), providers=["CPUExecutionProvider"])
print("shared pool ok")
"""


def test_shared_thread_pool_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-c", SHARED_POOL_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "shared pool ok" in result.stdout, result.stdout + result.stderr[-3000:]


# --- benchmarks/gpu_check.sh --------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils")
def test_gpu_check_dry_run_runs_the_cpu_latency_path(tmp_path):
    """The dry run CI runs: the plan of every step, and latency.py on deris-tiny on the CPU."""
    result = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (tmp_path / "gpu_check.md").read_text()
    assert summary.startswith("# GPU check (dry run on the CPU)")
    for step in ("install", "pytest", "kernels", "ort"):
        assert f"| {step} | dry run:" in summary
    assert "| latency | passed |" in summary and "-m gpu" in summary
    out = tmp_path / "latency-dry-run"
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["backend"], r["stage"]) for r in rows} == {("torch", s) for s in ("cognition", "perception", "end_to_end")}
    assert all(r["error"] == "" and float(r["p50_ms"]) > 0 and r["preset"] == "deris-tiny" for r in rows)
    report = (out / "latency.md").read_text()
    assert "## Share of the perception graph spent in MSDA" in report and "seeded random" in report
    for png in ("latency_vs_resolution.png", "throughput_vs_batch.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
