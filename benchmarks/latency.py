"""Latency and throughput of DeRIS against input resolution and batch size, for every backend.

For a deployment engineer choosing a resolution, a batch size and a backend: how latency grows
with the resolution (the perception branch grows with the pixel count, the cognition branch
always sees 224x224), where each backend wins, and what serving adds.

What is timed, at every (resolution, batch) point of the sweep:

  cognition     the cognition graph (BEiT-3 on the 224x224 copy and the expression)
  perception    the perception graph (Swin + MSDA pixel decoder at the resolution)
  decoder       the fused decoder graph (every loopback round and the existence head)
  end_to_end    encoded JPEG bytes and expressions in, masks at the original size out: decoding,
                resizing and normalising, tokenising, the three graphs, post-processing

Backends (``--backends``, the first one is the baseline every ratio is taken against):

  torch                PyTorch eager float32 with the plain-PyTorch MSDA: the official-equivalent
                       baseline (on the GPU with --device cuda)
  torch-fp16/-bf16     PyTorch eager in half precision with this project's Triton kernels (GPU)
  onnxruntime          the exported graphs after export/ort_optimize.py (transformer-optimizer
                       fusions) with its session options; the CUDA execution
                       provider with --device cuda where onnxruntime-gpu provides it, else the CPU
  onnxruntime-default  the exported graphs as they are, in the sessions of export/runtime.py (CPU):
                       the "before" of onnxruntime, timed in the same interleaved rounds
  tensorrt             engines built from the export with deris-export trt's builder (needs
                       TensorRT and a GPU)
  triton               a Triton Inference Server (the repository generator's python-backend
                       repository, fused decoder) end to end over gRPC: one call of batch B is B
                       single-image requests sent at once, grouped by the dynamic batcher. After
                       each resolution, a closed loop of --concurrency clients gives requests/s.

Method (benchmarks/harness.py): backends compared on one point are timed interleaved, in rounds
whose order flips every round; each ratio is the median of the per-round ratios with their
interquartile range, so a shared machine drifting during the run cannot fake a speed-up.
Latency percentiles are over --runs timed calls after --warmup untimed ones; GPU calls are timed
with CUDA events between synchronisations. Peak memory is PyTorch's allocator peak on the GPU and
the process's peak resident set on the CPU (every loaded model included). The share of the
perception time spent in multi-scale deformable attention comes from the profiler (PyTorch's,
or ONNX Runtime's per-node profile) at the first batch of each resolution. The latency exponent
is the least-squares slope of log end-to-end latency against log pixel count over 384..1024
(all measured resolutions when fewer than two fall there), at the smallest batch.

Weights are seeded random unless --checkpoint is given (or the preset is deris-demo, whose shipped
weights and tokenizer are the default): the work is the same, the masks are meaningless, and the
report says which. The expressions are tokenised with a small timing sentencepiece model unless
--tokenizer names beit3.spm.

CPU memory: like every deris command, the script keeps freed memory in the process for reuse
(--malloc keep, deris.cpu_memory); with glibc's defaults (--malloc default) PyTorch faults its
activations in again on every call, which costs it most at high resolutions and large batches.
ONNX Runtime keeps its own arena either way. The setting is stamped on every output.

Outputs with --out DIR (each file written atomically): latency.md (the tables), summary.csv (one
row per backend, stage and point), samples.csv (every timed call), latency_vs_resolution.png
(log-log, with a pixels-proportional reference line) and throughput_vs_batch.png, all stamped
with device, CPU/GPU model, driver, library versions, date and git commit.

examples:
  python benchmarks/latency.py --preset deris-tiny --backends torch,onnxruntime --resolutions 128,256 --batch 1,2 --runs 3
  python benchmarks/latency.py --preset deris-b-grefcoco --backends torch,onnxruntime-default,onnxruntime \\
      --resolutions 384 --batch 1 --stages cognition,perception,end_to_end --runs 20 --out benchmarks/results/cpu-384
  python benchmarks/latency.py --device cuda --backends torch,torch-fp16,torch-bf16,onnxruntime --out $OUT/latency
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness  # the sibling module: the script's folder is first on sys.path
import numpy as np
from harness import Call, Ratio, Run, Stamp

BACKENDS = ("torch", "torch-fp16", "torch-bf16", "onnxruntime", "onnxruntime-default", "tensorrt", "triton")
GPU_ONLY = ("torch-fp16", "torch-bf16", "tensorrt")
STAGES = ("cognition", "perception", "decoder", "end_to_end")
ORT_POOLS = ("shared", "per-session")  # --ort-pool
GRAPHS = ("cognition", "perception", "decoder")
DEFAULT_RESOLUTIONS = (320, 384, 448, 512, 640, 768, 1024)
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32)
EXPONENT_RANGE = (384, 1024)
MAX_BATCH = 64  # the exports' batch limit (deris.topology.MAX_BATCH, not imported: --help stays torch-free)
MSDA_RANGE = "deris::msda"
PERCEPTION_RANGE = "deris::perception"
MSDA_MODULE = "deris.modeling.pixel_decoder.DeformableSelfAttention"


# --- the command line -----------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return tuple(sorted(set(values)))


def _resolutions(text: str) -> tuple[int, ...]:
    values = _int_list(text)
    bad = [v for v in values if v % 32]
    if bad:
        raise argparse.ArgumentTypeError(f"resolutions must be multiples of 32 (the Swin and pyramid strides), got {bad}")
    return values


def _choices(accepted: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
        unknown = [v for v in values if v not in accepted]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown or text!r}; accepted: {', '.join(accepted)}")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    from deris.cli_support import preset_name
    from deris.config import PRESETS

    parser = argparse.ArgumentParser(
        prog="benchmarks/latency.py", description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=preset_name, default="deris-b-grefcoco", metavar="NAME",
                        help=f"model preset: {', '.join(PRESETS)}; official names such as DERIS-B-grefcoco work too "
                             "(default deris-b-grefcoco)")
    parser.add_argument("--checkpoint", type=Path, help="weights to load (default: the shipped weights for deris-demo, "
                        "else seeded random weights, stated in the output)")
    parser.add_argument("--tokenizer", type=Path, help="beit3.spm (default: the demo model's own for deris-demo, else a "
                        "small timing sentencepiece model)")
    parser.add_argument("--backends", type=_choices(BACKENDS, "backend"), default=("torch", "onnxruntime"), metavar="LIST",
                        help=f"comma-separated, from {', '.join(BACKENDS)}; the first is the baseline of every "
                             "ratio (default torch,onnxruntime)")
    parser.add_argument("--resolutions", type=_resolutions, default=DEFAULT_RESOLUTIONS, metavar="LIST",
                        help="square perception input sizes, multiples of 32 (default "
                             f"{','.join(map(str, DEFAULT_RESOLUTIONS))}); the cognition branch stays at 224")
    parser.add_argument("--batch", type=_int_list, default=DEFAULT_BATCHES, metavar="LIST",
                        help=f"batch sizes (default {','.join(map(str, DEFAULT_BATCHES))}); at most 64, the exports' limit")
    parser.add_argument("--stages", type=_choices(STAGES, "stage"), default=STAGES, metavar="LIST",
                        help=f"what to time, from {', '.join(STAGES)} (default all)")
    parser.add_argument("--runs", type=int, default=10, help="timed calls per backend, stage and point (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before them (default 2)")
    parser.add_argument("--settle-ms", type=float, default=50.0,
                        help="untimed pause before every timed call, so the previous call's spinning thread pools "
                             "are idle (default 50)")
    parser.add_argument("--threads", type=int, default=harness.cores(),
                        help="CPU threads for PyTorch and ONNX Runtime (default: the cores this process may use)")
    parser.add_argument("--ort-pool", choices=ORT_POOLS, default="shared",
                        help="ONNX Runtime's intra-op threads: shared = one pool for every session of the process, "
                             "spinning between calls (export/ort_optimize.share_thread_pool); per-session = a pool per "
                             "graph that sleeps after each call, as export/runtime.py's sessions (default shared)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where torch, onnxruntime and tensorrt run (default auto: cuda if available)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="clients of the triton backend's closed-loop throughput run (default 8)")
    parser.add_argument("--work", type=Path,
                        help="where exports, engines and repositories are kept and reused across runs (default: a "
                             "temporary folder, removed at the end; deris-b exports are about 1.2 GB per resolution)")
    parser.add_argument("--out", type=Path, help="write latency.md, summary.csv, samples.csv and the plots here "
                                                 "(default: print the tables only)")
    harness.add_malloc_option(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.threads < 1 or args.concurrency < 1 or args.settle_ms < 0:
        parser.error("--runs, --threads and --concurrency must be at least 1, --warmup and --settle-ms at least 0")
    if max(args.batch) > MAX_BATCH:
        parser.error(f"--batch: the exports accept at most {MAX_BATCH} per call")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu_only = [b for b in args.backends if b in GPU_ONLY]
    if gpu_only and args.device != "cuda":
        parser.error(f"backend(s) {', '.join(gpu_only)} need a CUDA device (--device cuda)")
    return args


# --- what the backends share ----------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """The end-to-end input of one call: B encoded images and B expressions."""

    images: tuple[bytes, ...]
    texts: tuple[str, ...]

    @classmethod
    def of(cls, batch: int, image: bytes) -> Request:
        return cls((image,) * batch, tuple(harness.TEXTS[i % len(harness.TEXTS)] for i in range(batch)))


@dataclass
class Context:
    args: argparse.Namespace
    model: Any  # the float32 CPU DeRIS every export and CPU backend uses
    work: Path
    tokenizer: Path
    text_encoder: Any
    image: bytes

    @property
    def weights(self) -> str:
        return "random" if self.args.checkpoint is None else self.args.checkpoint.name

    def onnx(self, resolution: int) -> Path:
        """The export at ``resolution`` (cognition, perception, fused decoder; each graph as exported
        and its ``<graph>.opt.onnx`` rewrite), made once and kept in --work."""
        from deris.export.onnx_export import ExportOptions, export_onnx

        directory = self.work / f"onnx-{self.model.cfg.name}-{self.weights}-{resolution}"
        if not directory.is_dir():
            export_onnx(self.model, directory, ExportOptions(resolution, graphs=GRAPHS, weights=self.weights), progress=False)
        return directory


class Backend:
    """One way of running the model. ``cuda``: its calls are timed with CUDA events."""

    name = ""
    cuda = False

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def describe(self) -> str:
        return self.name

    def load(self, resolution: int) -> None:
        self.resolution = resolution

    def stages(self, batch: int, request: Request) -> dict[str, Call]:
        raise NotImplementedError

    def peak_memory(self, call: Call) -> float | None:
        return harness.peak_memory_mib(call, self.cuda)

    def msda_share(self) -> float | None:
        """Share of the last prepared perception call spent in MSDA; None where not measurable."""
        return None

    def unload(self) -> None:
        """Release what load() made."""


class InProcess(Backend):
    """A backend that runs the three graphs in this process: the stages are its graphs, and end to
    end is the project's pre-processing, the chain of graphs and post-processing."""

    def load(self, resolution: int) -> None:
        from deris.topology import pipeline_topology

        super().load(resolution)
        self.topology = pipeline_topology(self.ctx.model.cfg, resolution)
        self.chain = self.topology.layout("fused")
        self.feeds: dict[str, dict[str, Any]] = {}

    def native(self, name: str, array: np.ndarray) -> Any:
        """A pipeline input as this backend's graphs take it."""
        return array

    def run_graph(self, spec: Any, feeds: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def as_torch(self, value: Any) -> Any:
        import torch

        return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))

    def inputs(self, request: Request) -> tuple[dict[str, Any], list[tuple[int, int]]]:
        from deris.preprocess import preprocess_image

        cfg = self.ctx.model.cfg
        prepared = [preprocess_image(image, self.resolution, cfg.mini_image_size) for image in request.images]
        token_ids, pad_mask = self.ctx.text_encoder.encode_batch(list(request.texts))
        arrays = {"img": np.stack([p.img for p in prepared]), "img_mini": np.stack([p.img_mini for p in prepared]),
                  "token_ids": token_ids, "text_pad_mask": pad_mask}
        return {k: self.native(k, v) for k, v in arrays.items()}, [p.original_size for p in prepared]

    def end_to_end(self, request: Request) -> list[Any]:
        from deris.postprocess import postprocess
        from deris.topology import run_chain

        inputs, sizes = self.inputs(request)
        values = run_chain(self.chain, self.run_graph, inputs)
        final = {name: self.as_torch(values[value]).float() for name, value in self.topology.final_values().items()}
        cfg = self.ctx.model.cfg
        return postprocess(final["mask_logits"], final["refer_logits"], final["existence"], sizes,
                           cfg.score_threshold, cfg.mask_threshold)

    def stages(self, batch: int, request: Request) -> dict[str, Call]:
        from deris.topology import run_chain

        inputs, _ = self.inputs(request)
        values = run_chain(self.chain, self.run_graph, inputs)  # also the first, untimed call
        calls: dict[str, Call] = {}
        for spec in self.chain:
            feeds = {t.name: values[t.value] for t in spec.inputs}
            self.feeds[spec.name] = feeds
            calls[spec.name] = functools.partial(self.run_graph, spec, feeds)
        calls["end_to_end"] = lambda: self.end_to_end(request)
        return calls


class TorchBackend(InProcess):
    """PyTorch eager: ``torch`` (float32, plain-PyTorch kernels) or half precision with the Triton kernels."""

    DTYPES = {"torch": "float32", "torch-fp16": "float16", "torch-bf16": "bfloat16"}

    def __init__(self, ctx: Context, name: str) -> None:
        import copy

        import torch

        super().__init__(ctx)
        self.name = name
        self.device = torch.device(ctx.args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = getattr(torch, self.DTYPES[name])
        self.kernels = "torch" if name == "torch" else "triton"
        on_cpu_as_is = not self.cuda and self.dtype == torch.float32
        self.model = ctx.model if on_cpu_as_is else copy.deepcopy(ctx.model).to(self.device, self.dtype)

    def describe(self) -> str:
        return f"{self.name}: PyTorch eager {self.DTYPES[self.name]} on {self.device}, {self.kernels} kernels"

    def load(self, resolution: int) -> None:
        from deris.export.graphs import build_graph

        super().load(resolution)
        self.modules = {spec.name: build_graph(spec, self.model) for spec in self.chain}

    def native(self, name: str, array: np.ndarray) -> Any:
        import torch

        tensor = torch.from_numpy(array).to(self.device)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def run_graph(self, spec: Any, feeds: dict[str, Any]) -> dict[str, Any]:
        import torch

        import deris.kernels as kernels

        with kernels.backend(self.kernels), torch.inference_mode():
            outputs = self.modules[spec.name](*feeds.values())
        return dict(zip((t.name for t in spec.outputs), outputs))

    def msda_share(self) -> float | None:
        import torch
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile, record_function

        import deris.kernels as kernels
        from deris.modeling.pixel_decoder import msda_function

        spec = self.topology.graphs["perception"]
        feeds = self.feeds.get("perception")
        if feeds is None:  # its perception call failed at this resolution
            return None

        def recorded(*args: Any) -> Any:
            with record_function(MSDA_RANGE):
                return kernels.ms_deform_attn_fused(*args)

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with msda_function(recorded), profile(activities=activities) as prof:
            with record_function(PERCEPTION_RANGE):
                self.run_graph(spec, feeds)
            if self.cuda:
                torch.cuda.synchronize()

        def spent(name: str) -> float:
            events = [e for e in prof.events() if e.name == name and e.device_type == DeviceType.CPU]
            return float(sum(e.device_time_total if self.cuda else e.cpu_time_total for e in events))

        whole = spent(PERCEPTION_RANGE)
        return spent(MSDA_RANGE) / whole if whole > 0 else None


class OrtBackend(InProcess):
    """ONNX Runtime on the export: ``onnxruntime`` (optimised graphs, recommended options, CUDA
    where available) or ``onnxruntime-default`` (the graphs and sessions of export/runtime.py)."""

    def __init__(self, ctx: Context, name: str) -> None:
        import onnxruntime

        super().__init__(ctx)
        self.name = name
        self.optimized = name == "onnxruntime"
        cuda = ctx.args.device == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda and self.optimized else ["CPUExecutionProvider"]

    def describe(self) -> str:
        graphs = "optimised graphs (export/ort_optimize.py) and its session options" if self.optimized else \
            "graphs as exported, export/runtime.py sessions"
        pool = "in one pool its sessions share" if self.ctx.args.ort_pool == "shared" else "per session"
        return f"{self.name}: ONNX Runtime {self.providers[0]}, {graphs}, {self.ctx.args.threads} intra-op threads {pool}"

    def load(self, resolution: int) -> None:
        from deris.export.manifest import read_manifest
        from deris.export.ort_optimize import optimized_session
        from deris.export.runtime import ort_session

        super().load(resolution)
        self.directory = self.ctx.onnx(resolution)
        entries = read_manifest(self.directory)["graphs"]
        threads = self.ctx.args.threads
        if self.optimized:
            self.sessions = {g: optimized_session(self.directory, g, threads, providers=self.providers) for g in GRAPHS}
        else:
            self.sessions = {g: ort_session(self.directory / entries[g]["file"], entries[g]["custom_ops"], threads) for g in GRAPHS}
        self.output_names = {g: [o.name for o in s.get_outputs()] for g, s in self.sessions.items()}

    def run_graph(self, spec: Any, feeds: dict[str, Any]) -> dict[str, Any]:
        return dict(zip(self.output_names[spec.name], self.sessions[spec.name].run(None, feeds)))

    def msda_share(self) -> float | None:
        """From ONNX Runtime's per-node profile of one perception run: the nodes the exporter
        recorded as computed by a DeformableSelfAttention module itself (its projections are
        child modules), over the whole run."""
        import onnx
        import onnxruntime

        from deris.export.manifest import read_manifest
        from deris.export.ort_optimize import session_options, shared_pool_threads

        feeds = self.feeds.get("perception")
        if feeds is None:  # its perception call failed at this resolution
            return None
        entry = read_manifest(self.directory)["graphs"]["perception"]
        path = self.directory / (entry.get("optimized", entry)["file"] if self.optimized else entry["file"])
        msda_nodes = set()
        for node in onnx.load(str(path), load_external_data=False).graph.node:
            hierarchy = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.class_hierarchy")
            if hierarchy is not None and json.loads(hierarchy.replace("'", '"'))[-2:-1] == [MSDA_MODULE]:
                msda_nodes.add(node.name)
        with tempfile.TemporaryDirectory(prefix="deris-ort-profile-") as scratch:
            options = session_options(self.ctx.args.threads) if self.optimized else onnxruntime.SessionOptions()
            if shared_pool_threads() is None:
                options.intra_op_num_threads = self.ctx.args.threads
            else:  # ONNX Runtime opens no session with a pool of its own once the shared one exists
                options.use_per_session_threads = False
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(scratch) / "perception")
            session = onnxruntime.InferenceSession(str(path), options, providers=self.providers)
            for _ in range(2):  # the first run allocates
                session.run(None, feeds)
            events = json.loads(Path(session.end_profiling()).read_text())
        last = [e for e in events if e.get("name") == "model_run"][-1]
        window = (last["ts"], last["ts"] + last["dur"])
        msda = sum(e["dur"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                   and window[0] <= e["ts"] <= window[1] and e["name"].removesuffix("_kernel_time") in msda_nodes)
        return msda / last["dur"] if last["dur"] > 0 else None


class TensorRTBackend(InProcess):
    """TensorRT engines (deris-export trt's builder: FP16 with normalisation and softmax in FP32)
    of the export, run on PyTorch CUDA tensors."""

    name = "tensorrt"
    cuda = True

    def describe(self) -> str:
        return "tensorrt: engines of export/tensorrt_build.py (FP16 flag, norms and softmax FP32), on cuda"

    def load(self, resolution: int) -> None:
        from deris.export.tensorrt_build import build_engines, import_tensorrt

        super().load(resolution)
        trt = import_tensorrt()
        engines = self.ctx.work / f"trt-{self.ctx.model.cfg.name}-{self.ctx.weights}-{resolution}"
        if not engines.is_dir():
            build_engines(self.ctx.onnx(resolution), engines, opt_batch=1, max_batch=max(self.ctx.args.batch), progress=False)
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        runtime = trt.Runtime(logger)
        self.trt = trt
        self.engines = {g: runtime.deserialize_cuda_engine((engines / f"{g}.plan").read_bytes()) for g in GRAPHS}
        self.contexts = {g: engine.create_execution_context() for g, engine in self.engines.items()}

    def native(self, name: str, array: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(array).cuda()

    def torch_dtype(self, graph: str, tensor: str) -> Any:
        """The engine's dtype of one of its tensors, as a torch dtype (the builder may have turned
        int64 token ids into int32, and kept or halved the float ones)."""
        import torch

        trt_dtype = self.engines[graph].get_tensor_dtype(tensor)
        return {self.trt.DataType.FLOAT: torch.float32, self.trt.DataType.HALF: torch.float16,
                self.trt.DataType.INT32: torch.int32, self.trt.DataType.INT64: torch.int64,
                self.trt.DataType.BOOL: torch.bool}[trt_dtype]

    def run_graph(self, spec: Any, feeds: dict[str, Any]) -> dict[str, Any]:
        import torch

        context = self.contexts[spec.name]
        kept = []  # converted inputs stay referenced until the engine is enqueued (freed memory is reused in stream order)
        for name, tensor in feeds.items():
            tensor = tensor.to(self.torch_dtype(spec.name, name)).contiguous()
            kept.append(tensor)
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for tensor in spec.outputs:
            shape = tuple(context.get_tensor_shape(tensor.name))
            outputs[tensor.name] = torch.empty(shape, dtype=self.torch_dtype(spec.name, tensor.name), device="cuda")
            context.set_tensor_address(tensor.name, outputs[tensor.name].data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the {spec.name} engine")
        return outputs

    def unload(self) -> None:
        self.contexts.clear()
        self.engines.clear()


class TritonBackend(Backend):
    """The served ensemble over gRPC, from encoded image bytes to the mask."""

    name = "triton"

    def describe(self) -> str:
        return (f"triton: tritonserver with the python-backend repository (fused decoder, ONNX Runtime "
                f"{self.ctx.args.threads} threads per model, plain graphs), gRPC, one request per image")

    def load(self, resolution: int) -> None:
        from deris.triton_repo.client import DerisClient

        super().load(resolution)
        args = self.ctx.args
        self.pool = max(max(args.batch), args.concurrency)
        self.stack = contextlib.ExitStack()
        work = self.ctx.work / f"triton-{resolution}"
        work.mkdir(parents=True, exist_ok=True)
        self.server = self.stack.enter_context(harness.triton_server(
            self.ctx.onnx(resolution), work, self.ctx.tokenizer, decoder="fused", max_batch_size=min(self.pool, MAX_BATCH),
            threads=args.threads))
        self.clients = [DerisClient(self.server.grpc_url, "grpc") for _ in range(self.pool)]
        for client in self.clients:
            self.stack.callback(client.close)
        self.executor = self.stack.enter_context(concurrent.futures.ThreadPoolExecutor(self.pool))

    def stages(self, batch: int, request: Request) -> dict[str, Call]:
        def send(i: int) -> Any:
            return self.clients[i].predict(request.images[i], request.texts[i])

        def call() -> list[Any]:
            return list(self.executor.map(send, range(batch)))

        call()
        return {"end_to_end": call}

    def peak_memory(self, call: Call) -> float | None:
        return None  # the work happens in the server's processes

    def serving(self) -> Run:
        args = self.ctx.args
        request = Request.of(args.concurrency, self.ctx.image)

        def sender(worker: int) -> Callable[[int], object]:
            client = self.clients[worker]
            return lambda i: client.predict(request.images[worker], request.texts[(i + worker) % len(request.texts)])

        return harness.closed_loop(f"triton gRPC, R={self.resolution}", sender, args.runs * args.concurrency,
                                   args.concurrency, args.warmup)

    def unload(self) -> None:
        self.stack.close()


def make_backend(ctx: Context, name: str) -> Backend:
    if name.startswith("torch"):
        return TorchBackend(ctx, name)
    if name.startswith("onnxruntime"):
        return OrtBackend(ctx, name)
    return TensorRTBackend(ctx) if name == "tensorrt" else TritonBackend(ctx)


# --- the sweep -------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One backend's timings of one stage at one point (or why there are none)."""

    backend: str
    stage: str
    resolution: int
    batch: int
    times: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    speedup: Ratio | None = None  # over the baseline backend, same rounds
    error: str | None = None

    def p(self) -> list[float]:
        return harness.percentiles(self.times)

    @property
    def throughput(self) -> float:
        """Images per second at the median latency."""
        return self.batch * 1e3 / self.p()[0]


@dataclass
class Results:
    measurements: list[Measurement] = field(default_factory=list)
    msda: list[tuple[str, int, int, float]] = field(default_factory=list)  # backend, resolution, batch, share
    serving: list[Run] = field(default_factory=list)
    interrupted: bool = False  # stopped early (Ctrl-C, or SIGTERM from a time limit): what was measured is kept

    def get(self, backend: str, stage: str, resolution: int, batch: int) -> Measurement | None:
        for m in self.measurements:
            if (m.backend, m.stage, m.resolution, m.batch) == (backend, stage, resolution, batch) and m.times:
                return m
        return None


def _failure(exc: BaseException) -> str:
    import torch

    return "OOM" if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) else f"{type(exc).__name__}: {exc}"


def measure_point(backends: Sequence[Backend], resolution: int, batch: int, ctx: Context, results: Results,
                  progress: Any) -> None:
    """Every stage of every backend at one point, interleaved per stage; the first backend that
    ran is the baseline of the ratios."""
    args = ctx.args
    request = Request.of(batch, ctx.image)
    prepared: dict[str, dict[str, Call]] = {}
    for backend in backends:
        try:
            prepared[backend.name] = backend.stages(batch, request)
        except Exception as exc:  # recorded in the report; the other backends go on
            reason = _failure(exc)
            if reason == "OOM" and backend.cuda:
                import torch

                torch.cuda.empty_cache()  # what the failed call cached would starve the others
            results.measurements += [Measurement(backend.name, s, resolution, batch, error=reason) for s in args.stages]
            progress.write(f"{backend.name} at R={resolution} batch {batch}: {reason}")
    for stage in args.stages:
        progress.set_postfix_str(f"R={resolution} batch={batch} {stage}")
        calls = {name: stages[stage] for name, stages in prepared.items() if stage in stages}
        if calls:
            cuda = any(b.cuda for b in backends if b.name in calls)
            times = harness.interleaved(calls, args.warmup, args.runs, cuda, args.settle_ms / 1e3)
            baseline = next(iter(times))
            for name, samples in times.items():
                speedup = harness.pair_ratio(times[baseline], samples) if name != baseline else None
                results.measurements.append(Measurement(name, stage, resolution, batch, samples, speedup=speedup))
            if stage == "end_to_end":
                for backend in backends:
                    if backend.name in calls:
                        measured = results.get(backend.name, stage, resolution, batch)
                        assert measured is not None
                        measured.peak_mib = backend.peak_memory(calls[backend.name])
        progress.update(1)


def sweep(backends: Sequence[Backend], ctx: Context, progress: Any) -> Results:
    results = Results()
    try:
        _sweep(backends, ctx, progress, results)
    except KeyboardInterrupt:
        results.interrupted = True
    return results


def _sweep(backends: Sequence[Backend], ctx: Context, progress: Any, results: Results) -> None:
    args = ctx.args
    for resolution in args.resolutions:
        progress.set_postfix_str(f"R={resolution}: preparing")
        loaded = []
        try:
            for backend in backends:
                backend.load(resolution)
                loaded.append(backend)
            for index, batch in enumerate(args.batch):
                measure_point(loaded, resolution, batch, ctx, results, progress)
                if index == 0 and "perception" in args.stages:
                    for backend in loaded:
                        share = backend.msda_share()
                        if share is not None:
                            results.msda.append((backend.name, resolution, batch, share))
            for backend in loaded:
                if isinstance(backend, TritonBackend):
                    results.serving.append(backend.serving())
        finally:
            for backend in loaded:
                backend.unload()


# --- the report ------------------------------------------------------------------------------------


def exponents(results: Results, backends: Sequence[str], batch: int) -> dict[str, tuple[float, tuple[int, ...]]]:
    """Per backend: the fitted exponent of end-to-end latency against pixels, and the resolutions used."""
    fitted = {}
    for backend in backends:
        points = {m.resolution: m.p()[0] for m in results.measurements
                  if m.backend == backend and m.stage == "end_to_end" and m.batch == batch and m.times}
        inside = sorted(r for r in points if EXPONENT_RANGE[0] <= r <= EXPONENT_RANGE[1])
        used = tuple(inside if len(inside) >= 2 else sorted(points))
        if len(used) >= 2:
            fitted[backend] = (harness.fit_exponent([r * r for r in used], [points[r] for r in used]), used)
    return fitted


SUMMARY_HEADER = ("stage", "resolution", "batch", "backend", "p50 ms", "p90 ms", "p99 ms", "images/s", "peak MiB", "speed-up")


def summary_rows(results: Results, stages: Sequence[str]) -> list[list[object]]:
    rows: list[list[object]] = []
    for m in sorted((m for m in results.measurements if m.stage in stages),
                    key=lambda m: (STAGES.index(m.stage), m.resolution, m.batch)):
        if m.error is not None:
            rows.append([m.stage, m.resolution, m.batch, m.backend, m.error, "", "", "", "", ""])
            continue
        p50, p90, p99 = m.p()
        rows.append([m.stage, m.resolution, m.batch, m.backend, harness.format_ms(p50), harness.format_ms(p90),
                     harness.format_ms(p99), f"{m.throughput:.2f}", harness.format_ms(m.peak_mib),
                     m.speedup.text() if m.speedup else "baseline"])
    return rows


def markdown(results: Results, backends: Sequence[Backend], ctx: Context, stamp: Stamp, command: str) -> str:
    args = ctx.args
    cfg = ctx.model.cfg
    right = [False, True, True, False, True, True, True, True, True, True]
    weights = "seeded random (timing only: the masks are meaningless)" if args.checkpoint is None else args.checkpoint.name
    lines = [
        f"# DeRIS latency: {cfg.name}",
        "",
        *(["**Interrupted: the sweep stopped early; these are the points measured until then.**", ""]
          if results.interrupted else []),
        *stamp.lines(),
        f"- model: {cfg.name}, weights {weights}; perception at the resolution, cognition at {cfg.mini_image_size}x"
        f"{cfg.mini_image_size}, L={cfg.max_text_len}, N={cfg.num_queries}",
        f"- {args.runs} timed calls per backend, stage and point after {args.warmup} warm-up calls; backends timed "
        "interleaved (rounds A B, B A, ...); speed-up = median over rounds of baseline / backend time, "
        f"[interquartile range]; baseline {backends[0].name}",
        "- end_to_end: JPEG bytes (640x480) and expressions in, masks at 640x480 out; images/s = batch / p50",
        "- peak MiB: GPU allocator peak of one call, or the process's peak resident set during one call on the CPU "
        "(every loaded model included)",
        "- backends:",
        *[f"  - {backend.describe()}" for backend in backends],
        "",
    ]
    smallest = args.batch[0]
    fitted = exponents(results, [b.name for b in backends], smallest)
    if fitted:
        lines += [f"## End-to-end latency exponent vs pixels (batch {smallest})", "",
                  "latency ~ pixels^k, least squares on log-log; k <= 1 means latency grows no faster than the pixel count.", "",
                  harness.markdown_table(("backend", "k", "resolutions"),
                                         [(b, f"{k:.2f}", ", ".join(map(str, used))) for b, (k, used) in fitted.items()],
                                         [False, True, False]), ""]
    if "end_to_end" in args.stages:
        lines += ["## End to end", "", harness.markdown_table(SUMMARY_HEADER, summary_rows(results, ("end_to_end",)), right), ""]
    graphs = [s for s in args.stages if s != "end_to_end"]
    if graphs:
        lines += ["## Per graph", "", harness.markdown_table(SUMMARY_HEADER, summary_rows(results, graphs), right), ""]
    if results.msda:
        lines += ["## Share of the perception graph spent in MSDA", "",
                  "From the profiler: PyTorch's (the kernel call) or ONNX Runtime's per-node profile (the nodes of the "
                  "deformable attention modules outside their projections).", "",
                  harness.markdown_table(("backend", "resolution", "batch", "MSDA share"),
                                         [(b, r, n, f"{100 * s:.1f}%") for b, r, n, s in results.msda],
                                         [False, True, True, True]), ""]
    if results.serving:
        lines += [f"## Triton serving: {args.concurrency} clients in a closed loop", "",
                  harness.markdown_table(harness.RUN_HEADER, [run.cells() for run in results.serving],
                                         [False, True, True, True, True, True, True]), ""]
    lines += [f"Command: `{command}`", ""]
    return "\n".join(lines)


def csv_rows(results: Results, ctx: Context, stamp: Stamp) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(summary rows, sample rows), each stamped."""
    common = {"preset": ctx.model.cfg.name, "weights": ctx.weights, "runs": ctx.args.runs, "warmup": ctx.args.warmup}
    summary, samples = [], []
    for m in results.measurements:
        key = {"backend": m.backend, "stage": m.stage, "resolution": m.resolution, "batch": m.batch}
        row: dict[str, Any] = {**common, **key, "concurrency": "", "error": m.error or ""}
        if m.times:
            p50, p90, p99 = m.p()
            row |= {"p50_ms": round(p50, 4), "p90_ms": round(p90, 4), "p99_ms": round(p99, 4),
                    "images_per_s": round(m.throughput, 4), "peak_mib": "" if m.peak_mib is None else round(m.peak_mib, 1)}
            if m.speedup:
                row |= {"speedup": round(m.speedup.median, 4), "speedup_p25": round(m.speedup.low, 4),
                        "speedup_p75": round(m.speedup.high, 4)}
        summary.append(row | stamp.columns())
        samples += [{**common, **key, "round": i, "ms": round(t, 4)} | stamp.columns() for i, t in enumerate(m.times)]
    for run in results.serving:
        p50, p90, p99 = harness.percentiles(run.latencies_ms)
        summary.append({**common, "backend": "triton", "stage": "serving", "resolution": run.name.rsplit("=", 1)[-1],
                        "batch": 1, "concurrency": run.concurrency, "error": "", "p50_ms": round(p50, 4),
                        "p90_ms": round(p90, 4), "p99_ms": round(p99, 4), "images_per_s": round(run.throughput, 4)}
                       | stamp.columns())
    return summary, samples


def _panels(count: int, max_columns: int, panel: tuple[float, float]) -> tuple[Any, list[Any]]:
    """A figure of ``count`` panels, at most ``max_columns`` per row (unused cells hidden): (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(max_columns, count)
    rows = -(-count // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(panel[0] * columns, panel[1] * rows + 0.6), squeeze=False)
    for ax in list(grid.flat)[count:]:
        ax.set_visible(False)
    return figure, list(grid.flat)[:count]


def _save(figure: Any, path: Path, stamp: Stamp, footer: float) -> None:
    """Lay out (``footer``: the share of the height kept for the stamp), stamp, write and close ``figure``."""
    import matplotlib.pyplot as plt

    figure.tight_layout(rect=(0, footer, 1, 1))
    harness.save_figure(figure, path, stamp)
    plt.close(figure)


def plot_latency(results: Results, backends: Sequence[str], stages: Sequence[str], batch: int, stamp: Stamp, path: Path) -> None:
    """p50 against pixels on log-log axes, one panel per stage, with a line proportional to the
    pixel count through the baseline's first point."""
    import matplotlib.ticker

    figure, axes = _panels(len(stages), 2, (6, 4.2))
    for ax, stage in zip(axes, stages):
        for backend in backends:
            points = sorted((m.resolution, m.p()[0]) for m in results.measurements
                            if m.backend == backend and m.stage == stage and m.batch == batch and m.times)
            if points:
                ax.plot([r * r for r, _ in points], [t for _, t in points], marker="o", label=backend)
        reference = sorted((m.resolution, m.p()[0]) for m in results.measurements
                           if m.stage == stage and m.batch == batch and m.times and m.backend == backends[0])
        if reference:
            r0, t0 = reference[0]
            pixels = np.array([r * r for r, _ in reference], dtype=np.float64)
            ax.plot(pixels, t0 * pixels / (r0 * r0), linestyle="--", color="gray", label="proportional to pixels")
        ax.set_xscale("log")
        ax.set_yscale("log")
        measured = sorted({m.resolution for m in results.measurements if m.stage == stage and m.times})
        ax.set_xticks([r * r for r in measured], [f"{r}²" for r in measured], minor=False)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title(f"{stage}, batch {batch}")
        ax.set_xlabel("input pixels (resolution squared)")
        ax.set_ylabel("p50 latency (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    _save(figure, path, stamp, 0.06)


def plot_throughput(results: Results, backends: Sequence[str], resolutions: Sequence[int], stamp: Stamp, path: Path) -> None:
    """End-to-end images/s against batch, one panel per resolution."""
    figure, axes = _panels(len(resolutions), 4, (4.2, 3.6))
    for ax, resolution in zip(axes, resolutions):
        for backend in backends:
            points = sorted((m.batch, m.throughput) for m in results.measurements
                            if m.backend == backend and m.stage == "end_to_end" and m.resolution == resolution and m.times)
            if points:
                ax.plot([b for b, _ in points], [t for _, t in points], marker="o", label=backend)
        ax.set_xscale("log", base=2)
        batches = sorted({m.batch for m in results.measurements if m.resolution == resolution and m.times})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_title(f"end to end at {resolution}x{resolution}")
        ax.set_xlabel("batch (triton: images sent at once)")
        ax.set_ylabel("images/s at p50")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    _save(figure, path, stamp, 0.08)


def write_outputs(out: Path, results: Results, backends: Sequence[Backend], ctx: Context, stamp: Stamp, report: str) -> list[Path]:
    args = ctx.args
    names = [b.name for b in backends]
    summary, samples = csv_rows(results, ctx, stamp)
    written = [harness.write_text(out / "latency.md", report), harness.write_csv(out / "summary.csv", summary)]
    if samples:
        written.append(harness.write_csv(out / "samples.csv", samples))
    plot_latency(results, names, args.stages, args.batch[0], stamp, out / "latency_vs_resolution.png")
    written.append(out / "latency_vs_resolution.png")
    if "end_to_end" in args.stages:
        plot_throughput(results, names, args.resolutions, stamp, out / "throughput_vs_batch.png")
        written.append(out / "throughput_vs_batch.png")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    from deris.cli_support import ToolError

    args = parse_args(argv)
    try:
        return run(args, argv)
    except (ValueError, FileNotFoundError, ToolError) as exc:  # the project's errors say what is wrong and what to do
        print(f"benchmarks/latency.py: error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    import torch
    from tqdm import tqdm

    from deris import demo
    from deris.export.onnx_export import load_model
    from deris.text import TextEncoder

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # a time limit's SIGTERM ends the sweep like Ctrl-C: the report is still written

    signal.signal(signal.SIGTERM, stop)
    malloc = harness.set_malloc(args.malloc)  # before the model's weights are allocated
    torch.set_num_threads(args.threads)
    if args.preset == demo.PRESET:  # the shipped, trained demo model, unless told otherwise
        args.checkpoint = args.checkpoint or demo.verify_asset(demo.DEMO_WEIGHTS)
        args.tokenizer = args.tokenizer or demo.verify_asset(demo.DEMO_TOKENIZER)
    model = load_model(args.preset, args.checkpoint)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deris-latency-")))
        work.mkdir(parents=True, exist_ok=True)
        tokenizer = args.tokenizer or harness.timing_tokenizer(work / "tokenizer")
        ctx = Context(args, model, work, tokenizer, TextEncoder.from_spm(tokenizer, model.cfg.max_text_len), harness.sample_jpeg())
        if args.ort_pool == "shared" and any(name.startswith("onnxruntime") for name in args.backends):
            from deris.export.ort_optimize import share_thread_pool

            share_thread_pool(args.threads)  # before the first session
        backends = [make_backend(ctx, name) for name in args.backends]
        stamp = harness.environment(args.device, args.threads, malloc)
        total = len(args.resolutions) * len(args.batch) * len(args.stages)
        with tqdm(total=total, desc="latency sweep", unit="point", disable=args.quiet) as progress:
            results = sweep(backends, ctx, progress)
    command = " ".join(["python benchmarks/latency.py", *(argv if argv is not None else sys.argv[1:])])
    report = markdown(results, backends, ctx, stamp, command)
    print(report)
    fitted = exponents(results, args.backends, args.batch[0])
    for backend, (k, used) in fitted.items():
        print(f"end-to-end latency exponent vs pixels, {backend}: {k:.2f} (resolutions {', '.join(map(str, used))})")
    if args.out is not None:
        for path in write_outputs(args.out, results, backends, ctx, stamp, report):
            print(f"wrote {path}")
    failed = [m for m in results.measurements if m.error not in (None, "OOM")]
    return 130 if results.interrupted else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
