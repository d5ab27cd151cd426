"""``deris eval`` and ``deris eval-merge``: the official metrics of one or more backends on a dataset split,
and how far each backend agrees with the first.

Backends (``--backend``, repeatable; the first is the reference the others are compared with):

* ``torch``: :class:`deris.predictor.Predictor` from ``--preset``, ``--checkpoint``, ``--tokenizer``, with
  ``--query-sa`` and ``--batch-size`` (``official_batch`` mixes the images of a batch, as the official code);
* ``onnxruntime:DIR``: an ONNX export directory, run by :class:`deris.export.runtime.OnnxPipeline` (preset,
  resolution and text length from its manifest, as for tensorrt; the tokenizer from ``--tokenizer``);
* ``tensorrt:DIR``: the engines of a ``deris-export trt`` directory, chained as the ONNX graphs are, through
  the polygraphy runners of :func:`deris.export.tensorrt_build.engine_runner_factory` (needs TensorRT and a GPU);
* ``triton:HOST:PORT`` (gRPC) or ``triton:http://HOST:PORT``: the ``deris`` ensemble of a Triton server through
  :class:`deris.triton_repo.client.DerisClient`, ``--concurrency`` requests in flight.

Every backend's model outputs go through :func:`deris.postprocess.postprocess` (the server runs the same
function), so the backends differ only in how they compute the model outputs.

Scoring (``deris.evaluation``; GresMetrics for gRefCOCO, RisMetrics for RefCOCO/+/g):

* default, the official protocol: the model-resolution mask (384x384 for every official preset; the mask
  :func:`deris.postprocess.postprocess` makes before resizing it to the original size) against the GT
  nearest-resized to that resolution (:func:`deris.datasets.official_gt_mask`);
* ``--at-original-size``: the mask nearest-resized to the original size, exactly what ``deris predict``
  writes, against the original GT.

A Triton server returns masks at the original size only, and nearest resizing does not invert: resizing
them back to 384x384 gives a different mask unless the original size is an integer multiple of 384. So the
triton backend is scored at the original size only (``--at-original-size``).

Outputs, in ``--out`` (staged and renamed: complete or absent): ``metrics.json`` (the run, and per backend
its metrics, the mergeable accumulator states, throughput and agreement with the reference), ``metrics.md``
(the table) and ``records/<backend>.jsonl`` (one line per sample: I, U, IoU, decisions, scores).

``--score-sweep T,T,...`` scores each backend again at those score thresholds from the same model outputs
(:func:`deris.postprocess.postprocess` decides once more per threshold, so the sweep's point at the run's own
threshold is the run's result exactly): a second table and ``score_sweep.png``, which on gRefCOCO plots the
N-acc / T-acc trade-off that choosing the threshold sets. A Triton server decides inside the ensemble with one
threshold per request, so the triton backend cannot sweep.

Several processes: ``--shard i/n`` or ``torchrun`` (``RANK``/``WORLD_SIZE`` pick the shard) write
``<out>/shard-<i>-of-<n>/``; ``deris eval-merge`` combines the shards from their accumulator states.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import heapq
import itertools
import json
import math
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import numpy as np

from deris.cli_support import (
    EXIT_OK,
    UsageError,
    add_command,
    add_force,
    add_preset,
    add_quiet,
    demo_model,
    resolve_tokenizer,
)
from deris.config import QUERY_SA_MODES
from deris.evaluation import GresMetrics, GresScore, RisMetrics, RisScore, mask_counts, metrics_from_state
from deris.outputs import MATPLOTLIB, figure_png, has_matplotlib, new_figure
from deris.prediction import Prediction, check_threshold

if TYPE_CHECKING:
    from deris.datasets import RefDataset, Sample

KINDS = ("torch", "onnxruntime", "tensorrt", "triton")
ACCEPTED = "torch, onnxruntime:DIR, tensorrt:DIR, triton:[http://]HOST:PORT"
FORMAT_VERSION = 1
METRICS_FILE = "metrics.json"
TABLE_FILE = "metrics.md"
SWEEP_PLOT = "score_sweep.png"
RECORDS_DIR = "records"

TRITON_SIZE = (
    "the triton backend returns masks at the original image size only, and nearest resizing them back to the "
    "model resolution does not give the model's mask (it does only for integer multiples); score it with "
    "--at-original-size (every backend is then scored as `deris predict` writes its masks)"
)

DESCRIPTION = f"""\
Score a referring-segmentation split with the official metrics (gRefCOCO: gIoU, cIoU, N-acc, T-acc,
Pr@0.7-0.9; RefCOCO/+/g: mIoU, oIoU, Pr@0.5-0.9), with one or more backends in one pass. The first
--backend is the reference: each other one is compared with it (mean and minimum IoU between the two
backends' masks, same no-target decisions, largest score difference). Every backend's throughput is
measured over its own preprocessing and inference, after one warm-up call (loading the samples is not
counted).

backends (--backend B, repeatable; default torch):
  torch               the PyTorch model: --preset, --checkpoint, --tokenizer (--query-sa, --batch-size, --device);
                      none of the three: the built-in demo model
  onnxruntime:DIR     an ONNX export directory (deris-export onnx) in ONNX Runtime on the CPU; --tokenizer
                      (not for an export of the demo model)
  tensorrt:DIR        TensorRT engines (deris-export trt) on the GPU, through polygraphy; needs TensorRT, --tokenizer
  triton:HOST:PORT    the `deris` ensemble of a Triton server over gRPC (triton:http://HOST:PORT for HTTP),
                      --concurrency requests in flight

Scoring: by default the official protocol, the model's mask at its own resolution (384x384 for the
official presets) against the GT nearest-resized to it; --at-original-size scores the masks that
`deris predict` writes against the original GT. A Triton server returns original-size masks only,
so the triton backend needs --at-original-size.

Writes OUT/{METRICS_FILE}, OUT/{TABLE_FILE} and OUT/{RECORDS_DIR}/<backend>.jsonl (I, U, IoU, decisions and
scores per sample), all at once when the run completes. --score-sweep T,T,... also scores every backend at
those score thresholds from the same model outputs: a second table and OUT/{SWEEP_PLOT} (on gRefCOCO the
N-acc / T-acc trade-off: a higher threshold recognises more no-target expressions and drops more real ones).

With --shard i/n, or under torchrun (RANK, WORLD_SIZE), the process scores every n-th sample from i into
OUT/shard-<i>-of-<n>/; `deris eval-merge` combines the shards."""

EXAMPLES = """\
  # offline, nothing to download: synthetic scenes scored with the built-in demo model
  deris make-synthetic --out synthetic --images 200 --seed 1
  deris eval --data-root synthetic --dataset grefcoco --split val --out eval/demo-val
  # choose the score threshold: the N-acc / T-acc trade-off from one pass (table and score_sweep.png)
  deris eval --data-root synthetic --dataset grefcoco --split val --score-sweep 0.5,0.6,0.7,0.8,0.85,0.9,0.95 \\
      --out eval/demo-sweep
  # gRefCOCO val, DeRIS-B (DeRIS README: gIoU 74.10, cIoU 68.06, N-acc 77.03); batch 1, per-sample query_SA:
  deris eval --data-root data/seqtr_type --dataset grefcoco --split val --backend torch \\
      --preset deris-b-grefcoco --checkpoint DeRIS-B-grefcoco.pth --tokenizer beit3.spm \\
      --score-threshold 0.7 --out eval/b-grefcoco-val
  # RefCOCO val, DeRIS-B (mIoU 81.99, oIoU 80.80): the official run used 16 images per batch with the
  # cross-image query_SA, and tools/test.py's score threshold 0.7 instead of the config's 0.9:
  deris eval --data-root data/seqtr_type --dataset refcoco --split val --backend torch \\
      --preset deris-b-refcoco --checkpoint DeRIS-B-refcoco.pth --tokenizer beit3.spm \\
      --query-sa official_batch --batch-size 16 --score-threshold 0.7 --out eval/b-refcoco-val
  # PyTorch, its ONNX export and a Triton server in one table (Triton: original size only):
  deris eval --data-root data/seqtr_type --dataset grefcoco --split val --limit 500 --at-original-size \\
      --preset deris-b-grefcoco --checkpoint DeRIS-B-grefcoco.pth --tokenizer beit3.spm \\
      --backend torch --backend onnxruntime:exports/b-384 --backend triton:127.0.0.1:8001 --concurrency 8 \\
      --out eval/parity
  # 8 GPUs, one shard per process (torchrun sets RANK/WORLD_SIZE), then one result:
  torchrun --nproc-per-node 8 --no-python deris eval ... --device cuda --out eval/run
  deris eval-merge eval/run/shard-*-of-8 --out eval/run-merged"""


# --- backend specs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendSpec:
    kind: str
    resource: str | None  # the export or engine directory, or the server address; None for torch

    def __str__(self) -> str:
        return self.kind if self.resource is None else f"{self.kind}:{self.resource}"


def backend_spec(text: str) -> BackendSpec:
    """argparse type: ``torch``, ``onnxruntime:DIR``, ``tensorrt:DIR``, ``triton:[http://]HOST:PORT``."""
    kind, _, resource = text.partition(":")
    if kind not in KINDS:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; accepted: {ACCEPTED}")
    if kind == "torch":
        if resource:
            raise argparse.ArgumentTypeError("the torch backend takes no resource: it uses --preset, --checkpoint, --tokenizer")
        return BackendSpec(kind, None)
    if not resource:
        what = "a server address, triton:HOST:PORT (gRPC) or triton:http://HOST:PORT" if kind == "triton" else f"{kind}:DIR"
        raise argparse.ArgumentTypeError(f"the {kind} backend needs {what}")
    return BackendSpec(kind, resource)


def shard_spec(text: str) -> tuple[int, int]:
    """argparse type: ``i/n`` with 0 <= i < n."""
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard takes i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return i, n


def threshold_list(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated score thresholds, each inside (0, 1); sorted, without repeats."""
    try:
        values = {check_threshold("a score threshold", v) for v in text.split(",") if v.strip()}
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error} (in {text!r})") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated score thresholds such as 0.5,0.7,0.9, got {text!r}")
    return tuple(sorted(values))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# --- backends -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One sample with its image file's bytes (read once, handed to every backend)."""

    sample: Sample
    image: bytes


class Backend(Protocol):
    spec: BackendSpec
    score_threshold: float
    # The square resolution its masks come at (the model's), or None: at each image's original size.
    resolution: int | None

    def describe(self) -> dict[str, Any]: ...

    def predict(self, items: Sequence[Item]) -> list[Prediction]: ...

    def close(self) -> None: ...


def _batches(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class TorchBackend:
    """The PyTorch :class:`~deris.predictor.Predictor`, masks at the model resolution."""

    def __init__(self, spec: BackendSpec, args: argparse.Namespace) -> None:
        import deris
        from deris.predictor import Predictor
        from deris.text import TextEncoder

        model = deris.from_checkpoint(args.preset, args.checkpoint, query_sa=args.query_sa)
        self.predictor = Predictor(
            model, TextEncoder.from_spm(args.tokenizer, model.cfg.max_text_len), score_threshold=args.score_threshold,
            device=_torch_device(args.device),
        )
        self.spec, self.batch_size, self._sweep = spec, args.batch_size, args.score_sweep
        self.score_threshold = self.predictor.score_threshold
        self._side = model.cfg.image_size
        self.resolution: int | None = self._side
        self._details = {"preset": args.preset, "checkpoint": Path(args.checkpoint).name, "query_sa": args.query_sa,
                         "batch_size": args.batch_size, "device": str(self.predictor.device), "resolution": self.resolution}

    def describe(self) -> dict[str, Any]:
        return self._details

    def predict(self, items: Sequence[Item]) -> list[Prediction]:
        # postprocess resizes each mask to PreparedImage.original_size; asking for the model resolution keeps
        # the model's own mask (a nearest resize to the same size is a copy).
        size = (self._side, self._side)
        predictions: list[Prediction] = []
        for batch in _batches(items, self.batch_size):
            prepared = [dataclasses.replace(self.predictor.prepare(item.image), original_size=size) for item in batch]
            predictions += self.predictor.predict_prepared(prepared, [item.sample.expression for item in batch], self._sweep)
        return predictions

    def close(self) -> None:
        pass


Graphs = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # pipeline inputs -> mask_logits, refer_logits, existence


class GraphBackend:
    """An export's graphs (ONNX Runtime, or TensorRT engines) with the project's preprocessing and
    post-processing; masks at the export's resolution. Preset, resolutions and text length come from the
    export's manifest, the tokenizer from ``--tokenizer``."""

    def __init__(self, spec: BackendSpec, args: argparse.Namespace, manifest: dict[str, Any], graphs: Graphs,
                 max_batch: int, details: dict[str, Any], close: Callable[[], None] = lambda: None) -> None:
        from deris.config import get_config
        from deris.text import TextEncoder

        cfg = get_config(manifest["preset"])
        if args.preset is not None and args.preset != cfg.name:
            # args.preset is --preset's, or the demo model's where the torch backend defaulted to it.
            raise UsageError(f"{spec.resource} is an export of {cfg.name}, not of {args.preset} (--preset's model or, "
                             "without --preset, the built-in demo model that --backend torch runs)")
        self.spec, self._graphs, self._close = spec, graphs, close
        self._side, self._mini_side = int(manifest["resolution"]), int(manifest["mini_resolution"])
        self.resolution: int | None = self._side
        tokenizer = resolve_tokenizer(cfg.name, args.tokenizer, export=spec.resource)
        self._encoder = TextEncoder.from_spm(tokenizer, int(manifest["max_text_len"]))
        self.score_threshold = check_threshold(
            "score_threshold", manifest["score_threshold"] if args.score_threshold is None else args.score_threshold
        )
        self._mask_threshold, self._sweep = cfg.mask_threshold, args.score_sweep
        self._batch_size = min(args.batch_size, max_batch)
        self._details = {"directory": spec.resource, "preset": cfg.name, "weights": manifest.get("weights"),
                         "precision": manifest.get("precision"), "msda": manifest.get("msda"), "query_sa": "per_sample",
                         "batch_size": self._batch_size, "resolution": self._side} | details

    def describe(self) -> dict[str, Any]:
        return self._details

    def close(self) -> None:
        self._close()

    def predict(self, items: Sequence[Item]) -> list[Prediction]:
        import torch

        from deris.postprocess import postprocess
        from deris.preprocess import preprocess_image

        predictions: list[Prediction] = []
        for batch in _batches(items, self._batch_size):
            prepared = [preprocess_image(item.image, self._side, self._mini_side) for item in batch]
            token_ids, pad_mask = self._encoder.encode_batch([item.sample.expression for item in batch])
            out = self._graphs({"img": np.stack([p.img for p in prepared]), "img_mini": np.stack([p.img_mini for p in prepared]),
                                "token_ids": token_ids, "text_pad_mask": pad_mask})
            # As the server's postprocess model: the graphs' outputs, as they come, into the one post-processing.
            predictions += postprocess(
                torch.from_numpy(out["mask_logits"]), torch.from_numpy(out["refer_logits"]), torch.from_numpy(out["existence"]),
                [(self._side, self._side)] * len(batch), self.score_threshold, self._mask_threshold, self._sweep,
            )
        return predictions


def _open_onnxruntime(spec: BackendSpec, args: argparse.Namespace) -> GraphBackend:
    from deris.export.runtime import OnnxPipeline

    assert spec.resource is not None
    pipeline = OnnxPipeline(Path(spec.resource))
    manifest = pipeline.manifest
    return GraphBackend(spec, args, manifest, pipeline, int(manifest["batch"]["max"]), {"runtime": "onnxruntime"})


class EngineChain:
    """The engines of a ``deris-export trt`` directory, chained as :class:`~deris.export.runtime.OnnxPipeline`
    chains the graphs (the fused decoder where its engine was built, else the rounds), through the polygraphy
    runners of :func:`deris.export.tensorrt_build.engine_runner_factory`."""

    def __init__(self, manifest: dict[str, Any], runners: Callable[[str], Any]) -> None:
        from deris.topology import Topology

        self._topology = Topology.from_json(manifest["topology"])
        self._layout = self._topology.layout("fused" if "decoder" in manifest["tensorrt"]["engines"] else "rounds")
        self._inputs = {name: entry["inputs"] for name, entry in manifest["graphs"].items()}
        self._stack = contextlib.ExitStack()
        self._runners = {g.name: self._stack.enter_context(runners(g.name)) for g in self._layout}

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from deris.topology import GraphSpec, run_chain

        def run(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            # Each engine takes its inputs in the dtypes its graph declares (fp16 images for fp16 exports).
            cast = {t["name"]: np.asarray(feeds[t["name"]]).astype(t["dtype"], copy=False) for t in self._inputs[spec.name]}
            return dict(self._runners[spec.name].infer(cast))

        values = run_chain(self._layout, run, inputs)
        return {name: values[value] for name, value in self._topology.final_values().items()}

    def close(self) -> None:
        self._stack.close()


def _open_tensorrt(spec: BackendSpec, args: argparse.Namespace) -> GraphBackend:
    from deris.export.manifest import MANIFEST_NAME, read_manifest
    from deris.export.tensorrt_build import engine_runner_factory

    assert spec.resource is not None
    directory = Path(spec.resource)
    if not (directory / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"{directory} is not a `deris-export trt` engine directory: {MANIFEST_NAME} is missing")
    manifest = read_manifest(directory)
    section = manifest.get("tensorrt")
    if section is None:
        raise UsageError(f"{directory} holds no TensorRT engines (its manifest has no tensorrt section); "
                         "build them with `deris-export trt`, or evaluate this export with onnxruntime:DIR")
    chain = EngineChain(manifest, engine_runner_factory(directory))  # a ToolError where TensorRT is missing
    if not section.get("parity", {}).get("passed"):
        print(f"warning: the engines in {directory} did not pass their parity check at build time", file=sys.stderr)
    details = {"runtime": "tensorrt", "tensorrt": section.get("version"), "parity_passed": section.get("parity", {}).get("passed")}
    return GraphBackend(spec, args, manifest, chain, int(section["profile"]["max"]), details, close=chain.close)


class TritonBackend:
    """The ``deris`` ensemble of a Triton server, ``--concurrency`` requests in flight; masks at the original size.

    Each worker thread has its own client: the HTTP client (gevent) works only in the thread that made it."""

    def __init__(self, spec: BackendSpec, args: argparse.Namespace) -> None:
        from deris.triton_repo.client import DerisClient

        assert spec.resource is not None
        self.spec = spec
        self.resolution: int | None = None
        protocol = "http" if spec.resource.startswith(("http://", "https://")) else "grpc"
        self._connect = functools.partial(DerisClient, spec.resource, protocol)
        with self._connect() as probe:
            defaults = probe.default_thresholds()  # also checks that the server answers
            self._details = {"url": probe.url, "protocol": protocol, "model": probe.model,
                             "concurrency": args.concurrency, "server_thresholds": defaults}
        self._override = args.score_threshold
        self.score_threshold = defaults["score_threshold"] if args.score_threshold is None else args.score_threshold
        self._local = threading.local()
        self._clients: list[DerisClient] = []
        self._pool = ThreadPoolExecutor(args.concurrency, thread_name_prefix="deris-eval-triton")

    def describe(self) -> dict[str, Any]:
        return self._details

    def _one(self, item: Item) -> Prediction:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._connect()
            self._clients.append(client)  # list.append is atomic
        prediction: Prediction = client.predict(item.image, item.sample.expression, score_threshold=self._override)
        return prediction

    def predict(self, items: Sequence[Item]) -> list[Prediction]:
        return list(self._pool.map(self._one, items))

    def close(self) -> None:
        self._pool.shutdown()
        for client in self._clients:
            client.close()


def open_backend(spec: BackendSpec, args: argparse.Namespace) -> Backend:
    if spec.kind == "torch":
        return TorchBackend(spec, args)
    if spec.kind == "onnxruntime":
        return _open_onnxruntime(spec, args)
    if spec.kind == "triton":
        return TritonBackend(spec, args)
    return _open_tensorrt(spec, args)


def _torch_device(device: str) -> str:
    """``cuda`` under torchrun means this process's GPU, ``cuda:LOCAL_RANK``."""
    local_rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{local_rank}" if device == "cuda" and local_rank is not None else device


def backend_labels(specs: Sequence[BackendSpec]) -> list[str]:
    """``torch``, ``onnxruntime``, ...; a kind given again gets ``-2``, ``-3``: file names and table rows."""
    seen: Counter[str] = Counter()
    labels = []
    for spec in specs:
        seen[spec.kind] += 1
        labels.append(spec.kind if seen[spec.kind] == 1 else f"{spec.kind}-{seen[spec.kind]}")
    return labels


# --- accumulators ---------------------------------------------------------------------------------------


class Agreement:
    """How one backend agrees with the reference backend, streamed and mergeable: mask IoU between the two
    backends' scored masks (1 where both are empty), same no-target decision, largest per-query score gap."""

    def __init__(self) -> None:
        self.count = 0
        self.sum_iou = 0.0
        self.min_iou = 1.0
        self.same_no_target = 0
        self.max_score_diff = 0.0

    def update(self, mask: np.ndarray, prediction: Prediction, reference: tuple[Prediction, np.ndarray]) -> dict[str, Any]:
        """Accumulate one sample (``reference``: the reference backend's prediction and scored mask); return
        its per-sample record."""
        reference_prediction, reference_mask = reference
        if prediction.scores.shape != reference_prediction.scores.shape:
            raise UsageError(
                f"the backends return {prediction.scores.size} and {reference_prediction.scores.size} query scores: "
                "they do not run the same model"
            )
        intersection, union = mask_counts(mask, reference_mask)
        iou = intersection / union if union else 1.0
        same = prediction.no_target == reference_prediction.no_target
        diff = float(np.max(np.abs(prediction.scores - reference_prediction.scores), initial=0.0))
        self.count += 1
        self.sum_iou += iou
        self.min_iou = min(self.min_iou, iou)
        self.same_no_target += same
        self.max_score_diff = max(self.max_score_diff, diff)
        return {"mask_iou": iou, "same_no_target": same, "max_score_diff": diff}

    def merge(self, other: Agreement) -> Agreement:
        merged = Agreement()
        merged.count = self.count + other.count
        merged.sum_iou = self.sum_iou + other.sum_iou
        merged.min_iou = min(self.min_iou, other.min_iou)
        merged.same_no_target = self.same_no_target + other.same_no_target
        merged.max_score_diff = max(self.max_score_diff, other.max_score_diff)
        return merged

    def compute(self) -> dict[str, float | None]:
        """Mean and minimum mask IoU (0..1), same no-target decision (percent), max score difference; None
        for an empty split."""
        if not self.count:
            return {"mask_iou_mean": None, "mask_iou_min": None, "same_no_target": None, "max_score_diff": None}
        return {"mask_iou_mean": self.sum_iou / self.count, "mask_iou_min": self.min_iou,
                "same_no_target": 100.0 * self.same_no_target / self.count, "max_score_diff": self.max_score_diff}

    def to_state(self) -> dict[str, Any]:
        return {"count": self.count, "sum_iou": self.sum_iou, "min_iou": self.min_iou,
                "same_no_target": self.same_no_target, "max_score_diff": self.max_score_diff}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Agreement:
        agreement = cls()
        agreement.count, agreement.same_no_target = int(state["count"]), int(state["same_no_target"])
        agreement.sum_iou, agreement.min_iou = float(state["sum_iou"]), float(state["min_iou"])
        agreement.max_score_diff = float(state["max_score_diff"])
        return agreement


@dataclass
class BackendResult:
    """One backend's run: metrics, agreement with the reference (None for the reference) and time spent."""

    label: str
    spec: str
    details: dict[str, Any]
    score_threshold: float
    metrics: RisMetrics | GresMetrics
    agreement: Agreement | None
    seconds: float = 0.0
    sweep: dict[float, RisMetrics | GresMetrics] = dataclasses.field(default_factory=dict)  # --score-sweep

    @property
    def samples_per_s(self) -> float:
        return self.metrics.count / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label, "spec": self.spec, "details": self.details, "score_threshold": self.score_threshold,
            "samples": self.metrics.count, "seconds": self.seconds, "samples_per_s": self.samples_per_s,
            "metrics": self.metrics.compute(), "state": self.metrics.to_state(),
            "agreement": None if self.agreement is None else self.agreement.compute() | {"state": self.agreement.to_state()},
            "sweep": [{"score_threshold": t, "metrics": m.compute(), "state": m.to_state()} for t, m in self.sweep.items()],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackendResult:
        agreement = data["agreement"]
        return cls(data["label"], data["spec"], data["details"], data["score_threshold"], metrics_from_state(data["state"]),
                   None if agreement is None else Agreement.from_state(agreement["state"]), data["seconds"],
                   {p["score_threshold"]: metrics_from_state(p["state"]) for p in data.get("sweep", [])})

    def score(self, sample: Sample, gt: np.ndarray, prediction: Prediction, mask: np.ndarray,
              reference: tuple[Prediction, np.ndarray] | None,
              by_threshold: dict[float, tuple[np.ndarray, bool]]) -> dict[str, Any]:
        """Accumulate one sample (``mask``: the prediction's mask at the scoring size, as ``gt``; ``by_threshold``:
        the sweep's masks at that size and decisions); return its record."""
        score = _update(self.metrics, sample, gt, mask, prediction.no_target).to_dict()
        for threshold, metrics in self.sweep.items():
            _update(metrics, sample, gt, *by_threshold[threshold])
        record = {"key": sample.key, "index": sample.index, "image_id": sample.image_id, "expression": sample.expression,
                  "gt_no_target": sample.no_target} | score | prediction.to_json()
        if self.agreement is not None and reference is not None:
            record["vs_reference"] = self.agreement.update(mask, prediction, reference)
        return record

    def merge(self, other: BackendResult) -> BackendResult:
        agreement = None if self.agreement is None or other.agreement is None else self.agreement.merge(other.agreement)
        metrics = self.metrics.merge(other.metrics)  # type: ignore[arg-type]  # one kind per run: merge_shards checks the runs match
        seconds = self.seconds + other.seconds
        sweep = {t: m.merge(other.sweep[t]) for t, m in self.sweep.items()}  # type: ignore[arg-type]  # as metrics
        return BackendResult(self.label, self.spec, self.details, self.score_threshold, metrics, agreement, seconds, sweep)


def _update(
    metrics: RisMetrics | GresMetrics, sample: Sample, gt: np.ndarray, mask: np.ndarray, no_target: bool
) -> RisScore | GresScore:
    """One sample into ``metrics``; its per-sample score."""
    if isinstance(metrics, GresMetrics):
        return metrics.update(mask, gt, no_target, sample.no_target)
    return metrics.update(mask, gt)


# --- evaluation -----------------------------------------------------------------------------------------


def selected_samples(dataset: RefDataset, limit: int | None, shard: tuple[int, int]) -> tuple[RefDataset, int]:
    """This process's part of the split and how many of its samples to run: of the first ``limit`` samples of
    the split (all without a limit), every n-th from i (``RefDataset.shard``)."""
    index, count = shard
    part = dataset.shard(index, count)
    total = len(dataset) if limit is None else min(limit, len(dataset))
    return part, len(range(index, total, count))


def _run_chunks(
    part: RefDataset, count: int, chunk: int, backends: Sequence[Backend], results: Sequence[BackendResult],
    records: Sequence[IO[str]], eval_size: tuple[int, int] | None, bar: Any,
) -> None:
    from deris.datasets import official_gt_mask, resize_mask_nearest

    if count:  # one untimed call each: first calls pay for lazy initialisation (seconds for torch on a CPU)
        first = part[0]
        for backend in backends:
            backend.predict([Item(first, first.image_path.read_bytes())])
    for start in range(0, count, chunk):
        samples = [part[p] for p in range(start, min(start + chunk, count))]
        items = [Item(sample, sample.image_path.read_bytes()) for sample in samples]
        gts = [official_gt_mask(sample, eval_size) if eval_size else sample.gt_mask for sample in samples]
        references: list[tuple[Prediction, np.ndarray]] = []  # the first backend's, for the others to compare with
        for backend, result, handle in zip(backends, results, records):
            begin = time.perf_counter()
            predictions = backend.predict(items)
            result.seconds += time.perf_counter() - begin
            scored = []
            for k, (sample, gt, prediction) in enumerate(zip(samples, gts, predictions)):
                # Masks at the model resolution are resized (nearest) to the scoring size; original-size ones are not.
                size, resize = (gt.shape[0], gt.shape[1]), backend.resolution is not None
                mask = resize_mask_nearest(prediction.mask, size) if resize else prediction.mask
                others = {t: (resize_mask_nearest(m, size) if resize else m, no_target)
                          for t, (m, no_target) in prediction.by_threshold.items()}
                record = result.score(sample, gt, prediction, mask, references[k] if references else None, others)
                handle.write(json.dumps(record) + "\n")
                scored.append((prediction, mask))
            references = references or scored
        bar.update(len(items))
        bar.set_postfix_str(", ".join(f"{r.label} {r.samples_per_s:.1f}/s" for r in results))


def _eval_size(backends: Sequence[Backend], at_original_size: bool) -> tuple[int, int] | None:
    if at_original_size:
        return None
    sizes = {b.resolution for b in backends}
    if None in sizes:
        raise UsageError(TRITON_SIZE)
    if len(sizes) > 1:
        found = ", ".join(f"{b.spec} at {b.resolution}" for b in backends)
        raise UsageError(f"the backends run at different resolutions ({found}); compare them with --at-original-size")
    side = sizes.pop()
    assert side is not None
    return side, side


def _shard(args: argparse.Namespace) -> tuple[int, int, bool]:
    """(i, n, whether torchrun picked it): from --shard, or from torchrun's RANK and WORLD_SIZE."""
    world, rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    if world is None or rank is None or int(world) == 1:
        index, count = args.shard or (0, 1)
        return index, count, False
    if args.shard is not None:
        raise UsageError(f"--shard {args.shard[0]}/{args.shard[1]} under torchrun (WORLD_SIZE={world}): torchrun picks the shard")
    return int(rank), int(world), True


def _check_needs(args: argparse.Namespace) -> None:
    """Fail on missing flags before anything loads; fill in the defaults (no --backend: torch; torch with none of
    --preset, --checkpoint, --tokenizer: the built-in demo model, announced; its tokenizer for the demo preset)."""
    args.backend = args.backend or [backend_spec("torch")]
    kinds = {spec.kind for spec in args.backend}
    if "triton" in kinds and not args.at_original_size:
        raise UsageError(TRITON_SIZE)
    if "triton" in kinds and args.score_sweep:
        raise UsageError("--score-sweep needs each query's mask and score, and a Triton server returns only the mask it "
                         "decided at one threshold; sweep with --backend torch, onnxruntime:DIR or tensorrt:DIR")
    if args.score_sweep and not has_matplotlib():  # fail now, not after the whole split
        raise UsageError(f"--score-sweep writes {SWEEP_PLOT}, which {MATPLOTLIB}")
    if "torch" in kinds:
        if args.preset is None and args.checkpoint is None and args.tokenizer is None:
            args.preset, args.checkpoint = demo_model()
        missing = [flag for flag, value in (("--preset", args.preset), ("--checkpoint", args.checkpoint)) if value is None]
        if missing:
            raise UsageError(f"--backend torch needs {' and '.join(missing)} "
                             "(or none of --preset, --checkpoint, --tokenizer for the built-in demo model)")
        args.tokenizer = resolve_tokenizer(args.preset, args.tokenizer)
    if args.score_threshold is not None:
        check_threshold("--score-threshold", args.score_threshold)


def evaluate(
    args: argparse.Namespace, dataset: RefDataset, backends: Sequence[Backend], shard: tuple[int, int], out: Path, progress: bool
) -> dict[str, Any]:
    """Run every backend on this process's samples, write ``out`` (staged) and return its summary."""
    from tqdm import tqdm

    from deris.atomic import staged_directory

    labels = backend_labels([b.spec for b in backends])
    eval_size = _eval_size(backends, args.at_original_size)
    thresholds = {str(b.spec): b.score_threshold for b in backends}
    if len(set(thresholds.values())) > 1:
        print(f"warning: the backends use different score thresholds {thresholds}; pass --score-threshold", file=sys.stderr)
    metrics_type = GresMetrics if dataset.has_no_target else RisMetrics
    results = [
        BackendResult(label, str(b.spec), b.describe(), b.score_threshold, metrics_type(), None if k == 0 else Agreement(),
                      sweep={t: metrics_type() for t in args.score_sweep})
        for k, (label, b) in enumerate(zip(labels, backends))
    ]
    part, count = selected_samples(dataset, args.limit, shard)
    chunk = args.batch_size * math.ceil(args.concurrency / args.batch_size)  # whole batches, enough for the requests in flight
    with staged_directory(out, args.force) as staging:
        (staging / RECORDS_DIR).mkdir()
        handles = [open(staging / RECORDS_DIR / f"{label}.jsonl", "w") for label in labels]
        try:
            desc = f"eval {shard[0]}/{shard[1]}" if shard[1] > 1 else "eval"
            with tqdm(total=count, unit="sample", desc=desc, disable=not progress) as bar:
                _run_chunks(part, count, chunk, backends, results, handles, eval_size, bar)
        finally:
            for handle in handles:
                handle.close()
        run = {"dataset": dataset.dataset, "split": dataset.split, "format": dataset.format, "split_by": args.split_by,
               "protocol": "official" if eval_size else "original-size", "eval_size": list(eval_size) if eval_size else None,
               "limit": args.limit, "reference": labels[0]}
        summary = _summary(run, {"index": shard[0], "count": shard[1]}, results)
        _write_summary(staging, summary)
    return summary


def run_eval(args: argparse.Namespace) -> int:
    _check_needs(args)
    index, count, torchrun = _shard(args)
    out = args.out / f"shard-{index}-of-{count}" if count > 1 else args.out
    from deris.atomic import check_output_dir
    from deris.datasets import load_split

    check_output_dir(out, args.force)  # before any model loads
    dataset = load_split(
        args.data_root, args.dataset, args.split, args.format, split_by=args.split_by, image_root=args.image_root
    )
    backends: list[Backend] = []
    try:
        for spec in args.backend:
            backends.append(open_backend(spec, args))
        # Under torchrun one progress bar (rank 0's) stands for all.
        summary = evaluate(args, dataset, backends, (index, count), out, progress=not args.quiet and not (torchrun and index))
    finally:
        for backend in backends:
            backend.close()
    print(format_table(summary))
    plot = f", {SWEEP_PLOT}" if args.score_sweep else ""
    print(f"wrote {out}/ ({METRICS_FILE}, {TABLE_FILE}{plot}, {RECORDS_DIR}/<backend>.jsonl)")
    return EXIT_OK


def _summary(
    run: dict[str, Any], shard: dict[str, int] | None, results: Sequence[BackendResult], merged: int | None = None
) -> dict[str, Any]:
    summary: dict[str, Any] = {"deris_eval": FORMAT_VERSION, "run": run, "shard": shard}
    if merged is not None:
        summary["merged_shards"] = merged
    return summary | {"samples": results[0].metrics.count, "backends": [r.to_json() for r in results]}


def _write_summary(directory: Path, summary: dict[str, Any]) -> None:
    from deris.atomic import atomic_write

    atomic_write(directory / METRICS_FILE, (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write(directory / TABLE_FILE, (format_table(summary) + "\n").encode())
    if any(b.get("sweep") for b in summary["backends"]):
        atomic_write(directory / SWEEP_PLOT, sweep_plot(summary))


def _cell(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_table(summary: dict[str, Any]) -> str:
    """A title line and one markdown table: per backend its metrics, score threshold, throughput and agreement
    with the reference (the first backend)."""
    run, backends = summary["run"], summary["backends"]
    where = (f"scored at {run['eval_size'][1]}x{run['eval_size'][0]} against the GT nearest-resized (official protocol)"
             if run["eval_size"] else "scored at the original image sizes")
    title = f"{run['dataset']} {run['split']} ({run['format']} layout): {summary['samples']} samples, {where}"
    keys = list(backends[0]["metrics"])
    reference = run["reference"]
    header = ["backend", *keys, "score thr", "samples/s", f"mask IoU vs {reference} (mean / min)", "same no-target %",
              "max Δscore"]
    rows = []
    for b in backends:
        agreement = b["agreement"]
        if agreement is None:
            versus = ["reference", "—", "—"]
        else:
            versus = [f"{_cell(agreement['mask_iou_mean'], '.4f')} / {_cell(agreement['mask_iou_min'], '.4f')}",
                      _cell(agreement["same_no_target"], ".2f"), _cell(agreement["max_score_diff"], ".1e")]
        name = b["label"] if b["spec"] == b["label"] else f"{b['label']} ({b['spec']})"
        metrics = [f"{b['metrics'][k]:.2f}" for k in keys]
        rows.append([name, *metrics, f"{b['score_threshold']:g}", f"{b['samples_per_s']:.2f}", *versus])
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    swept = [b for b in backends if b.get("sweep")]
    if swept:
        lines += ["", "Score-threshold sweep: the same model outputs decided at each threshold (* the run's own)", "",
                  "| backend | score thr | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
        for b in swept:
            for point in b["sweep"]:
                mark = " *" if math.isclose(point["score_threshold"], b["score_threshold"]) else ""
                cells = [b["label"], f"{point['score_threshold']:g}{mark}", *(f"{point['metrics'][k]:.2f}" for k in keys)]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_plot(summary: dict[str, Any]) -> bytes:
    """The score-threshold sweep as a PNG: on gRefCOCO the N-acc / T-acc trade-off beside the first two metrics
    against the threshold, otherwise (or without no-target samples) those two metrics alone; one curve per backend."""
    run, swept = summary["run"], [b for b in summary["backends"] if b.get("sweep")]
    keys = list(swept[0]["metrics"])
    # Without no-target samples N-acc and T-acc are both 0 (official): nothing to trade.
    trade_off = "N-acc" in keys and any(p["metrics"]["N-acc"] or p["metrics"]["T-acc"] for b in swept for p in b["sweep"])
    figure = new_figure(SWEEP_PLOT, 11 if trade_off else 6, 4.5)
    axes = figure.subplots(1, 2 if trade_off else 1, squeeze=False)[0]
    against = axes[-1]
    for b, marker in zip(swept, itertools.cycle("osD^v<>")):
        thresholds = [p["score_threshold"] for p in b["sweep"]]
        for key, style in zip(keys[:2], ("-", "--")):
            against.plot(thresholds, [p["metrics"][key] for p in b["sweep"]], style, marker=marker, label=f"{key}, {b['label']}")
        if trade_off:
            t_acc, n_acc = [p["metrics"]["T-acc"] for p in b["sweep"]], [p["metrics"]["N-acc"] for p in b["sweep"]]
            line, = axes[0].plot(t_acc, n_acc, "-", marker=marker, label=b["label"])
            labels: dict[tuple[float, float], list[str]] = {}  # thresholds that decide alike share one point
            for threshold, x, y in zip(thresholds, t_acc, n_acc):
                labels.setdefault((x, y), []).append(f"{threshold:g}")
                if math.isclose(threshold, b["score_threshold"]):
                    axes[0].plot([x], [y], linestyle="none", marker="o", markersize=13, fillstyle="none",
                                 color=line.get_color(), label=f"{b['label']}: its own threshold")
            for (x, y), names in labels.items():
                axes[0].annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if trade_off:
        axes[0].set(xlabel="T-acc % (expressions with a referent kept)",
                    ylabel="N-acc % (no-target expressions recognised)", title="no-target decision: labels are score thresholds")
        axes[0].grid(alpha=0.3)
        axes[0].legend(fontsize=8)
    against.set(xlabel="score threshold", ylabel="%", title=f"{' and '.join(keys[:2])} against the score threshold")
    against.grid(alpha=0.3)
    against.legend(fontsize=8)
    figure.suptitle(f"{run['dataset']} {run['split']}, {summary['samples']} samples", fontsize=10)
    figure.tight_layout()
    return figure_png(figure, dpi=110)


# --- merging shards -------------------------------------------------------------------------------------


def _read_summary(directory: Path) -> dict[str, Any]:
    path = directory / METRICS_FILE
    try:
        summary: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} is not a `deris eval` output: {METRICS_FILE} is missing") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: not valid JSON ({error})") from None
    if summary.get("deris_eval") != FORMAT_VERSION or summary.get("shard") is None:
        raise UsageError(f"{path} is not the output of one `deris eval` shard (format {FORMAT_VERSION})")
    return summary


def _records(path: Path) -> Iterator[tuple[int, str]]:
    with open(path) as handle:
        for line in handle:
            yield json.loads(line)["index"], line


def merge_shards(directories: Sequence[Path]) -> tuple[dict[str, Any], list[BackendResult]]:
    """The shards' run description and merged results; UsageError unless they are the n shards of one run."""
    summaries = [_read_summary(d) for d in directories]
    first = summaries[0]
    count = first["shard"]["count"]

    def identity(summary: dict[str, Any]) -> Any:
        return summary["run"], [(b["label"], b["spec"], b["score_threshold"], [p["score_threshold"] for p in b.get("sweep", [])])
                                for b in summary["backends"]]

    for directory, summary in zip(directories, summaries):
        if identity(summary) != identity(first) or summary["shard"]["count"] != count:
            raise UsageError(
                f"{directory} is not a shard of the same run as {directories[0]} "
                "(dataset, split, protocol, limit, backends, score sweep and shard count must match)"
            )
    indices = sorted(s["shard"]["index"] for s in summaries)
    if indices != list(range(count)):
        raise UsageError(f"need each of the {count} shards 0..{count - 1} exactly once, got shards {indices}")
    merged = [BackendResult.from_json(b) for b in first["backends"]]
    for summary in summaries[1:]:
        merged = [m.merge(BackendResult.from_json(b)) for m, b in zip(merged, summary["backends"])]
    return first["run"], merged


def run_merge(args: argparse.Namespace) -> int:
    from deris.atomic import check_output_dir, staged_directory

    check_output_dir(args.out, args.force)
    run, results = merge_shards(args.shards)
    with staged_directory(args.out, args.force) as staging:
        (staging / RECORDS_DIR).mkdir()
        for result in results:
            with open(staging / RECORDS_DIR / f"{result.label}.jsonl", "w") as handle:
                streams = [_records(d / RECORDS_DIR / f"{result.label}.jsonl") for d in args.shards]
                handle.writelines(line for _, line in heapq.merge(*streams, key=lambda pair: pair[0]))
        summary = _summary(run, None, results, merged=len(args.shards))
        _write_summary(staging, summary)
    print(format_table(summary))
    plot = f", {SWEEP_PLOT}" if any(r.sweep for r in results) else ""
    print(f"wrote {args.out}/ ({METRICS_FILE}, {TABLE_FILE}{plot}, {RECORDS_DIR}/<backend>.jsonl) from {len(args.shards)} shards")
    return EXIT_OK


# --- commands -------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub, "eval", run=run_eval,
        help="the official metrics of one or more backends on a dataset split, and their agreement",
        description=DESCRIPTION,
        examples=EXAMPLES,
    )
    p.add_argument("--data-root", type=Path, required=True, metavar="DIR",
                   help="official layout: the seqtr_type folder (or one holding it); refer layout: the folder holding "
                   "refcoco/, refcoco+/, refcocog/, grefcoco/ and images/")
    p.add_argument("--dataset", required=True, metavar="NAME",
                   help="grefcoco (scored with the no-target aware metrics), refcoco, refcocoplus (refcoco+) or refcocog")
    p.add_argument("--split", required=True, help="e.g. val, testA, testB (refcocog: val, test)")
    p.add_argument("--format", default="official", choices=("official", "refer"),
                   help="official: DeRIS's annotation JSON; refer: the refer / gRefCOCO toolkit files (default: official)")
    p.add_argument("--split-by", metavar="SCHEME", help="split scheme: unc (default; refcocog: umd), google: refs(google).p")
    p.add_argument("--image-root", type=Path, metavar="DIR", help="the COCO train2014 images, when not in the layout's place")
    p.add_argument("--limit", type=positive_int, metavar="N", help="only the first N samples of the split")
    p.add_argument("--shard", type=shard_spec, metavar="I/N", help="only every N-th sample from I (0-based); see eval-merge")
    p.add_argument("--backend", type=backend_spec, action="append", metavar="B",
                   help=f"{ACCEPTED}; repeat to compare (the first is the reference; default torch)")
    add_preset(p, required=False, extra="; for --backend torch (an ONNX export's manifest must name the same)")
    p.add_argument("--checkpoint", type=Path, metavar="FILE",
                   help="official DeRIS checkpoint (.pth) or a deris-format file (--backend torch)")
    p.add_argument("--tokenizer", type=Path, metavar="FILE",
                   help="BEiT-3 sentencepiece model beit3.spm (every backend but triton)")
    p.add_argument("--score-threshold", type=float, metavar="T",
                   help="override every backend's score threshold (preset, export or server default), in (0, 1); "
                   "the official RefCOCO numbers used 0.7 (tools/test.py's default)")
    p.add_argument("--score-sweep", type=threshold_list, default=(), metavar="T,T,...",
                   help="also score every backend at these score thresholds from the same model outputs (e.g. "
                   f"0.5,0.6,0.7,0.8,0.9): a table, and OUT/{SWEEP_PLOT} with the N-acc / T-acc trade-off on gRefCOCO; "
                   "not for triton, whose server decides with one threshold")
    p.add_argument("--query-sa", choices=QUERY_SA_MODES, default="per_sample",
                   help="torch: per_sample (batch-invariant; = official at batch 1, the gRefCOCO runs) or official_batch "
                   "(query_SA across the images of a batch: the official RefCOCO runs, with --batch-size 16); default per_sample")
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                   help="images per forward pass: torch, onnxruntime, tensorrt (default 1)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0; cuda under torchrun is cuda:LOCAL_RANK "
                   "(default cpu)")
    p.add_argument("--concurrency", type=positive_int, default=1, metavar="N", help="triton: requests in flight (default 1)")
    p.add_argument("--at-original-size", action="store_true",
                   help="score the masks nearest-resized to the original size (as deris predict writes them) against the "
                   "original GT")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    add_force(p)
    add_quiet(p)

    m = add_command(
        sub, "eval-merge", run=run_merge,
        help="combine the shard outputs of `deris eval --shard` / torchrun into one result",
        description="Merge the n shard directories of one `deris eval` run (OUT/shard-<i>-of-<n>): the metrics and\n"
        "agreement from the accumulators' states (exactly the single-process metrics), the records in sample order.\n"
        "Throughput is the samples over the summed time of the shards' backend passes, i.e. per process.",
        examples="  deris eval-merge eval/run/shard-*-of-8 --out eval/run-merged",
    )
    m.add_argument("shards", type=Path, nargs="+", metavar="SHARD_DIR", help="the shard directories, each exactly once")
    m.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    add_force(m)
