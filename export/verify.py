"""Parity of exported graphs with PyTorch: every graph runs in ONNX Runtime (CPU) on real inputs
and is compared with the same wrapper run in PyTorch float32.

Inputs are a synthetic image pair (one picture resized to R and to 224, through the project's
preprocessing) and random token ids framed as the tokenizer frames them. Each graph gets the
exact float32 PyTorch values of its inputs (round r gets PyTorch's round r-1 outputs), so an error
is the graph's own, not accumulated along the chain.

Tolerances per output, with s = max|reference|:

* fp32: max|err| <= 1e-4 * s + 1e-5 (float32 with a different summation order stays ~1e-6 * s).
* fp16: max|err| <= 2e-2 * s + 2e-3. Storage rounding alone is 2^-11 ~ 4.9e-4 relative per
  tensor and grows through the layers. Measured on deris-b-grefcoco with the golden weights
  (ONNX Runtime, CPU): per graph at most 3.3e-3 * s (perception), 1.6e-3 * s (cognition),
  1.9e-3 * s (decoder); the whole fp16 chain against the official float32 arrays 1.3e-2 * s on
  the mask logits, with every score decision and mask pixel unchanged. 2e-2 leaves a 6x margin
  per graph and still fails a wrong graph (a wrong op errs by O(s)). ORT runs several fp16 ops in
  float32 on CPU, so a TensorRT fp16 engine errs more: compare it against these graphs.

Also reported, as the decisions post-processing takes from these outputs: agreement of mask
signs (``mask_logits >= 0``) and of score decisions (``softmax(refer_logits)[..., 0] >
score_threshold``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

import deris.kernels as kernels
from deris.cli_support import CheckFailed
from deris.config import DerisConfig
from deris.export.graphs import build_graph
from deris.export.manifest import read_manifest
from deris.export.runtime import ort_session
from deris.modeling.deris import DeRIS
from deris.preprocess import preprocess_image
from deris.text import build_token_sequence
from deris.topology import GraphSpec, pipeline_topology, run_chain

TOLERANCES = {"fp32": (1e-4, 1e-5), "fp16": (2e-2, 2e-3)}
VERIFY_BATCHES = (1, 3)
# Token ids 0-2 are <s>, <pad>, </s>; draw ordinary pieces above them.
FIRST_PIECE_ID = 3


@dataclass(frozen=True)
class OutputCheck:
    graph: str
    batch: int
    output: str
    max_abs: float
    max_rel: float  # max|err| / max|reference|
    tolerance: float
    mask_agreement: float | None  # fraction of mask logits on the same side of 0
    score_agreement: float | None  # fraction of queries with the same score decision
    file: str = ""  # the ONNX file checked: the graph as exported or its ONNX Runtime rewrite

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.tolerance


def synthetic_image(height: int, width: int, seed: int) -> NDArray[Any]:
    """An RGB uint8 picture with smooth gradients and a few solid shapes (things to segment)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin((x + y) / 23.0)], -1) * 180.0
    for _ in range(4):
        cy, cx, r = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width, rng.uniform(0.08, 0.25) * height
        image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    picture: NDArray[Any] = np.clip(image, 0, 255).astype(np.uint8)
    return picture


def synthetic_inputs(cfg: DerisConfig, resolution: int, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs for ``batch`` image-expression pairs: img, img_mini, token_ids, text_pad_mask.

    For the demo model these are what it was trained on, so its masks mean something: synthetic
    scenes (``deris.scenes``) with one of their expressions each, tokenized by the demo tokenizer.
    For other presets: gradient pictures with solid shapes and random token ids.
    """
    from deris.demo import PRESET as DEMO_PRESET

    rng = np.random.default_rng(seed)
    pairs: list[tuple[NDArray[Any], tuple[NDArray[Any], NDArray[Any]]]] = []
    if cfg.name == DEMO_PRESET:
        from deris.demo import DEMO_TOKENIZER, verify_asset
        from deris.scenes import make_scene
        from deris.text import TextEncoder

        encoder = TextEncoder.from_spm(verify_asset(DEMO_TOKENIZER), cfg.max_text_len)
        for _ in range(batch):
            scene = make_scene(rng)
            expression = scene.expressions[int(rng.integers(len(scene.expressions)))]
            pairs.append((scene.image, encoder.encode(expression.text)))
    else:
        for b in range(batch):
            pieces = rng.integers(FIRST_PIECE_ID, cfg.beit3.vocab_size, size=int(rng.integers(1, cfg.max_text_len - 1))).tolist()
            pairs.append((synthetic_image(300 + 20 * b, 400 - 30 * b, seed + b), build_token_sequence(pieces, cfg.max_text_len)))
    prepared = [preprocess_image(image, resolution, cfg.mini_image_size) for image, _ in pairs]
    return {
        "img": torch.from_numpy(np.stack([p.img for p in prepared])),
        "img_mini": torch.from_numpy(np.stack([p.img_mini for p in prepared])),
        "token_ids": torch.from_numpy(np.stack([ids for _, (ids, _) in pairs])),
        "text_pad_mask": torch.from_numpy(np.stack([pad for _, (_, pad) in pairs])),
    }


Feeds = dict[str, torch.Tensor]


def reference_run(
    model: DeRIS, inputs: Feeds, resolution: int, graphs: Sequence[str] | None = None
) -> dict[str, tuple[Feeds, Feeds]]:
    """PyTorch float32 (inputs, outputs) of ``graphs`` (default: all), chained as a server chains
    them: each graph is fed the values its topology inputs name."""
    topology = pipeline_topology(model.cfg, resolution)
    wanted = topology.graph_names if graphs is None else tuple(graphs)
    results: dict[str, tuple[Feeds, Feeds]] = {}

    def run(spec: GraphSpec, feeds: Feeds) -> Feeds:
        outputs = dict(zip((t.name for t in spec.outputs), build_graph(spec, model)(*feeds.values())))
        if spec.name in wanted:
            results[spec.name] = (feeds, outputs)
        return outputs

    with kernels.backend("torch"), torch.inference_mode():
        run_chain(topology.needed(wanted), run, inputs)
    return results


def _as_feed(tensor: torch.Tensor, float_dtype: np.dtype[Any]) -> NDArray[Any]:
    array = tensor.numpy()
    return array.astype(float_dtype) if array.dtype.kind == "f" else array


def compare_output(
    graph: str, batch: int, name: str, produced: NDArray[Any], reference: NDArray[Any], precision: str, score_threshold: float
) -> OutputCheck:
    produced = produced.astype(np.float64)
    reference = reference.astype(np.float64)
    if produced.shape != reference.shape:
        raise RuntimeError(f"graph {graph} output {name}: shape {produced.shape}, PyTorch gives {reference.shape}")
    rel, absolute = TOLERANCES[precision]
    scale = float(np.abs(reference).max())
    max_abs = float(np.abs(produced - reference).max()) if np.isfinite(produced).all() else float("inf")
    masks = scores = None
    if name == "mask_logits":
        masks = float(np.mean((produced >= 0) == (reference >= 0)))
    if name == "refer_logits":

        def decisions(logits: NDArray[Any]) -> NDArray[Any]:
            return torch.from_numpy(logits).softmax(-1)[..., 0].numpy() > score_threshold

        scores = float(np.mean(decisions(produced) == decisions(reference)))
    return OutputCheck(graph, batch, name, max_abs, max_abs / max(scale, 1e-30), rel * scale + absolute, masks, scores)


def verify_export(
    directory: str | Path, model: DeRIS, batches: Sequence[int] = VERIFY_BATCHES, seed: int = 0
) -> list[OutputCheck]:
    """Run every graph of an export directory in ORT and compare it with ``model`` in PyTorch: each
    graph as exported and, where the export has one, its offline ONNX Runtime rewrite."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    resolution, precision = manifest["resolution"], manifest["precision"]
    float_dtype = np.dtype(np.float16 if precision == "fp16" else np.float32)
    graphs = list(manifest["graphs"])
    files = {name: [entry["file"], *([entry["optimized"]["file"]] if "optimized" in entry else [])]
             for name, entry in manifest["graphs"].items()}
    sessions = {
        file: ort_session(directory / file, manifest["graphs"][name]["custom_ops"]) for name in graphs for file in files[name]
    }
    checks = []
    for batch in batches:
        reference = reference_run(model, synthetic_inputs(model.cfg, resolution, batch, seed), resolution, graphs)
        for name in graphs:
            feeds, outputs = reference[name]
            for file in files[name]:
                produced = sessions[file].run(None, {k: _as_feed(v, float_dtype) for k, v in feeds.items()})
                for (out_name, ref), value in zip(outputs.items(), produced):
                    check = compare_output(name, batch, out_name, value, ref.numpy(), precision, model.cfg.score_threshold)
                    checks.append(dataclasses.replace(check, file=file))
    return sorted(checks, key=lambda c: (graphs.index(c.graph), files[c.graph].index(c.file), c.batch))


def require_verified(directory: str | Path, model: DeRIS, where_kept: str) -> list[OutputCheck]:
    """:func:`verify_export`, its table printed; CheckFailed (saying ``where_kept``, where the export
    can be inspected) when any output is out of tolerance."""
    checks = verify_export(directory, model)
    print(format_table(checks))
    failed = [c for c in checks if not c.passed]
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(checks)} ONNX outputs out of tolerance ({where_kept})")
    print(f"ONNX verification passed: {len(checks)} outputs within tolerance")
    return checks


def format_table(checks: Sequence[OutputCheck]) -> str:
    """A fixed-width table: one row per (graph, batch, output)."""

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    header = ("graph", "file", "batch", "output", "max abs err", "max rel err", "tolerance", "mask agree", "score agree", "result")
    rows = [header] + [
        (
            c.graph, c.file, str(c.batch), c.output, f"{c.max_abs:.2e}", f"{c.max_rel:.2e}", f"{c.tolerance:.2e}",
            pct(c.mask_agreement), pct(c.score_agreement), "PASS" if c.passed else "FAIL",
        )
        for c in checks
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
