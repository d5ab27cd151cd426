"""``deris-export triton-repo``: a Triton Inference Server model repository from an ONNX export.

The repository serves one ensemble, ``deris``: encoded image bytes + an expression in, the mask at
the original image size, per-query scores and the decision out::

    IMAGE, TEXT -> preprocess -> cognition, perception -> round_0 .. round_3 (or decoder) -> postprocess
                                                                -> MASK, SCORES, NO_TARGET, EXISTENCE_PROB

``preprocess`` and ``postprocess`` are python-backend models running the project's own code
(``deris.triton_repo``), so the server's python environment must have ``deris`` installed. The
graph models run as

* ``tensorrt``: ``platform: "tensorrt_plan"`` with the ``<graph>.plan`` engines of ``deris-export trt``
  (``--engines``), on the GPU;
* ``onnxruntime``: ``platform: "onnxruntime_onnx"`` with the ONNX graphs, on the CPU;
* ``python``: the ONNX graphs run by ONNX Runtime inside python-backend models on the CPU. This is
  the one that works with the tritonserver bundled in the ``nvidia-pytriton`` wheel (it ships
  only the python backend) and is what the tests serve.

Batching: the ensemble, ``preprocess`` and the graph models take ``max_batch_size`` items per
request, and the graph models batch concurrent requests dynamically. ``preprocess`` has no dynamic
batcher: it decodes and tokenizes item by item, so grouping requests into one call would only
queue them behind each other in one instance. ``postprocess`` has
``max_batch_size: 0``: masks come back at each image's own size, which cannot be stacked across
requests, so it takes each request whole (batch axis as an ordinary dimension) and refuses a
multi-item request whose images differ in size.

The repository is staged next to ``--out`` and renamed into place, so it is either complete or
absent.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tqdm import tqdm
from tritonclient.grpc import model_config_pb2 as pb

from deris.atomic import OutputError, check_output_dir, staged_directory
from deris.cli_support import EXIT_OK, add_command, add_force, add_onnx, add_quiet, resolve_tokenizer
from deris.config import get_config
from deris.export.manifest import MANIFEST_NAME, read_manifest
from deris.export.ort_optimize import CPU_DISABLED_OPTIMIZERS
from deris.prediction import check_threshold
from deris.topology import LAYOUTS, PIPELINE_INPUTS, Topology
from deris.triton_repo import model_source

BACKENDS = ("tensorrt", "onnxruntime", "python")
DECODERS = LAYOUTS
ENSEMBLE = "deris"
PREPROCESS = "preprocess"
POSTPROCESS = "postprocess"
TOKENIZER_FILE = "beit3.spm"
VERSION = "1"

# Triton data types of the numpy dtype names the ONNX manifest uses.
TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
}


class RepoError(OutputError):
    """The inputs of the generator are missing or inconsistent; the message says what and why."""


@dataclass(frozen=True)
class Tensor:
    """One model input or output as Triton sees it: ``dims`` without the batch axis."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class Graph:
    name: str
    # (path, sha256) of what the CPU backends serve: the graph first, then external data files.
    files: tuple[tuple[Path, str], ...]
    exported_sha256: str  # of the graph as exported, which TensorRT engines are built from
    custom_ops: tuple[str, ...]
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    def tensor(self, name: str) -> Tensor:
        for tensor in (*self.inputs, *self.outputs):
            if tensor.name == name:
                return tensor
        raise RepoError(f"graph {self.name} has no tensor {name!r}")


@dataclass(frozen=True)
class Export:
    """What the generator needs from an ONNX export directory's ``manifest.json``."""

    preset: str
    resolution: int
    max_text_len: int
    num_queries: int
    max_batch: int
    graphs: dict[str, Graph]
    topology: Topology


@dataclass(frozen=True)
class Step:
    """One ensemble step: the model and its tensor maps (model tensor name -> ensemble tensor name)."""

    model: str
    inputs: dict[str, str]
    outputs: dict[str, str]


def graph_names(export: Export, decoder: str) -> tuple[str, ...]:
    """The ONNX graphs a repository with this decoder layout serves, in pipeline order."""
    try:
        return tuple(g.name for g in export.topology.layout(decoder))
    except ValueError as exc:
        raise RepoError(str(exc)) from None


def _tensor(graph: str, entry: dict[str, Any]) -> Tensor:
    name, dtype, shape = entry["name"], str(entry["dtype"]), list(entry["shape"])
    if dtype not in TRITON_TYPES:
        raise RepoError(f"graph {graph}: tensor {name} has dtype {dtype}; supported: {', '.join(TRITON_TYPES)}")
    if not shape or isinstance(shape[0], int) or any(not isinstance(d, int) or d < 1 for d in shape[1:]):
        raise RepoError(
            f"graph {graph}: tensor {name} has shape {shape}; expected a symbolic batch axis followed by "
            "fixed sizes (export with a dynamic batch and a fixed resolution and text length)"
        )
    return Tensor(name, TRITON_TYPES[dtype], tuple(shape[1:]))


def read_export(onnx_dir: str | os.PathLike[str]) -> Export:
    """Read and check the ``manifest.json`` of a ``deris-export onnx`` directory."""
    folder = Path(onnx_dir)
    try:
        manifest = read_manifest(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise RepoError(f"{exc}; pass the output directory of `deris-export onnx`") from exc
    try:
        graphs = {
            name: Graph(
                name=name,
                # The ONNX Runtime rewrite where the export has one (both CPU backends run ORT).
                files=tuple((folder / f["name"], str(f["sha256"])) for f in entry.get("optimized", entry)["files"]),
                exported_sha256=str(entry["files"][0]["sha256"]),
                custom_ops=tuple(entry.get("custom_ops", ())),
                inputs=tuple(_tensor(name, t) for t in entry["inputs"]),
                outputs=tuple(_tensor(name, t) for t in entry["outputs"]),
            )
            for name, entry in manifest["graphs"].items()
        }
        return Export(
            preset=str(manifest["preset"]),
            resolution=int(manifest["resolution"]),
            max_text_len=int(manifest["max_text_len"]),
            num_queries=int(manifest["num_queries"]),
            max_batch=int(manifest["batch"]["max"]),
            graphs=graphs,
            topology=Topology.from_json(manifest["topology"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, RepoError):
            raise
        raise RepoError(f"{folder / MANIFEST_NAME} is not a deris-export onnx manifest ({type(exc).__name__}: {exc})") from exc


def read_engines(engines_dir: str | os.PathLike[str], export: Export, names: Sequence[str]) -> tuple[dict[str, tuple[Path, str]], int]:
    """The ``<graph>.plan`` files (with their sha256) of a ``deris-export trt`` directory and the
    largest batch its optimisation profile accepts; checked against the ONNX export: same model
    and resolution, each engine built from this export's graph, and the engines' parity passed."""
    folder = Path(engines_dir)
    try:
        manifest = read_manifest(folder)
        trt = manifest["tensorrt"]
        entries = {name: trt["engines"][name] for name in names}
        engines = {name: (folder / entry["file"], str(entry["sha256"])) for name, entry in entries.items()}
        max_batch = int(trt["profile"]["max"])
        parity = trt["parity"]
    except KeyError as exc:
        raise RepoError(f"{folder} has no TensorRT entry {exc} in its manifest.json; build it with `deris-export trt`") from exc
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise RepoError(f"{exc}; pass the output directory of `deris-export trt`") from exc
    for key, value in (("preset", export.preset), ("resolution", export.resolution)):
        if manifest.get(key) != value:
            raise RepoError(f"the engines in {folder} were built for {key} {manifest.get(key)!r}, the ONNX export has {value!r}")
    stale = [name for name, entry in entries.items() if entry.get("onnx_sha256") != export.graphs[name].exported_sha256]
    if stale:
        raise RepoError(f"the engines for {', '.join(stale)} in {folder} were not built from this ONNX export's graphs; "
                        f"pass the export they were built from ({folder / 'onnx'}) or rebuild them")
    if not parity.get("passed"):
        raise RepoError(f"the engines in {folder} failed their parity check (see {folder / str(parity.get('report'))}); "
                        "they are not served")
    missing = [str(path) for path, _ in engines.values() if not path.is_file()]
    if missing:
        raise RepoError(f"missing TensorRT engine file(s): {', '.join(missing)}")
    return engines, max_batch


# --- config.pbtxt ------------------------------------------------------------------------------
# Every config is a model_config_pb2.ModelConfig message written with text_format, so a field or
# value outside Triton's schema fails here, at generation, not when the server loads the repository.


def _add_tensors(field: Any, tensors: Sequence[Tensor]) -> None:
    for t in tensors:
        field.add(name=t.name, data_type=pb.DataType.Value(t.data_type), dims=list(t.dims))


def model_config(
    name: str,
    *,
    kind: str,
    max_batch_size: int,
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    instances: int = 1,
    instance_kind: str = "KIND_CPU",
    dynamic_batching_delay_us: int | None = None,
    parameters: dict[str, str] | None = None,
) -> pb.ModelConfig:
    """The config of one non-ensemble model. ``kind`` is ``python`` (a backend) or a platform."""
    config = pb.ModelConfig(name=name, max_batch_size=max_batch_size)
    if kind == "python":
        config.backend = kind
    else:
        config.platform = kind
    _add_tensors(config.input, inputs)
    _add_tensors(config.output, outputs)
    if dynamic_batching_delay_us is not None:
        config.dynamic_batching.max_queue_delay_microseconds = dynamic_batching_delay_us
    config.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value(instance_kind), count=instances)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    return config


def ensemble_config(
    name: str,
    max_batch_size: int,
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    steps: Sequence[Step],
    parameters: dict[str, str],
) -> pb.ModelConfig:
    config = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch_size)
    _add_tensors(config.input, inputs)
    _add_tensors(config.output, outputs)
    for step in steps:
        entry = config.ensemble_scheduling.step.add(model_name=step.model, model_version=-1)
        entry.input_map.update(step.inputs)
        entry.output_map.update(step.outputs)
    # Informational for clients (e.g. the default thresholds `deris client` reports); the
    # ensemble itself does not read them.
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def _write_config(repo: Path, config: pb.ModelConfig) -> None:
    _write(repo / config.name / "config.pbtxt", text_format.MessageToString(config))


# --- the pipeline --------------------------------------------------------------------------------


def ensemble_steps(topology: Topology, decoder: str) -> list[Step]:
    """The ensemble's steps, straight from the topology's edges: every graph maps its tensors to
    the pipeline values they read and write (only values that a later step or the result reads).
    Values are unique, which an ensemble needs: it is a DAG over uniquely named tensors."""
    graphs = topology.layout(decoder)
    consumed = topology.consumed_values(decoder)
    steps = [Step(PREPROCESS, {"IMAGE": "IMAGE", "TEXT": "TEXT"}, {n: n for n in (*PIPELINE_INPUTS, "original_size")})]
    for graph in graphs:
        steps.append(
            Step(
                graph.name,
                {t.name: t.value for t in graph.inputs},
                {t.name: t.value for t in graph.outputs if t.value in consumed},
            )
        )
    steps.append(
        Step(
            POSTPROCESS,
            topology.final_values() | {"original_size": "original_size"},
            {n: n for n in RESULT_NAMES},
        )
    )
    return steps


def _check_graphs(export: Export, names: Sequence[str], steps: Sequence[Step]) -> None:
    missing = [n for n in names if n not in export.graphs]
    if missing:
        raise RepoError(
            f"the export has no graph(s) {', '.join(missing)} (it has {', '.join(export.graphs)}); "
            "export them, or choose the other --decoder layout"
        )
    by_model = {s.model: s for s in steps}
    for name in names:
        graph, step = export.graphs[name], by_model[name]
        have_in, have_out = {t.name for t in graph.inputs}, {t.name for t in graph.outputs}
        if have_in != set(step.inputs) or not set(step.outputs) <= have_out:
            raise RepoError(
                f"graph {name} has inputs {sorted(have_in)} and outputs {sorted(have_out)}; the ensemble "
                f"needs inputs {sorted(step.inputs)} and outputs {sorted(step.outputs)}"
            )
        missing = [str(path) for path, _ in graph.files if not path.is_file()]
        if missing:
            raise RepoError(f"graph {name}: file(s) {', '.join(missing)} listed in the manifest do not exist")


def _copy_checked(source: Path, sha256: str, target: Path) -> None:
    """Copy a file and check it against the manifest's checksum on the way (one read)."""
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(1 << 22):
            digest.update(chunk)
            dst.write(chunk)
    if digest.hexdigest() != sha256:
        raise RepoError(f"{source} does not match the sha256 in its manifest.json: the file is incomplete or was modified")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RepoError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_threshold(value: float) -> float:
    try:
        return check_threshold("score_threshold", value)
    except ValueError as exc:
        raise RepoError(str(exc)) from None


@dataclass(frozen=True)
class Settings:
    """How every model of the repository is configured."""

    backend: str
    max_batch_size: int
    instances: int
    intra_op_threads: int
    max_queue_delay_us: int
    score_threshold: float  # the server's default (requests may override it)


def generate_triton_repo(
    onnx_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    backend: str,
    decoder: str = "rounds",
    engines_dir: str | os.PathLike[str] | None = None,
    spm_path: str | os.PathLike[str] = TOKENIZER_FILE,
    max_batch_size: int = 8,
    instances: int = 1,
    intra_op_threads: int = 1,
    max_queue_delay_us: int = 0,
    score_threshold: float | None = None,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Write a complete Triton model repository for the ONNX export in ``onnx_dir``; return its path.

    ``backend`` (one of :data:`BACKENDS`) chooses how the graphs run; ``tensorrt`` needs
    ``engines_dir``, a ``deris-export trt`` directory built from this export with a batch profile
    that reaches ``max_batch_size``. ``decoder`` is ``rounds`` (one model per loopback round) or ``fused`` (the
    single ``decoder`` graph). ``instances`` is the instance count of every model;
    ``intra_op_threads`` the ONNX Runtime threads per instance (CPU backends);
    ``max_queue_delay_us`` how long the dynamic batcher may wait to fill a batch; ``score_threshold`` the
    server's default score threshold (None: the preset's; requests may override it). An existing
    ``out_dir`` is replaced only with ``force``; ``progress`` shows a bar over the graph models
    (whose files can be GBs). Raises :class:`RepoError` for bad inputs.
    """
    from deris.text import TextEncoder, TokenizerError

    if backend not in BACKENDS:
        raise RepoError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    counts = (
        _check_count("max_batch_size", max_batch_size, 1),
        _check_count("instances", instances, 1),
        _check_count("intra_op_threads", intra_op_threads, 1),
        _check_count("max_queue_delay_us", max_queue_delay_us, 0),
    )
    threshold = None if score_threshold is None else _check_threshold(score_threshold)
    out = Path(out_dir)
    check_output_dir(out, force)
    if (backend == "tensorrt") != (engines_dir is not None):
        raise RepoError("an engines directory (--engines) is required with the tensorrt backend and only used there")
    export = read_export(onnx_dir)
    settings = Settings(backend, *counts, get_config(export.preset).score_threshold if threshold is None else threshold)
    names = graph_names(export, decoder)
    steps = ensemble_steps(export.topology, decoder)
    _check_graphs(export, names, steps)
    if export.max_batch < max_batch_size:
        raise RepoError(f"max_batch_size {max_batch_size} is above the export's batch limit {export.max_batch}")
    if backend != "tensorrt":
        custom = sorted({op for n in names for op in export.graphs[n].custom_ops})
        if custom:
            raise RepoError(
                f"the graphs use custom ops ({', '.join(custom)}) that only TensorRT runs; for --backend {backend} "
                "export with `deris-export onnx --msda gridsample`"
            )
    plans: dict[str, tuple[Path, str]] = {}
    if engines_dir is not None:
        plans, engine_max_batch = read_engines(engines_dir, export, names)
        if engine_max_batch < max_batch_size:
            raise RepoError(
                f"max_batch_size {max_batch_size} is above the engines' profile maximum {engine_max_batch}; "
                f"pass --max-batch-size {engine_max_batch} or rebuild the engines with a larger --max-batch"
            )
    spm = Path(spm_path)
    try:  # fail now rather than when the server loads the repository
        TextEncoder.from_spm(spm, export.max_text_len)
    except TokenizerError as exc:
        raise RepoError(str(exc)) from exc

    with staged_directory(out, force) as staging:  # complete or absent, as the ONNX export
        _write_preprocess(staging, export, spm, settings)
        for name in tqdm(names, desc="triton-repo", unit="model", disable=not progress):
            _write_graph(staging, export.graphs[name], settings, plans.get(name))
        _write_postprocess(staging, export, export.graphs[names[-1]], settings)
        _write_ensemble(staging, export, steps, decoder, settings)
    return out


STRING = "TYPE_STRING"
ENSEMBLE_INPUTS = (Tensor("IMAGE", STRING, (1,)), Tensor("TEXT", STRING, (1,)))


RESULT_NAMES = ("MASK", "SCORES", "NO_TARGET", "EXISTENCE_PROB")


def _results(num_queries: int) -> tuple[Tensor, ...]:
    """The ensemble's outputs, per item: the mask at the image's original size, scores, decision."""
    return (
        Tensor("MASK", "TYPE_UINT8", (-1, -1)),
        Tensor("SCORES", "TYPE_FP32", (num_queries,)),
        Tensor("NO_TARGET", "TYPE_BOOL", (1,)),
        Tensor("EXISTENCE_PROB", "TYPE_FP32", (1,)),
    )


def _thresholds(preset: str, settings: Settings) -> dict[str, str]:
    return {"score_threshold": str(settings.score_threshold), "mask_threshold": str(get_config(preset).mask_threshold)}


def _write_preprocess(repo: Path, export: Export, spm: Path, settings: Settings) -> None:
    from deris.preprocess import MAX_IMAGE_PIXELS

    cognition, perception = export.graphs["cognition"], export.graphs["perception"]
    img = perception.tensor("img")
    # The image tensors take the dtype the graphs expect (fp16 exports take fp16).
    outputs = [
        img,
        cognition.tensor("img_mini"),
        cognition.tensor("token_ids"),
        cognition.tensor("text_pad_mask"),
        Tensor("original_size", "TYPE_INT64", (2,)),
    ]
    parameters = {
        "image_size": str(export.resolution),
        "mini_image_size": str(cognition.tensor("img_mini").dims[-1]),
        "max_text_len": str(export.max_text_len),
        "tokenizer": TOKENIZER_FILE,
        "max_image_pixels": str(MAX_IMAGE_PIXELS),
        "image_dtype": {v: k for k, v in TRITON_TYPES.items()}[img.data_type],
    }
    _write_config(repo, model_config(
        PREPROCESS, kind="python", max_batch_size=settings.max_batch_size, inputs=ENSEMBLE_INPUTS,
        outputs=outputs, instances=settings.instances, parameters=parameters,
    ))
    (repo / PREPROCESS / VERSION).mkdir()
    shutil.copyfile(model_source("preprocess"), repo / PREPROCESS / VERSION / "model.py")
    shutil.copyfile(spm, repo / PREPROCESS / VERSION / TOKENIZER_FILE)


def _write_graph(repo: Path, graph: Graph, settings: Settings, plan: tuple[Path, str] | None) -> None:
    version = repo / graph.name / VERSION
    version.mkdir(parents=True)
    parameters: dict[str, str] = {}
    instance_kind = "KIND_CPU"
    if settings.backend == "tensorrt":
        # Engines with MSDA plugins need no plugin library: the built-in plugin ships with
        # TensorRT, and the triton-plugin kernel is compiled into the engine (AOT).
        assert plan is not None
        kind, instance_kind = "tensorrt_plan", "KIND_GPU"
        _copy_checked(*plan, version / "model.plan")
    else:
        # The graph becomes model.onnx; external data files keep their names, which the graph refers to.
        (source, sha256), *data_files = graph.files
        _copy_checked(source, sha256, version / "model.onnx")
        for path, digest in data_files:
            _copy_checked(path, digest, version / path.name)
        if settings.backend == "onnxruntime":
            kind = "onnxruntime_onnx"
            parameters = {"intra_op_thread_count": str(settings.intra_op_threads), "inter_op_thread_count": "1"}
        else:
            kind = "python"
            parameters = {"onnx_file": "model.onnx", "intra_op_threads": str(settings.intra_op_threads),
                          "disabled_optimizers": CPU_DISABLED_OPTIMIZERS}
            shutil.copyfile(model_source("onnx_runner"), version / "model.py")
    config = model_config(
        graph.name, kind=kind, max_batch_size=settings.max_batch_size, inputs=graph.inputs,
        outputs=graph.outputs, instances=settings.instances, instance_kind=instance_kind,
        dynamic_batching_delay_us=settings.max_queue_delay_us, parameters=parameters,
    )
    if settings.backend == "tensorrt":
        add_warmup(config, graph.inputs, settings.max_batch_size)
    _write_config(repo, config)


def add_warmup(config: pb.ModelConfig, inputs: Sequence[Tensor], max_batch_size: int) -> None:
    """Warm-up requests Triton runs before it marks the model READY: at batch 1 and at the largest
    batch, so the first engine execution context and its largest allocations exist before traffic.
    Zeros are valid for every input (token id 0 is <s>, mask 0 is "not padding")."""
    for batch in sorted({1, max_batch_size}):
        warmup = config.model_warmup.add(name=f"zeros_batch_{batch}", batch_size=batch, count=1)
        for t in inputs:
            warmup.inputs[t.name].CopyFrom(
                pb.ModelWarmup.Input(data_type=pb.DataType.Value(t.data_type), dims=list(t.dims), zero_data=True)
            )


def _write_postprocess(repo: Path, export: Export, last: Graph, settings: Settings) -> None:
    # max_batch_size 0: every dimension, the request's batch axis first, is written out.
    inputs = [
        Tensor(t.name, t.data_type, (-1, *t.dims))
        for t in (last.tensor("mask_logits"), last.tensor("refer_logits"), last.tensor("existence"))
    ]
    inputs.append(Tensor("original_size", "TYPE_INT64", (-1, 2)))
    outputs = [Tensor(t.name, t.data_type, (-1, *t.dims)) for t in _results(export.num_queries)]
    _write_config(repo, model_config(
        POSTPROCESS, kind="python", max_batch_size=0, inputs=inputs, outputs=outputs,
        instances=settings.instances, parameters=_thresholds(export.preset, settings),
    ))
    (repo / POSTPROCESS / VERSION).mkdir()
    shutil.copyfile(model_source("postprocess"), repo / POSTPROCESS / VERSION / "model.py")


def _write_ensemble(repo: Path, export: Export, steps: Sequence[Step], decoder: str, settings: Settings) -> None:
    info = {"preset": export.preset, "backend": settings.backend, "decoder": decoder} | _thresholds(export.preset, settings)
    _write_config(repo, ensemble_config(
        ENSEMBLE, settings.max_batch_size, ENSEMBLE_INPUTS, _results(export.num_queries), steps, info
    ))
    (repo / ENSEMBLE / VERSION).mkdir()  # Triton wants a version folder, even an empty one


# --- CLI -----------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``triton-repo`` subcommand to ``deris-export``."""
    p = add_command(
        subparsers, "triton-repo", run=run_triton_repo,
        help="generate a Triton Inference Server model repository from an ONNX export",
        description="Write a Triton model repository serving the `deris` ensemble (image bytes + text in; "
        "mask, scores and decision out) for an export of `deris-export onnx`. Backends: tensorrt (GPU, "
        "needs --engines), onnxruntime (CPU, needs a tritonserver with the ONNX Runtime backend), python "
        "(CPU, ONNX Runtime inside python-backend models; works with the server bundled in nvidia-pytriton).",
        examples="  deris-export triton-repo --onnx exports/b-384 --backend python --tokenizer beit3.spm --out repo/",
    )
    add_onnx(p, required=True)
    p.add_argument("--engines", type=Path, metavar="DIR", help="engines directory of `deris-export trt` (--backend tensorrt)")
    p.add_argument("--backend", required=True, choices=BACKENDS, help="how the graph models run")
    p.add_argument("--decoder", default="rounds", choices=DECODERS,
                   help="rounds: one model per loopback round (default); fused: the single decoder graph")
    p.add_argument("--tokenizer", type=Path,
                   help="BEiT-3 sentencepiece model (beit3.spm); default for a demo-model export: the demo model's own")
    p.add_argument("--out", type=Path, required=True, help="repository directory to create")
    p.add_argument("--max-batch-size", type=int, default=8, help="items per batch for every model (default 8)")
    p.add_argument("--instances", type=int, default=1, help="instances of every model (default 1)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per instance (default 1)")
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="how long the dynamic batcher may wait to fill a batch, in microseconds (default 0)")
    p.add_argument("--score-threshold", type=float, metavar="T",
                   help="the server's default score threshold, in (0, 1) (default: the preset's; pick it with "
                   "`deris eval --score-sweep`); a request's score_threshold parameter still overrides it")
    add_force(p)
    add_quiet(p)


def run_triton_repo(args: argparse.Namespace) -> int:
    spm = resolve_tokenizer(read_export(args.onnx).preset, args.tokenizer, export=args.onnx)
    repo = generate_triton_repo(
        args.onnx, args.out, args.backend, args.decoder, engines_dir=args.engines, spm_path=spm,
        max_batch_size=args.max_batch_size, instances=args.instances, intra_op_threads=args.threads,
        max_queue_delay_us=args.max_queue_delay_us, score_threshold=args.score_threshold, force=args.force,
        progress=not args.quiet,
    )
    models = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    print(f"wrote {repo}: {len(models)} models ({', '.join(models)}); serve it with `deris serve --repo {repo}`")
    return EXIT_OK
