"""Referring-segmentation evaluation data in the layouts users hold, one :class:`Sample` at a time.

Two layouts (``format``):

``"official"`` -- DeRIS's (README "Data Preparation"), rooted at ``data/seqtr_type``::

    annotations/mixed-seg/instances_nogoogle_withid.json   # refcoco, refcocoplus, refcocog
    annotations/grefs/instances.json                        # grefcoco (the README spells it instance.json)
    images/mscoco/train2014/COCO_train2014_%012d.jpg        # by image_id

  Each JSON maps a split name to a list of entries (``json[which_set]``, ``deris/datasets/base.py``).
  mixed-seg keys are ``<split>_<dataset>_<splitBy>`` (``val_refcoco_unc``, ``testA_refcocoplus_unc``,
  ``test_refcocog_umd``; ask for ``split="val"`` or the full key). An entry, as
  ``pipelines/loading.py::LoadImageAnnotationsFromFile_TO`` reads it: ``image_id``, ``expressions`` (list of
  raw strings), ``mask`` (polygon list or RLE), ``id`` (annotation id), ``bbox``, ``height``/``width``.
  grefs keys are ``train``/``val``/``testA``/``testB``; an entry, as ``LoadImageAnnotationsFromFileGRES_TO``
  reads it: ``image_id``, ``expressions`` (a dict whose ``raw`` is the string, or a list of them; also
  ``sent_id``/``ref_id`` when present), ``annotations`` (list of ``{"segmentation", "id", "bbox", "empty",
  ...}``). The GT is the union of the annotations' segmentations taken in order up to the first missing
  one; no segmentation at all means no target (``results["empty"]``).

``"refer"`` -- the ``refer`` toolkit's files (lichengunc/refer) and gRefCOCO's (``grefer.py``)::

    <root>/refcoco/refs(unc).p + instances.json        (also refs(google).p)
    <root>/refcoco+/refs(unc).p + instances.json
    <root>/refcocog/refs(umd).p + instances.json       (also refs(google).p)
    <root>/grefcoco/grefs(unc).json + instances.json   (or grefs(unc).p)
    <root>/images/train2014/ or <root>/images/mscoco/images/train2014/   (``image_root`` overrides)

  A ref: ``ref_id``, ``ann_id`` (an int; for gRefCOCO a list, ``[-1]`` = no target), ``image_id``,
  ``split``, ``sentences`` (``[{"raw", "sent", "sent_id", "tokens"}]``), ``category_id``, ``file_name``;
  one sample per sentence. ``instances.json`` is COCO's: ``images`` (``id``, ``file_name``, ``height``,
  ``width``), ``annotations`` (``id``, ``segmentation``, ``iscrowd``, ...). Split names match ``split``
  exactly. gRefCOCO skips crowd annotations, as ReLA's loader does when building the records the official
  JSON holds; an expression left with no object is no-target, as the official loader would see it.

Masks are decoded with pycocotools (polygons merged, RLE compressed or not); multi-target expressions give
the union of their objects. Polygons of fewer than 3 points enclose nothing and are skipped. The ``.p``
files are pickles: they are read with an unpickler that refuses every global, so a file holding anything
but lists, dicts, strings and numbers is rejected, never executed.

No torch and no model imports: numpy, pycocotools, cv2 and PIL only.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from deris.evaluation import OFFICIAL_EVAL_SIZE
from deris.preprocess import resize_mask_nearest

DATASETS = ("grefcoco", "refcoco", "refcocoplus", "refcocog")
FORMATS = ("official", "refer")
NO_TARGET_DATASETS = ("grefcoco",)  # scored with GresMetrics; the others with RisMetrics

_ALIASES = {"refcoco+": "refcocoplus"}
_DEFAULT_SPLIT_BY = {"grefcoco": "unc", "refcoco": "unc", "refcocoplus": "unc", "refcocog": "umd"}
_REFER_DIRS = {"grefcoco": "grefcoco", "refcoco": "refcoco", "refcocoplus": "refcoco+", "refcocog": "refcocog"}

_OFFICIAL_MIXED = Path("annotations/mixed-seg/instances_nogoogle_withid.json")
_OFFICIAL_GREFS = (Path("annotations/grefs/instances.json"), Path("annotations/grefs/instance.json"))
_OFFICIAL_IMAGES = Path("images/mscoco/train2014")
_REFER_IMAGES = (Path("images/train2014"), Path("images/mscoco/images/train2014"), Path("images/mscoco/train2014"))


class DatasetError(ValueError):
    """An annotation file that cannot be read as the layout it should follow."""


class SplitNotFoundError(DatasetError):
    """The requested split is not in the annotation file; the message lists the available ones."""


class MaskDecodeError(DatasetError):
    """A sample's ground-truth segmentation is neither valid polygons nor a valid RLE for its image."""


@dataclass(frozen=True, eq=False)
class Sample:
    """One expression of one split, its ground truth decoded at the original image size."""

    index: int  # position in the split (kept by :meth:`RefDataset.shard`)
    dataset: str
    split: str
    image_path: Path
    expression: str  # raw, as annotated (the model's tokenizer cleans it)
    gt_mask: np.ndarray  # bool [H, W], the original image size; all False when no_target
    no_target: bool
    image_id: int
    ann_ids: tuple[int, ...]  # the referred objects; () when no target
    sentence_id: int | None  # None where the layout stores no sentence id (official mixed-seg)
    ref_id: int | None

    @property
    def key(self) -> str:
        """A stable identifier for per-sample records: ``<dataset>/<split>/<index>``."""
        return f"{self.dataset}/{self.split}/{self.index}"


@dataclass(frozen=True)
class _Entry:
    """A sample before its mask is decoded (decoding is lazy, so a split costs only its annotations)."""

    index: int
    image_id: int
    image_path: Path
    expression: str
    segmentations: tuple[Any, ...]  # each: polygon list or RLE dict; () = no target
    size: tuple[int, int] | None  # (height, width) when the annotations state it
    ann_ids: tuple[int, ...]
    sentence_id: int | None
    ref_id: int | None
    source: str  # for error messages: the file and split (one string shared by all entries)
    record: int  # the entry's position in the file's list

    @property
    def where(self) -> str:
        return f"{self.source}[{self.record}]"


class RefDataset:
    """The samples of one split: ``len()``, indexing and iteration (masks decoded on access).

    ``splits`` lists every split the same annotation file offers for this dataset.
    """

    def __init__(self, dataset: str, split: str, format: str, splits: tuple[str, ...], entries: list[_Entry]) -> None:
        self.dataset = dataset
        self.split = split
        self.format = format
        self.splits = splits
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, position: int) -> Sample:
        return self._sample(self._entries[position])

    def __iter__(self) -> Iterator[Sample]:
        for entry in self._entries:
            yield self._sample(entry)

    def __repr__(self) -> str:
        return f"RefDataset({self.dataset!r}, split={self.split!r}, format={self.format!r}, samples={len(self)})"

    @property
    def has_no_target(self) -> bool:
        """Whether this dataset is scored with the no-target aware gRefCOCO metrics."""
        return self.dataset in NO_TARGET_DATASETS

    def shard(self, index: int, count: int) -> RefDataset:
        """Every ``count``-th sample starting at ``index`` (0 <= index < count); samples keep their index."""
        if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
            raise ValueError(f"shard needs integers 0 <= index < count, got index={index!r}, count={count!r}")
        return RefDataset(self.dataset, self.split, self.format, self.splits, self._entries[index::count])

    def _sample(self, entry: _Entry) -> Sample:
        return Sample(
            index=entry.index,
            dataset=self.dataset,
            split=self.split,
            image_path=entry.image_path,
            expression=entry.expression,
            gt_mask=_decode_mask(entry),
            no_target=not entry.segmentations,
            image_id=entry.image_id,
            ann_ids=entry.ann_ids,
            sentence_id=entry.sentence_id,
            ref_id=entry.ref_id,
        )


def load_split(
    data_root: str | Path,
    dataset: str,
    split: str,
    format: str = "official",
    *,
    split_by: str | None = None,
    image_root: str | Path | None = None,
) -> RefDataset:
    """The samples of ``split`` of ``dataset`` under ``data_root``.

    Args:
        data_root: ``format="official"``: the ``seqtr_type`` folder (or a folder holding ``seqtr_type/`` or
            ``data/seqtr_type/``); ``format="refer"``: the folder holding ``refcoco/``, ``refcoco+/``,
            ``refcocog/``, ``grefcoco/`` and ``images/``.
        dataset: one of ``grefcoco``, ``refcoco``, ``refcocoplus`` (or ``refcoco+``), ``refcocog``.
        split: e.g. ``val``, ``testA``, ``testB`` (``test`` for refcocog umd); for the official mixed-seg
            file also the full key such as ``val_refcoco_unc``.
        format: ``official`` or ``refer``.
        split_by: the split scheme, default ``unc`` (``umd`` for refcocog); ``google`` selects
            ``refs(google).p``.
        image_root: the folder holding the COCO train2014 images, when not in the layout's place.

    Raises:
        FileNotFoundError: an annotation file or the image folder is missing (the message names the paths
            looked at).
        SplitNotFoundError: ``split`` is not in the file (the message lists the available splits).
        DatasetError: an annotation file does not follow the layout, or ``dataset``/``format`` is unknown.
    """
    name = _dataset_name(dataset)
    if format not in FORMATS:
        raise DatasetError(f"unknown format {format!r}; accepted: {', '.join(FORMATS)}")
    scheme = split_by or _DEFAULT_SPLIT_BY[name]
    root = Path(data_root)
    if format == "official":
        return _load_official(root, name, split, scheme, image_root)
    return _load_refer(root, name, split, scheme, image_root)


def official_gt_mask(sample: Sample, size: tuple[int, int] = OFFICIAL_EVAL_SIZE) -> np.ndarray:
    """The GT mask as the official protocol scores it: nearest-resized to 384x384 (``size``), to be compared
    with the model's 384x384 (stretched) prediction."""
    return resize_mask_nearest(sample.gt_mask, size)


# --- the official layout ------------------------------------------------------------------------------


def _official_root(root: Path) -> Path:
    for candidate in (root, root / "seqtr_type", root / "data" / "seqtr_type"):
        if (candidate / "annotations").is_dir():
            return candidate
    return root


def _load_official(root: Path, name: str, split: str, split_by: str, image_root: str | Path | None) -> RefDataset:
    base = _official_root(root)
    if name == "grefcoco":
        path = _first_existing([base / p for p in _OFFICIAL_GREFS], "gRefCOCO annotations (official layout)")
    else:
        path = _first_existing([base / _OFFICIAL_MIXED], f"{name} annotations (official layout)")
    images = _image_dir(image_root, [base / _OFFICIAL_IMAGES])
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: should map split names to lists of entries, got {type(data).__name__}")
    if name == "grefcoco":
        splits, key = tuple(data), split
        if key not in data:
            raise _split_error(split, name, splits, path)
    else:
        suffix = f"_{name}_{split_by}"
        splits = tuple(k[: -len(suffix)] for k in data if k.endswith(suffix))
        key = split if split.endswith(suffix) else split + suffix
        if key not in data:
            raise _split_error(split, name, splits, path, keys=tuple(data))
    entries_raw = data[key]
    if not isinstance(entries_raw, list):
        raise DatasetError(f"{path}: split {key!r} should hold a list of entries, got {type(entries_raw).__name__}")
    entries: list[_Entry] = []
    source = f"{path} [{key!r}]"
    for number, raw in enumerate(entries_raw):
        where = f"{source}[{number}]"
        if not isinstance(raw, dict):
            raise DatasetError(f"{where}: an entry should be a dict, got {type(raw).__name__}")
        image_id = _int_field(raw, "image_id", where)
        image_path = images / f"COCO_train2014_{image_id:012d}.jpg"
        size = _size_of(raw, where)
        if name == "grefcoco":
            segmentations, ann_ids = _gres_targets(raw, where)
            expressions, sentence_id, ref_id = _gres_expressions(raw, where)
        else:
            if "mask" not in raw:
                raise DatasetError(f"{where}: missing 'mask'")
            segmentations = (raw["mask"],)
            ann_id = raw.get("id")
            ann_ids = (int(ann_id),) if isinstance(ann_id, int) and ann_id > 0 else ()
            expressions = _string_list(raw.get("expressions"), "expressions", where)
            sentence_id = ref_id = None
        for expression in expressions:
            entries.append(
                _Entry(
                    len(entries),
                    image_id,
                    image_path,
                    expression,
                    segmentations,
                    size,
                    ann_ids,
                    sentence_id,
                    ref_id,
                    source,
                    number,
                )
            )
    return RefDataset(name, split, "official", splits, entries)


def _gres_targets(raw: dict[str, Any], where: str) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    annotations = raw.get("annotations")
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise DatasetError(f"{where}: 'annotations' should be a list of dicts, got {annotations!r:.80}")
    segmentations = []
    for annotation in annotations:  # official _load_masks: stop at the first annotation without one
        segmentation = annotation.get("segmentation")
        if segmentation is None:
            break
        segmentations.append(segmentation)
    ids = tuple(int(a["id"]) for a in annotations if isinstance(a.get("id"), int) and a["id"] > 0)
    return tuple(segmentations), ids


def _gres_expressions(raw: dict[str, Any], where: str) -> tuple[list[str], int | None, int | None]:
    expressions = raw.get("expressions")
    if not isinstance(expressions, dict) or "raw" not in expressions:
        raise DatasetError(f"{where}: 'expressions' should be a dict with 'raw', got {expressions!r:.80}")
    texts = [expressions["raw"]] if isinstance(expressions["raw"], str) else expressions["raw"]
    sentence_id, ref_id = expressions.get("sent_id"), expressions.get("ref_id")
    return (
        _string_list(texts, "expressions.raw", where),
        sentence_id if isinstance(sentence_id, int) else None,
        ref_id if isinstance(ref_id, int) else None,
    )


# --- the refer / gRefCOCO toolkit layout --------------------------------------------------------------


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Reads only builtin containers and scalars: any class or function reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: refs files hold only lists, dicts, strings and numbers")


def _read_pickle(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            return _NoGlobalsUnpickler(handle, encoding="utf-8").load()
    except pickle.UnpicklingError as error:
        raise DatasetError(f"{path}: {error}") from error
    except (EOFError, ValueError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not a readable refs pickle ({error})") from error


def _load_refer(root: Path, name: str, split: str, split_by: str, image_root: str | Path | None) -> RefDataset:
    folder = root / _REFER_DIRS[name]
    if name == "grefcoco":
        refs_path = _first_existing([folder / f"grefs({split_by}).json", folder / f"grefs({split_by}).p"], "gRefCOCO refs")
    else:
        refs_path = _first_existing([folder / f"refs({split_by}).p"], f"{name} refs")
    instances_path = _first_existing([folder / "instances.json"], f"{name} COCO instances")
    images = _image_dir(image_root, [root / p for p in _REFER_IMAGES])
    refs = _read_json(refs_path) if refs_path.suffix == ".json" else _read_pickle(refs_path)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise DatasetError(f"{refs_path}: should hold a list of refs (dicts)")
    splits = tuple(dict.fromkeys(str(r.get("split")) for r in refs))
    if split not in splits:
        raise _split_error(split, name, splits, refs_path)
    instances = _read_json(instances_path)
    try:
        image_records = {int(i["id"]): i for i in instances["images"]}
        annotations = {int(a["id"]): a for a in instances["annotations"]}
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetError(f"{instances_path}: not a COCO instances file (needs images and annotations with ids)") from error

    entries: list[_Entry] = []
    source = f"{refs_path} refs"
    for number, ref in enumerate(refs):
        if ref.get("split") != split:
            continue
        where = f"{source}[{number}]"
        image_id = _int_field(ref, "image_id", where)
        image = image_records.get(image_id)
        if image is None or "file_name" not in image:
            raise DatasetError(f"{where}: image {image_id} is not in {instances_path}")
        ann_field = ref.get("ann_id")
        listed = ann_field if isinstance(ann_field, list) else [ann_field]
        if not listed or not all(isinstance(a, int) for a in listed):
            raise DatasetError(f"{where}: 'ann_id' should be an int or a list of ints, got {ann_field!r}")
        ann_ids = tuple(a for a in listed if a != -1)
        missing = [a for a in ann_ids if a not in annotations]
        if missing:
            raise DatasetError(f"{where}: annotation(s) {missing} not in {instances_path}")
        targets = [annotations[a] for a in ann_ids]
        if name == "grefcoco":
            targets = [a for a in targets if not a.get("iscrowd")]
        segmentations = tuple(a.get("segmentation") for a in targets)
        size = _size_of(image, f"{instances_path} [image {image_id}]")
        image_path = images / str(image["file_name"])
        sentences = ref.get("sentences")
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
            raise DatasetError(f"{where}: 'sentences' should be a list of dicts with a 'raw' string")
        ref_id = ref.get("ref_id") if isinstance(ref.get("ref_id"), int) else None
        for sentence in sentences:
            sent_id = sentence.get("sent_id")
            entries.append(
                _Entry(
                    len(entries),
                    image_id,
                    image_path,
                    sentence["raw"],
                    segmentations,
                    size,
                    ann_ids,
                    sent_id if isinstance(sent_id, int) else None,
                    ref_id,
                    source,
                    number,
                )
            )
    return RefDataset(name, split, "refer", splits, entries)


# --- shared helpers -------------------------------------------------------------------------------------


def _dataset_name(dataset: str) -> str:
    name = _ALIASES.get(dataset, dataset)
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; accepted: {', '.join(DATASETS)} (refcoco+ = refcocoplus)")
    return name


def _first_existing(paths: list[Path], what: str) -> Path:
    for path in paths:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{what} not found; looked for: {', '.join(str(p) for p in paths)}")


def _image_dir(image_root: str | Path | None, candidates: list[Path]) -> Path:
    if image_root is not None:
        candidates = [Path(image_root)]
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(
        f"image folder not found; looked for: {', '.join(str(p) for p in candidates)} (pass image_root= to point elsewhere)"
    )


def _read_json(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error


def _split_error(split: str, name: str, splits: tuple[str, ...], path: Path, keys: tuple[str, ...] = ()) -> SplitNotFoundError:
    message = f"split {split!r} is not in {path} for {name}; available: {', '.join(splits) or '(none)'}"
    if keys:
        message += f" (the file's keys: {', '.join(keys)})"
    return SplitNotFoundError(message)


def _int_field(record: dict[str, Any], key: str, where: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DatasetError(f"{where}: {key!r} should be an integer, got {value!r}")
    return value


def _string_list(value: Any, key: str, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise DatasetError(f"{where}: {key!r} should be a non-empty list of strings, got {value!r:.80}")
    return value


def _size_of(record: dict[str, Any], where: str) -> tuple[int, int] | None:
    height, width = record.get("height"), record.get("width")
    if height is None and width is None:
        return None
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise DatasetError(f"{where}: 'height' and 'width' should be positive integers, got {height!r}, {width!r}")
    return height, width


def _mask_size(entry: _Entry) -> tuple[int, int]:
    if entry.size is not None:
        return entry.size
    for segmentation in entry.segmentations:
        if isinstance(segmentation, dict) and isinstance(segmentation.get("size"), list) and len(segmentation["size"]) == 2:
            return int(segmentation["size"][0]), int(segmentation["size"][1])
    if not entry.image_path.is_file():
        raise FileNotFoundError(f"{entry.where}: the annotation states no image size and the image {entry.image_path} is missing")
    with Image.open(entry.image_path) as image:
        width, height = image.size
    return height, width


def _decode_mask(entry: _Entry) -> np.ndarray:
    height, width = _mask_size(entry)
    mask = np.zeros((height, width), dtype=bool)
    for segmentation in entry.segmentations:
        mask |= _decode_segmentation(segmentation, height, width, entry.where)
    return mask


def _decode_segmentation(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """One object's polygons or RLE -> bool [height, width]."""
    if isinstance(segmentation, list):
        polygons = []
        for polygon in segmentation:
            if (
                not isinstance(polygon, list)
                or len(polygon) % 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon)
            ):
                raise MaskDecodeError(f"{where}: a polygon must be a flat list of x, y numbers, got {polygon!r:.80}")
            if len(polygon) >= 6:  # fewer than 3 points enclose no area
                polygons.append([float(v) for v in polygon])
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
            raise MaskDecodeError(f"{where}: RLE size {size!r} does not match the image size [{height}, {width}]")
        if isinstance(counts, list):  # uncompressed RLE
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
                raise MaskDecodeError(f"{where}: uncompressed RLE counts must be integers")
            _check_runs(counts, height, width, where)
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        elif isinstance(counts, (str, bytes)):
            compressed = counts.encode() if isinstance(counts, str) else counts
            _check_runs(_compressed_runs(compressed, where), height, width, where)
            rle = {"size": [height, width], "counts": compressed}
        else:
            raise MaskDecodeError(f"{where}: RLE 'counts' must be a string or a list of ints, got {type(counts).__name__}")
    else:
        raise MaskDecodeError(f"{where}: a segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


def _check_runs(runs: list[int], height: int, width: int, where: str) -> None:
    """pycocotools leaves the pixels after a too-short RLE uninitialised: the runs must tile the image."""
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise MaskDecodeError(f"{where}: undecodable RLE, its runs cover {sum(runs)} pixels, the image has {height * width}")


def _compressed_runs(counts: bytes, where: str) -> list[int]:
    """The run lengths a COCO compressed RLE string encodes.

    Each number is a little-endian series of 5-bit groups, one character each (offset by ``'0'``), with
    0x20 marking "more groups follow" and 0x10 in the last group the sign; from the third number on, each
    is stored as the difference to the number two places before.
    """
    runs: list[int] = []
    value = shift = 0
    for byte in counts:
        group = byte - 48
        if not 0 <= group < 64:
            raise MaskDecodeError(f"{where}: undecodable RLE, character {chr(byte)!r} is outside the COCO RLE alphabet")
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            continue
        if group & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value = shift = 0
    if shift:
        raise MaskDecodeError(f"{where}: undecodable RLE, the counts end inside a number")
    return runs
