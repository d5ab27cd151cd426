"""Synthetic referring scenes: coloured shapes on textured backgrounds, with referring expressions, written
in the official gRefCOCO layout so that the project's loaders, ``deris eval`` and ``deris train`` read
them unchanged.

A scene holds 2-5 shapes (circle, square, triangle; red, green, blue, yellow; big, small) drawn back to
front, later shapes partly occluding earlier ones, on one of several textured, low-saturation
backgrounds. Each image gets several expressions from a small grammar:

* single targets: "the red circle", "the big triangle", "the small blue shape";
* positions: "the green square on the left", "the circle at the bottom", "the leftmost yellow shape",
  "the rightmost shape" (left/right/top/bottom between exactly two candidates, leftmost/rightmost among
  two or more; only where the positions are clearly apart);
* plural and multi-target: "all circles", "the red shapes", "both squares", "the two small shapes";
* no target (about 15%): a combination absent from the scene, preferably of attributes that are each
  present ("the green triangle" with green shapes and triangles but no green triangle).

Layout written (``<out>/data/seqtr_type``)::

    annotations/grefs/instance.json     {"train": [...], "val": [...], "testA": [...], "testB": [...]}
    annotations/grefs/train_dict.json   {"<image_id>": {"expressions": [{"raw": ...}, ...]}}  (the official NSC pool)
    images/mscoco/train2014/COCO_train2014_%012d.jpg

One entry per expression: ``image_id``, ``height``, ``width``, ``expressions`` ({"raw", "sent_id",
"ref_id"}), ``annotations`` (per referred shape: COCO ``segmentation`` polygons of its
visible part, ``bbox`` [x, y, w, h], ``area``, ``id`` >= 1, ``category_id``, ``iscrowd`` 0,
``empty`` false, ``bbox_mode`` 1; for no target the official empty template). The image is painted
from the same polygons the annotations hold, so the pixels and the decoded ground truth agree.
Images are split by image: about 80% train, 10% val, 5% testA, 5% testB. Same seed, same files.

Numpy, OpenCV and pycocotools only (no torch).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

COLOURS: dict[str, tuple[int, int, int]] = {  # RGB
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("big", "small")
SPLITS = ("train", "val", "testA", "testB")
NO_TARGET_RATE = 0.15

ANNOTATION_DIR = Path("data/seqtr_type/annotations/grefs")
IMAGE_DIR = Path("data/seqtr_type/images/mscoco/train2014")
ANNOTATION_FILE = "instance.json"  # the README's name; the official config reads instances.json
# The official loader's no-target annotation (``LoadImageAnnotationsFromFileGRES_TO.empty_annos``).
EMPTY_ANNOTATION: dict[str, Any] = {"iscrowd": None, "bbox": None, "category_id": None, "id": -1, "bbox_mode": 1, "empty": True}

_SIDE_RANGE = (256, 448)  # image sides in pixels
_RADIUS = {"big": (0.13, 0.18), "small": (0.06, 0.085)}  # of the shorter side
_MIN_VISIBLE = 0.5  # an occluded shape keeps at least half its area in view
_MIN_GAP = 0.08  # positional words need the candidates this far apart (share of the image side)


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    cx: float
    cy: float
    polygons: tuple[tuple[float, ...], ...]  # COCO polygons of the visible part
    mask: np.ndarray  # bool [H, W]: the decoded polygons
    visible_fraction: float  # of the shape's full area, after occlusion by the shapes in front

    def matches(self, colour: str | None, shape: str | None, size: str | None) -> bool:
        return (colour in (None, self.colour)) and (shape in (None, self.shape)) and (size in (None, self.size))


@dataclass(frozen=True)
class Expression:
    text: str
    targets: tuple[int, ...]  # indices into Scene.shapes; () = no target
    kind: str  # "single", "position", "plural" or "no-target"


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # RGB uint8 [H, W, 3]
    shapes: tuple[Shape, ...]
    expressions: tuple[Expression, ...]


# --- drawing ------------------------------------------------------------------------------------------


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Vertices [K, 2] (x, y) of a shape with circumradius-like size r, rotated by ``angle``."""
    if shape == "circle":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    corners = 4 if shape == "square" else 3
    # A square of half-side 0.85 r and a triangle of circumradius 1.2 r have areas close to the circle's.
    radius = r * (0.85 * math.sqrt(2) if shape == "square" else 1.2)
    t = angle + np.arange(corners) * 2 * math.pi / corners - math.pi / 2
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def _rasterize(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    if not polygons:
        return np.zeros((height, width), dtype=bool)
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return mask_utils.decode(rle).astype(bool)


def _visible_polygons(visible: np.ndarray) -> list[list[float]] | None:
    """COCO polygons of a visible region, or None if it has a hole (polygons cannot hold holes)."""
    contours, hierarchy = cv2.findContours(visible.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is not None and (hierarchy[0][:, 3] >= 0).any():
        return None
    # Contour points are pixel indices; +0.5 puts them on pixel centres in COCO's continuous coordinates.
    return [(c.reshape(-1, 2) + 0.5).ravel().tolist() for c in contours if len(c) >= 3]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A low-saturation textured background (gradient, stripes, checks or blotches, plus grain), RGB float."""
    base = rng.uniform(70, 190)
    tint = rng.uniform(-12, 12, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:
        angle = rng.uniform(0, 2 * math.pi)
        pattern = (np.cos(angle) * xx + np.sin(angle) * yy) / max(height, width)
    elif kind == 1:
        angle, period = rng.uniform(0, math.pi), rng.uniform(12, 48)
        pattern = np.sin(2 * math.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
    elif kind == 2:
        cell = int(rng.integers(16, 56))
        pattern = ((xx // cell + yy // cell) % 2) * 2.0 - 1.0
    else:
        coarse = rng.standard_normal((int(rng.integers(3, 8)), int(rng.integers(3, 8)))).astype(np.float32)
        pattern = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC) / 2
    amplitude = rng.uniform(10, 35)
    grey = base + amplitude * pattern + rng.normal(0, rng.uniform(2, 8), size=(height, width))
    return grey[:, :, None] + tint[None, None, :]


def _layout(rng: np.random.Generator, height: int, width: int) -> list[tuple[str, str, str, np.ndarray]]:
    """Draw the shapes' attributes and outlines, back to front; about 40% are placed over an earlier shape."""
    side = min(height, width)
    placed: list[tuple[str, str, str, np.ndarray]] = []
    centres: list[tuple[float, float, float]] = []
    for _ in range(int(rng.integers(2, 6))):
        colour, shape, size = (str(rng.choice(v)) for v in (list(COLOURS), SHAPES, SIZES))
        r = rng.uniform(*_RADIUS[size]) * side
        if centres and rng.random() < 0.4:
            ox, oy, other_r = centres[int(rng.integers(len(centres)))]
            direction = rng.uniform(0, 2 * math.pi)
            reach = (r + other_r) * rng.uniform(0.6, 0.95)
            cx, cy = ox + reach * math.cos(direction), oy + reach * math.sin(direction)
        else:
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        cx, cy = float(np.clip(cx, r, width - r)), float(np.clip(cy, r, height - r))
        placed.append((colour, shape, size, _outline(shape, cx, cy, r, rng.uniform(0, 2 * math.pi))))
        centres.append((cx, cy, r))
    return placed


def _render(rng: np.random.Generator) -> tuple[np.ndarray, list[Shape]] | None:
    """One image and its shapes, or None when the drawn layout hides too much of a shape."""
    height, width = (int(rng.integers(_SIDE_RANGE[0] // 32, _SIDE_RANGE[1] // 32 + 1)) * 32 for _ in range(2))
    layout = _layout(rng, height, width)
    full = [_rasterize([outline.ravel().tolist()], height, width) for *_, outline in layout]
    image = _background(rng, height, width)
    shapes: list[Shape] = []
    for i, (colour, shape, size, outline) in enumerate(layout):
        visible = full[i].copy()
        for front in full[i + 1 :]:
            visible &= ~front
        if visible.sum() < _MIN_VISIBLE * full[i].sum():
            return None
        polygons = _visible_polygons(visible)
        if not polygons:
            return None
        mask = _rasterize(polygons, height, width)
        cx, cy = (float(v) for v in outline.mean(axis=0))
        fraction = float(visible.sum() / full[i].sum())
        shapes.append(Shape(colour, shape, size, cx, cy, tuple(tuple(p) for p in polygons), mask, fraction))
    for s in shapes:  # painted from the annotated polygons, back to front
        rgb = np.array(COLOURS[s.colour], dtype=np.float32) + rng.uniform(-18, 18, size=3)
        shading = rng.uniform(-12, 12) * np.linspace(-1, 1, width, dtype=np.float32)[None, :]
        layer = rgb[None, None, :] + shading[:, :, None] + rng.normal(0, 3, size=(height, width, 1))
        image = np.where(s.mask[:, :, None], layer, image)
    return np.clip(image, 0, 255).astype(np.uint8), shapes


# --- expressions --------------------------------------------------------------------------------------

_Filter = tuple[str | None, str | None, str | None]  # (size, colour, shape)


def _phrase(f: _Filter, plural: bool = False) -> str:
    size, colour, shape = f
    noun = (shape or "shape") + ("s" if plural else "")
    return " ".join(w for w in (size, colour, noun) if w)


def _filters() -> Iterator[_Filter]:
    for size in (None, *SIZES):
        for colour in (None, *COLOURS):
            for shape in (None, *SHAPES):
                yield size, colour, shape


def _candidates(shapes: list[Shape], width: int, height: int) -> dict[str, list[Expression]]:
    out: dict[str, list[Expression]] = {"single": [], "position": [], "plural": [], "no-target": []}
    present = [{s.size for s in shapes}, {s.colour for s in shapes}, {s.shape for s in shapes}]
    for f in _filters():
        size, colour, shape = f
        hits = tuple(i for i, s in enumerate(shapes) if s.matches(colour, shape, size))
        if not hits:
            # Hard negatives: every named attribute occurs in the scene, only not together.
            if all(a is None or a in p for a, p in zip(f, present)) and sum(a is not None for a in f) >= 2:
                out["no-target"].append(Expression(f"the {_phrase(f)}", (), "no-target"))
                out["no-target"].append(Expression(f"all {_phrase(f, plural=True)}", (), "no-target"))
            continue
        if len(hits) == 1:
            if any(a is not None for a in f):
                out["single"].append(Expression(f"the {_phrase(f)}", hits, "single"))
            continue
        plural = _phrase(f, plural=True)
        out["plural"].append(Expression(f"all {plural}", hits, "plural"))
        if colour is not None or size is not None:
            out["plural"].append(Expression(f"the {plural}", hits, "plural"))
        if len(hits) == 2:
            out["plural"].append(Expression(f"both {plural}", hits, "plural"))
            out["plural"].append(Expression(f"the two {plural}", hits, "plural"))
        out["position"].extend(_positional(f, hits, shapes, width, height))
    return out


def _positional(f: _Filter, hits: tuple[int, ...], shapes: list[Shape], width: int, height: int) -> list[Expression]:
    found: list[Expression] = []
    noun = _phrase(f)
    by_x = sorted(hits, key=lambda i: shapes[i].cx)
    by_y = sorted(hits, key=lambda i: shapes[i].cy)
    gap_x = _MIN_GAP * width
    if shapes[by_x[1]].cx - shapes[by_x[0]].cx >= gap_x:
        found.append(Expression(f"the leftmost {noun}", (by_x[0],), "position"))
        if len(hits) == 2:
            found.append(Expression(f"the {noun} on the left", (by_x[0],), "position"))
    if shapes[by_x[-1]].cx - shapes[by_x[-2]].cx >= gap_x:
        found.append(Expression(f"the rightmost {noun}", (by_x[-1],), "position"))
        if len(hits) == 2:
            found.append(Expression(f"the {noun} on the right", (by_x[-1],), "position"))
    if len(hits) == 2 and shapes[by_y[1]].cy - shapes[by_y[0]].cy >= _MIN_GAP * height:
        found.append(Expression(f"the {noun} at the top", (by_y[0],), "position"))
        found.append(Expression(f"the {noun} at the bottom", (by_y[1],), "position"))
    return found


def _absent_expressions(shapes: list[Shape]) -> list[Expression]:
    """Any absent combination, for scenes where no hard negative exists."""
    found = []
    for f in _filters():
        if sum(a is not None for a in f) >= 2 and not any(s.matches(f[1], f[2], f[0]) for s in shapes):
            found.append(Expression(f"the {_phrase(f)}", (), "no-target"))
    return found


_KIND_WEIGHTS = {"single": 0.40, "position": 0.25, "plural": 0.20}


def _choose_expressions(rng: np.random.Generator, shapes: list[Shape], width: int, height: int) -> list[Expression]:
    candidates = _candidates(shapes, width, height)
    if not candidates["no-target"]:
        candidates["no-target"] = _absent_expressions(shapes)
    chosen: dict[str, Expression] = {}
    for _ in range(int(rng.integers(3, 6))):
        if rng.random() < NO_TARGET_RATE and candidates["no-target"]:
            pool = candidates["no-target"]
        else:
            kinds = [k for k in _KIND_WEIGHTS if candidates[k]]
            weights = np.array([_KIND_WEIGHTS[k] for k in kinds])
            pool = candidates[str(rng.choice(kinds, p=weights / weights.sum()))]
        fresh = [e for e in pool if e.text not in chosen]
        if fresh:
            pick = fresh[int(rng.integers(len(fresh)))]
            chosen[pick.text] = pick
    return list(chosen.values())


def make_scene(rng: np.random.Generator) -> Scene:
    """One random scene with its expressions (redrawn until the layout keeps every shape visible enough)."""
    while True:
        rendered = _render(rng)
        if rendered is None:
            continue
        image, shapes = rendered
        expressions = _choose_expressions(rng, shapes, image.shape[1], image.shape[0])
        if expressions:
            return Scene(image, tuple(shapes), tuple(expressions))


# --- the gRefCOCO-format writer -----------------------------------------------------------------------


def split_sizes(num_images: int) -> dict[str, int]:
    """Images per split: val 10%, testA and testB 5% each (at least one each), train the rest (>= 1)."""
    if num_images < len(SPLITS):
        raise ValueError(f"need at least {len(SPLITS)} images (one per split: {', '.join(SPLITS)}), got {num_images}")
    val, test = max(1, num_images // 10), max(1, num_images // 20)
    return {"train": num_images - val - 2 * test, "val": val, "testA": test, "testB": test}


def _annotation(image_id: int, index: int, shape: Shape) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(shape.mask.astype(np.uint8)))
    return {
        "id": image_id * 100 + index + 1,
        "image_id": image_id,
        "category_id": SHAPES.index(shape.shape) + 1,
        "segmentation": [list(p) for p in shape.polygons],
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": float(mask_utils.area(rle)),
        "iscrowd": 0,
        "empty": False,
        "bbox_mode": 1,
    }


def write_dataset(
    out: str | Path, num_images: int, seed: int, progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Write ``num_images`` scenes under ``out`` in the official gRefCOCO layout; returns summary counts.

    ``progress`` is called with 1 after each image. ``out`` must be a fresh directory (see
    :func:`deris.atomic.staged_directory` for writing it atomically).
    """
    sizes = split_sizes(num_images)
    rng = np.random.default_rng(seed)
    out = Path(out)
    image_dir = out / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    train_dict: dict[str, dict[str, list[dict[str, str]]]] = {}
    kinds: dict[str, int] = {}
    order = [name for name in SPLITS for _ in range(sizes[name])]
    sentence_id = 0
    for image_id, split in enumerate(order, start=1):
        scene = make_scene(rng)
        height, width = scene.image.shape[:2]
        path = image_dir / f"COCO_train2014_{image_id:012d}.jpg"
        if not cv2.imwrite(str(path), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]):
            raise OSError(f"could not write {path}")
        annotations = [_annotation(image_id, i, s) for i, s in enumerate(scene.shapes)]
        for expression in scene.expressions:
            kinds[expression.kind] = kinds.get(expression.kind, 0) + 1
            record = {"raw": expression.text, "sent_id": sentence_id, "ref_id": sentence_id}
            splits[split].append(
                {
                    "image_id": image_id,
                    "height": height,
                    "width": width,
                    "expressions": record,
                    "annotations": [annotations[i] for i in expression.targets] or [dict(EMPTY_ANNOTATION)],
                }
            )
            if split == "train":
                train_dict.setdefault(str(image_id), {"expressions": []})["expressions"].append({"raw": expression.text})
            sentence_id += 1
        if progress is not None:
            progress(1)
    annotation_dir = out / ANNOTATION_DIR
    annotation_dir.mkdir(parents=True, exist_ok=True)
    (annotation_dir / ANNOTATION_FILE).write_text(json.dumps(splits))
    (annotation_dir / "train_dict.json").write_text(json.dumps(train_dict))
    summary = {
        "images": sizes,
        "expressions": {name: len(entries) for name, entries in splits.items()},
        "kinds": kinds,
        "seed": seed,
    }
    (out / "synthetic.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# --- the grammar's language ---------------------------------------------------------------------------


def grammar_expressions() -> list[str]:
    """Every expression the generator can write (the templates of ``_candidates``, ``_positional`` and
    ``_absent_expressions`` over all attribute filters), sorted: the corpus for a grammar tokenizer."""
    texts: set[str] = set()
    for f in _filters():
        singular, plural = _phrase(f), _phrase(f, plural=True)
        texts.update({f"the {singular}", f"all {plural}", f"the {plural}", f"both {plural}", f"the two {plural}"})
        texts.update(f"the {where} {singular}" for where in ("leftmost", "rightmost"))
        texts.update(f"the {singular} {where}" for where in ("on the left", "on the right", "at the top", "at the bottom"))
    return sorted(texts)
