"""Offline ONNX Runtime optimisation of an export directory, and the session settings that go with it.

What the exported graphs look like to ONNX Runtime's CPU fusions (measured on deris-b-grefcoco
at 384 with ORT 1.32; ``benchmarks/latency.py`` times the result):

* GELU is exported as ``x * (0.5 * (1 + erf(x / sqrt 2)))``, the 0.5 applied to the erf term:
  ORT's online GeluFusion does not match that order, so every GELU stays 5 nodes. The
  transformer optimizer's GELU fusion does match it, and folds the bias Add in (``BiasGelu``).
* Residual Add + LayerNormalization: ORT 1.32's CPU ``SkipLayerNormalization`` kernel is slower
  than the two nodes it replaces (Add + LayerNormalization on [1, 3024, 256], 2 threads: 1.83 ms
  fused, 0.33 ms unfused). So the transformer optimizer's fusion is left out (on the perception
  graph it made Swin-S at 384 12 % slower; on the others it matches nothing) and
  :func:`session_options` turns off ORT's online ``SkipLayerNormFusion``, which would otherwise
  fuse the pixel decoder's twelve post-LN pairs and 34 in the decoder graph (without it:
  perception 4 %, decoder 3 % faster). The cognition graph (BEiT-3, pre-LN) has no pair it matches.
* Attention: neither online nor with the transformer optimizer do the BEiT-3 or the Swin blocks
  become Attention/MultiHeadAttention nodes. Its patterns want one projection MatMul per Q/K/V
  fed by one tensor; BEiT-3's multiway projections are Slice -> a MatMul per modality -> Concat,
  and the Swin window attention is one qkv MatMul split by Gather. What is left of attention
  besides its two GEMMs (masking Where, Softmax, Transposes) is under 5 % of either graph. Nor does
  a hand-made rewrite into ``com.microsoft.MultiHeadAttention`` pay (one block's graph built both
  ways, 2 threads, interleaved pairs, 2026-12-04): a Swin-S window-attention block at 384 (qkv
  MatMul, Split, MHA with the relative-position bias and shift mask folded into its
  ``attention_bias``, proj) ran 0.94-1.15x as fast as the exported block (median per stage), and
  BEiT-3's attention after its projections (key-padding mask) 1.4x, 1.8 -> 1.2 ms a layer: about
  6 ms of the cognition graph's 150-335 ms, under 1 % end to end.
* MSDA is exported query-last and summed level by level (``export/msda.py``), not as the
  reference's concatenation of every level's samples and one contraction: ORT's CPU Einsum ran
  that contraction through transposed copies (6 % of the perception graph), and even as Mul +
  ReduceSum the [8, 32, 3024, 12] concatenation (3.4 ms a layer), the 2-float-span broadcasts of
  the location arithmetic (2 ms a layer) and the sum over the innermost axis cost more than the
  GridSamples' neighbours should. Query-last, the perception graph ran 1.085x as fast, and
  1.13x with the SkipLayerNorm setting above; the whole chain 1.08x [1.05-1.10] (deris-b-grefcoco
  at 384, 2 threads, interleaved rounds, 2026-12-01).
* The cognition graph is GEMM-bound (MatMul is 85 % of its time in ORT): fusions gain it ~1 %.
* The optimizer's constant-folding pass (ORT 1.32, ``FusionConstantFold.fuse_2``) merges a
  Transpose pair by deleting the first Transpose even when other nodes read it, which breaks
  the Swin attention-mask subgraph (slice_scatter lowered through Transposes); it is skipped.
  ORT's own online transpose optimiser does that rewrite correctly at session creation.

The rewritten graphs hold only standard ONNX and ``com.microsoft`` contrib ops that both the CPU
and the CUDA execution providers run, so they are execution-provider neutral; the hardware-
specific rewrites (NCHWc layouts, ...) still happen online, at session creation.

:func:`optimize_export` writes ``<graph>.opt.onnx`` beside each graph and records it in the
manifest under the graph's ``"optimized"`` key (file, sha256s, what was fused); consumers that
know the key (:func:`optimized_session`) use it, others keep reading ``"file"``.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from deris.atomic import atomic_write
from deris.export.manifest import MANIFEST_NAME, read_manifest, sha256_file

OPTIMIZED_SUFFIX = ".opt.onnx"
# ORT's online optimisers that make these graphs slower on the CPU (module docstring), as the
# session config entry "optimization.disable_specified_optimizers" takes them (';'-separated).
CPU_DISABLED_OPTIMIZERS = "SkipLayerNormFusion"
# The same limit as the export: protobuf cannot serialise 2 GiB.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
# Contrib ops the fusions may produce; counted into the manifest.
FUSED_OPS = ("BiasGelu", "Gelu", "FastGelu", "SkipLayerNormalization", "LayerNormalization", "Attention", "MultiHeadAttention")


@contextlib.contextmanager
def _quiet_optimizer() -> Iterator[None]:
    """The optimizer logs each pattern it fails to match (at WARNING, on loggers named after its
    modules, which it imports both as top-level modules and under ``onnxruntime.transformers``)
    and prints its shape-inference failures; on these graphs both are expected, so only errors
    are let through."""
    import onnxruntime.transformers

    modules = [path.stem for path in Path(onnxruntime.transformers.__file__).parent.glob("*.py")]
    names = [*modules, *(f"onnxruntime.transformers.{m}" for m in modules)]
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _fuse(model: onnx.ModelProto, kind: str) -> onnx.ModelProto:
    """The transformer optimizer's fusions for one graph (no ORT session: provider neutral)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.onnx_model_bert import BertOnnxModel

    # num_heads/hidden_size 0: read from the graph where a fusion needs them.
    optimizer = BertOnnxModel(model, num_heads=0, hidden_size=0)
    # The pass that breaks the Swin mask subgraph (module docstring); ORT does it right online.
    optimizer.fuse_constant_fold = lambda: None
    options = FusionOptions("swin" if kind == "perception" else "bert")
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = False  # slower (module docstring)
    with _quiet_optimizer():
        optimizer.optimize(options)
    optimizer.topological_sort()
    fused: onnx.ModelProto = optimizer.model
    if not any(opset.domain == "com.microsoft" for opset in fused.opset_import):
        fused.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return fused


def optimize_graph(source: Path, target: Path, kind: str) -> dict[str, Any]:
    """Rewrite one graph (see the module docstring) into ``target``; return what changed."""
    model = onnx.load(str(source))
    before = collections.Counter(node.op_type for node in model.graph.node)
    model = _fuse(model, kind)
    after = collections.Counter(node.op_type for node in model.graph.node)
    # Weights stay beside the graph where the export put them there (or where protobuf needs it).
    external = source.with_name(source.name + ".data").exists() or \
        sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    for stale in (target, target.with_name(target.name + ".data")):
        stale.unlink(missing_ok=True)
    onnx.save(model, str(target), save_as_external_data=external, location=target.name + ".data" if external else None)
    onnx.checker.check_model(str(target))
    return {
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "fused": {op: after[op] - before.get(op, 0) for op in FUSED_OPS if after[op] - before.get(op, 0) > 0},
    }


def optimize_export(
    directory: str | os.PathLike[str], graphs: Sequence[str] | None = None, *, progress: bool = False
) -> dict[str, Any]:
    """Write ``<graph>.opt.onnx`` beside every graph of the export (or ``graphs``) and record each
    under ``manifest["graphs"][graph]["optimized"]``; return the updated manifest. Graphs with
    custom (TensorRT plugin) nodes are left alone: only TensorRT runs those. The manifest is
    rewritten atomically, after every optimised graph is complete. ``progress``: a bar per graph."""
    import onnxruntime
    from tqdm import tqdm

    directory = Path(directory)
    manifest = read_manifest(directory)
    names = [n for n in (graphs if graphs is not None else manifest["graphs"]) if not manifest["graphs"][n]["custom_ops"]]
    bar = tqdm(names, desc="ort-optimize", unit="graph", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        entry = manifest["graphs"][name]
        kind = manifest["topology"]["graphs"][name]["kind"]
        target = directory / (Path(entry["file"]).stem + OPTIMIZED_SUFFIX)
        changes = optimize_graph(directory / entry["file"], target, kind)
        files = [target, *sorted(directory.glob(target.name + ".data"))]
        entry["optimized"] = {
            "file": target.name,
            "files": [{"name": f.name, "sha256": sha256_file(f), "bytes": f.stat().st_size} for f in files],
            "onnxruntime": onnxruntime.__version__,
            **changes,
        }
    atomic_write(directory / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


# The intra-op size of this process's shared pool once share_thread_pool() made it, else None.
_shared_pool_threads: int | None = None


def share_thread_pool(threads: int) -> None:
    """Run every ONNX Runtime session this process opens from now on on one shared pool of
    ``threads`` intra-op threads (ONNX Runtime's global thread pools), whose idle threads spin.

    For programs that run the graphs of a chain in one process. With a pool per session, the pool of
    the graph that just finished would spin on the cores the next graph needs, so per-session pools
    do not spin (:func:`session_options`), and each graph then pays for waking its threads. One pool
    has neither cost. Measured on deris-b-grefcoco at 384, 2 threads on 2 cores, 2026-12-02 (a noisy
    machine): the chain of three graphs, in blocks of 8 chains from alternating processes, was faster
    with the shared pool in each of 6 block pairs (median chain 1.03-1.52x as fast); in
    benchmarks/latency.py's runs against PyTorch the end-to-end p50 was 1227 against 1253 ms and the
    ratio to PyTorch 1.38x either way (benchmarks/results/cpu_deris-b-grefcoco_384_ort_pool/).

    Call it before the process opens its first session: ONNX Runtime refuses sessions with a pool
    of their own once the shared one exists, so it is the program's choice, not a library default.
    Calling it again with the same size does nothing.
    """
    global _shared_pool_threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if _shared_pool_threads is not None:
        if _shared_pool_threads != threads:
            raise RuntimeError(f"this process already shares an ONNX Runtime pool of {_shared_pool_threads} threads; "
                               f"it cannot be resized to {threads}")
        return
    # The Python binding of the C API's CreateEnvWithGlobalThreadPools; inter-op 1, as below.
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(threads, 1)
    _shared_pool_threads = threads


def shared_pool_threads() -> int | None:
    """The size of the pool :func:`share_thread_pool` made in this process, or None."""
    return _shared_pool_threads


def session_options(threads: int | None = None, *, spinning: bool = False, cpu: bool = True) -> Any:
    """The ``SessionOptions`` these graphs want on the CPU.

    * every graph optimisation online (the hardware-specific ones the offline graph leaves out),
      except, with ``cpu``, :data:`CPU_DISABLED_OPTIMIZERS`: with them the pixel decoder ran 4 % and
      the decoder graph 3 % slower (the CUDA provider's fused kernels are another matter);
    * ``threads`` intra-op threads and one inter-op thread: the graphs are chains, and the
      encoders' parallelism is inside the GEMMs;
    * ``spinning=False``: idle intra-op threads sleep instead of spinning. Every graph has its own
      session and pool, so in a chain (cognition, perception, decoder) the pool of the graph
      that just finished spins on the cores the next one needs; so do the pools of a Triton
      server's models and any other process on the machine. Measured on deris-b-grefcoco at 384,
      2 threads, 2 cores: a graph alone loses 3-14 % (cognition 113 -> 117 ms, decoder 18.5 ->
      21 ms), the chain gains (the end-to-end penalty over the graphs' sum fell from ~80 to
      ~25 ms), and on a contended machine every graph gains 1.4-2.5x.

    After :func:`share_thread_pool` the sessions run on the process's shared pool instead, and
    ``threads`` and ``spinning`` have no say (the pool has its size and spins).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if _shared_pool_threads is not None:
        options.use_per_session_threads = False
    else:
        if threads is not None:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if cpu:
        options.add_session_config_entry("optimization.disable_specified_optimizers", CPU_DISABLED_OPTIMIZERS)
    return options


def optimized_session(directory: str | os.PathLike[str], graph: str, threads: int | None = None, *,
                      providers: Sequence[str] = ("CPUExecutionProvider",), spinning: bool = False) -> Any:
    """A session on the optimised graph (the plain one where :func:`optimize_export` left none)."""
    import onnxruntime

    directory = Path(directory)
    entry = read_manifest(directory)["graphs"][graph]
    file = entry.get("optimized", entry)["file"]
    options = session_options(threads, spinning=spinning, cpu=providers[0] == "CPUExecutionProvider")
    return onnxruntime.InferenceSession(str(directory / file), options, providers=list(providers))
