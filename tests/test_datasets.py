"""deris.datasets on small datasets written here in each layout: the official DeRIS JSON files, the
refer toolkit's refs pickle + COCO instances, and gRefCOCO's grefs JSON. Images are drawn here;
masks are polygons (integer rectangles, whose pycocotools raster is known exactly) and RLE."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from deris.datasets import (
    DatasetError,
    MaskDecodeError,
    SplitNotFoundError,
    load_split,
    official_gt_mask,
    resize_mask_nearest,
)
from deris.evaluation import GresMetrics

H, W = 24, 32  # every test image


def rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """A rectangle polygon; pycocotools rasterises it to rows y0..y1-1, columns x0..x1-1."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rect_mask(*boxes: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((H, W), bool)
    for x0, y0, x1, y1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def blob() -> np.ndarray:
    """A non-rectangular mask, stored as RLE."""
    m = np.zeros((H, W), bool)
    m[2:9, 20:30] = True
    m[5, 10:14] = True
    return m


def rle(m: np.ndarray, compressed: bool = True) -> dict:
    if compressed:
        encoded = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        return {"size": [H, W], "counts": encoded["counts"].decode()}
    flat = m.astype(np.uint8).flatten(order="F")  # uncompressed: run lengths, column-major, starting with 0s
    runs, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            runs.append(run)
            value, run = v, 1
    runs.append(run)
    return {"size": [H, W], "counts": runs}


def short_rle(compressed: bool) -> dict:
    """An RLE whose runs (3 zeros, 2 ones) stop far short of the image: pycocotools alone would return
    uninitialised pixels for the rest."""
    runs = {"size": [H, W], "counts": [3, 2]}
    return {"size": [H, W], "counts": mask_utils.frPyObjects(runs, H, W)["counts"].decode()} if compressed else runs


def draw_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def coco_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


# ------------------------------------------------------------------------------------ official layout


@pytest.fixture
def official_root(tmp_path: Path) -> Path:
    root = tmp_path / "data" / "seqtr_type"
    for image_id in (1, 2, 3, 4):
        draw_image(root / "images/mscoco/train2014" / coco_name(image_id), image_id)

    def ris_entry(image_id: int, ann_id: int, mask: object, expressions: list[str]) -> dict:
        return {
            "image_id": image_id,
            "id": ann_id,
            "expressions": expressions,
            "mask": mask,
            "bbox": [0, 0, 1, 1],
            "height": H,
            "width": W,
        }

    mixed = {
        "train": [ris_entry(4, 40, [rect(0, 0, 4, 4)], ["train only"])],
        "val_refcoco_unc": [
            ris_entry(1, 11, [rect(2, 3, 10, 8), rect(12, 12, 16, 20)], ["the two boxes"]),  # polygons, merged
            ris_entry(2, 12, rle(blob()), ["the blob", "blob on the right"]),  # RLE; two expressions
            ris_entry(3, 13, rle(blob(), compressed=False), ["uncompressed"]),
        ],
        "testA_refcoco_unc": [ris_entry(1, 11, [rect(0, 0, 32, 24)], ["everything"])],
        "testB_refcoco_unc": [
            ris_entry(1, 14, "not a mask", ["broken: a string"]),
            ris_entry(2, 15, {"size": [H, W], "counts": "@@@not-rle"}, ["broken: counts"]),
            ris_entry(2, 16, {"size": [H + 1, W], "counts": rle(blob())["counts"]}, ["broken: size"]),
            ris_entry(2, 17, [[1, 2, 3, 4, 5]], ["broken: odd polygon"]),
            ris_entry(2, 18, short_rle(compressed=True), ["broken: too short, compressed"]),
            ris_entry(2, 19, short_rle(compressed=False), ["broken: too short, uncompressed"]),
        ],
        "val_refcocog_umd": [ris_entry(3, 31, [rect(1, 1, 5, 5)], ["refcocog"])],
        "test_refcocog_umd": [ris_entry(3, 32, [rect(1, 1, 6, 6)], ["refcocog test"])],
    }
    (root / "annotations/mixed-seg").mkdir(parents=True)
    (root / "annotations/mixed-seg/instances_nogoogle_withid.json").write_text(json.dumps(mixed))

    def annotation(ann_id: int, segmentation: object) -> dict:
        return {"id": ann_id, "segmentation": segmentation, "bbox": [0, 0, 1, 1], "category_id": 1, "iscrowd": 0, "empty": False}

    empty = {"iscrowd": None, "bbox": None, "category_id": None, "id": -1, "bbox_mode": 1, "empty": True}
    grefs = {
        "val": [
            {  # multi-target: a polygon object and an RLE object
                "image_id": 1,
                "height": H,
                "width": W,
                "expressions": {"raw": "both things", "sent_id": 501, "ref_id": 51},
                "annotations": [annotation(101, [rect(0, 0, 4, 4)]), annotation(102, rle(blob()))],
            },
            {  # no target
                "image_id": 2,
                "height": H,
                "width": W,
                "expressions": {"raw": "a unicorn", "sent_id": 502, "ref_id": 52},
                "annotations": [empty],
            },
            {  # official _load_masks stops at the first annotation without a segmentation; no height/width here
                "image_id": 3,
                "expressions": {"raw": ["first", "second"], "sent_id": 503},
                "annotations": [annotation(103, [rect(5, 5, 9, 9)]), {"id": 104}, annotation(105, [rect(20, 0, 30, 4)])],
            },
        ],
        "testA": [{"image_id": 4, "height": H, "width": W, "expressions": {"raw": "x"}, "annotations": [annotation(106, 42)]}],
        "testB": [{"image_id": 4, "expressions": ["no raw key"], "annotations": []}],
    }
    (root / "annotations/grefs").mkdir(parents=True)
    (root / "annotations/grefs/instance.json").write_text(json.dumps(grefs))  # the README's spelling
    return tmp_path / "data"


def test_official_refcoco(official_root: Path) -> None:
    ds = load_split(official_root, "refcoco", "val")
    assert ds.splits == ("val", "testA", "testB")
    assert len(ds) == 4  # one sample per expression
    samples = list(ds)
    assert [s.expression for s in samples] == ["the two boxes", "the blob", "blob on the right", "uncompressed"]
    np.testing.assert_array_equal(samples[0].gt_mask, rect_mask((2, 3, 10, 8), (12, 12, 16, 20)))
    for s in samples[1:]:
        np.testing.assert_array_equal(s.gt_mask, blob())
    first = samples[0]
    assert first.gt_mask.dtype == np.bool_ and not first.no_target
    assert first.image_path == official_root / "seqtr_type/images/mscoco/train2014/COCO_train2014_000000000001.jpg"
    assert first.image_path.is_file()
    assert (first.image_id, first.ann_ids, first.sentence_id, first.ref_id) == (1, (11,), None, None)
    assert [s.key for s in samples] == [f"refcoco/val/{i}" for i in range(4)]
    assert not ds.has_no_target

    full_key = load_split(official_root / "seqtr_type", "refcoco", "val_refcoco_unc")  # the seqtr_type folder itself
    assert len(full_key) == 4
    assert load_split(official_root, "refcocog", "test").splits == ("val", "test")
    assert len(load_split(official_root, "refcocog", "val")) == 1


def test_official_grefcoco(official_root: Path) -> None:
    ds = load_split(official_root, "grefcoco", "val")
    assert ds.splits == ("val", "testA", "testB") and ds.has_no_target
    multi, none, partial, partial2 = list(ds)
    np.testing.assert_array_equal(multi.gt_mask, rect_mask((0, 0, 4, 4)) | blob())  # union of the objects
    assert (multi.no_target, multi.ann_ids, multi.sentence_id, multi.ref_id) == (False, (101, 102), 501, 51)
    assert none.no_target and none.ann_ids == () and not none.gt_mask.any() and none.gt_mask.shape == (H, W)
    # stops at annotation 104 (no segmentation): 105 is not part of the GT; size read from the image
    np.testing.assert_array_equal(partial.gt_mask, rect_mask((5, 5, 9, 9)))
    assert partial.ann_ids == (103, 104, 105) and partial.ref_id is None
    assert [partial.expression, partial2.expression] == ["first", "second"]


def test_official_errors(official_root: Path, tmp_path: Path) -> None:
    with pytest.raises(SplitNotFoundError, match=r"'testC'.*available: val, testA, testB"):
        load_split(official_root, "refcoco", "testC")
    with pytest.raises(SplitNotFoundError, match="available: val, testA, testB"):
        load_split(official_root, "grefcoco", "test")
    with pytest.raises(FileNotFoundError, match="instances_nogoogle_withid.json"):
        load_split(tmp_path / "nowhere", "refcoco", "val")
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_split(official_root, "refcoco", "val", image_root=tmp_path / "no-images")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_split(official_root, "refclef", "val")
    with pytest.raises(DatasetError, match="unknown format"):
        load_split(official_root, "refcoco", "val", format="coco")
    with pytest.raises(DatasetError, match="'raw'"):
        load_split(official_root, "grefcoco", "testB")

    broken = load_split(official_root, "refcoco", "testB")  # entries load; their masks fail on access
    messages = ["polygon list or an RLE dict", "undecodable RLE", "does not match the image size", "flat list of x, y"]
    messages += ["runs cover 5 pixels, the image has 768"] * 2
    for k, message in enumerate(messages):
        with pytest.raises(MaskDecodeError, match=message):
            broken[k]
    with pytest.raises(MaskDecodeError, match="polygon list or an RLE dict"):
        load_split(official_root, "grefcoco", "testA")[0]


# --------------------------------------------------------------------------------------- refer layout


def coco_instances(image_ids: list[int], annotations: list[dict]) -> dict:
    return {
        "images": [{"id": i, "file_name": coco_name(i), "height": H, "width": W} for i in image_ids],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}],
    }


def ann(ann_id: int, image_id: int, segmentation: object, iscrowd: int = 0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "segmentation": segmentation,
        "iscrowd": iscrowd,
        "bbox": [0, 0, 1, 1],
        "category_id": 1,
    }


def ref(ref_id: int, ann_id: object, image_id: int, split: str, sentences: list[tuple[int, str]]) -> dict:
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "split": split,
        "category_id": 1,
        "file_name": f"COCO_train2014_{image_id:012d}_{ref_id}.jpg",  # the refer toolkit's per-ref name, not the image
        "sent_ids": [s for s, _ in sentences],
        "sentences": [{"raw": raw, "sent": raw.lower(), "sent_id": s, "tokens": raw.lower().split()} for s, raw in sentences],
    }


@pytest.fixture
def refer_root(tmp_path: Path) -> Path:
    root = tmp_path / "refer"
    for image_id in (1, 2):
        draw_image(root / "images/mscoco/images/train2014" / coco_name(image_id), 10 + image_id)
    instances = coco_instances(
        [1, 2],
        [
            ann(11, 1, [rect(2, 3, 10, 8)]),
            ann(12, 2, rle(blob())),
            ann(13, 2, [rect(0, 0, 4, 4)]),
            ann(14, 2, rle(rect_mask((10, 10, 12, 12)), compressed=False), iscrowd=1),
        ],
    )
    refs = [
        ref(1, 11, 1, "val", [(100, "The Box"), (101, "box left")]),
        ref(2, 12, 2, "testA", [(102, "Blob")]),
        ref(3, 13, 2, "val", [(103, "small square")]),
        ref(4, 14, 2, "testB", [(104, "a crowd")]),
    ]
    (root / "refcoco").mkdir(parents=True)
    (root / "refcoco/instances.json").write_text(json.dumps(instances))
    (root / "refcoco/refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))

    grefs = [
        ref(10, [12, 13], 2, "val", [(200, "blob and square")]),  # multi-target
        ref(11, [-1], 1, "val", [(201, "nothing like this"), (202, "nor this")]),  # no target
        ref(12, [13, 14], 2, "val", [(203, "square and a crowd")]),  # the crowd object is skipped
        ref(13, [14], 2, "testB", [(204, "only a crowd")]),
        ref(14, 11, 1, "testA", [(205, "single id, not a list")]),
    ]
    (root / "grefcoco").mkdir(parents=True)
    (root / "grefcoco/instances.json").write_text(json.dumps(instances))
    (root / "grefcoco/grefs(unc).json").write_text(json.dumps(grefs))
    return root


def test_refer_refcoco(refer_root: Path) -> None:
    ds = load_split(refer_root, "refcoco", "val", format="refer")
    assert ds.splits == ("val", "testA", "testB")
    assert [(s.expression, s.sentence_id, s.ref_id, s.ann_ids) for s in ds] == [
        ("The Box", 100, 1, (11,)),
        ("box left", 101, 1, (11,)),
        ("small square", 103, 3, (13,)),
    ]
    first = ds[0]
    np.testing.assert_array_equal(first.gt_mask, rect_mask((2, 3, 10, 8)))
    assert first.image_path == refer_root / "images/mscoco/images/train2014" / coco_name(1)
    np.testing.assert_array_equal(load_split(refer_root, "refcoco", "testA", format="refer")[0].gt_mask, blob())
    crowd = load_split(refer_root, "refcoco", "testB", format="refer")[0]  # uncompressed RLE
    np.testing.assert_array_equal(crowd.gt_mask, rect_mask((10, 10, 12, 12)))


def test_refer_grefcoco(refer_root: Path) -> None:
    ds = load_split(refer_root, "grefcoco", "val", format="refer")
    multi, none1, none2, with_crowd = list(ds)
    np.testing.assert_array_equal(multi.gt_mask, blob() | rect_mask((0, 0, 4, 4)))
    assert (multi.no_target, multi.ann_ids, multi.ref_id, multi.sentence_id) == (False, (12, 13), 10, 200)
    for s in (none1, none2):
        assert s.no_target and s.ann_ids == () and not s.gt_mask.any() and s.gt_mask.shape == (H, W)
    np.testing.assert_array_equal(with_crowd.gt_mask, rect_mask((0, 0, 4, 4)))
    only_crowd = load_split(refer_root, "grefcoco", "testB", format="refer")[0]
    assert only_crowd.no_target  # no non-crowd object left: an empty GT, as the official loader sees it
    single = load_split(refer_root, "grefcoco", "testA", format="refer")[0]
    assert single.ann_ids == (11,) and not single.no_target

    metrics = GresMetrics()  # the loader's output feeds the metric directly
    for s in ds:
        metrics.update(s.gt_mask, s.gt_mask, s.no_target, s.no_target)
    assert metrics.compute()["gIoU"] == 100.0


def test_refer_errors(refer_root: Path, tmp_path: Path) -> None:
    with pytest.raises(SplitNotFoundError, match="available: val, testA, testB"):
        load_split(refer_root, "refcoco", "test", format="refer")
    with pytest.raises(FileNotFoundError, match=r"refs\(google\).p"):
        load_split(refer_root, "refcoco", "val", format="refer", split_by="google")
    with pytest.raises(FileNotFoundError, match=r"grefs\(unc\).json"):
        load_split(tmp_path, "grefcoco", "val", format="refer")
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_split(refer_root, "refcoco", "val", format="refer", image_root=tmp_path / "elsewhere")

    refs = pickle.loads((refer_root / "refcoco/refs(unc).p").read_bytes())
    refs.append(ref(9, 999, 1, "val", [(900, "names a missing annotation")]))
    (refer_root / "refcoco/refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(DatasetError, match=r"annotation\(s\) \[999\]"):
        load_split(refer_root, "refcoco", "val", format="refer")

    instances = json.loads((refer_root / "grefcoco/instances.json").read_text())
    instances["annotations"][0]["segmentation"] = {"size": [H, W], "counts": 17}
    (refer_root / "grefcoco/instances.json").write_text(json.dumps(instances))
    broken = load_split(refer_root, "grefcoco", "testA", format="refer")
    with pytest.raises(MaskDecodeError, match="'counts' must be"):
        broken[0]


class _Sneaky:
    """Pickles as a call to ``_leave_mark``: a loader that honoured globals would run it."""

    def __reduce__(self) -> tuple:
        return (_leave_mark, ("ran",))


MARKS: list[str] = []


def _leave_mark(value: str) -> str:
    MARKS.append(value)
    return value


def test_refs_pickle_with_a_global_is_refused(refer_root: Path) -> None:
    (refer_root / "refcoco/refs(unc).p").write_bytes(pickle.dumps([{"split": "val", "payload": _Sneaky()}], protocol=2))
    with pytest.raises(DatasetError, match="refusing to load .*_leave_mark"):
        load_split(refer_root, "refcoco", "val", format="refer")
    assert MARKS == []


# ---------------------------------------------------------------------------------- protocol helpers


def test_resize_mask_nearest_and_official_gt(official_root: Path) -> None:
    m = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]], bool)
    np.testing.assert_array_equal(resize_mask_nearest(m, (2, 2)), [[True, False], [False, True]])  # picks rows/cols 0, 2
    np.testing.assert_array_equal(resize_mask_nearest(m[:3], (6, 8)), np.repeat(np.repeat(m[:3], 2, 0), 2, 1))
    with pytest.raises(ValueError, match="2-D"):
        resize_mask_nearest(np.zeros((2, 2, 1), bool), (4, 4))

    sample = load_split(official_root, "refcoco", "testA")[0]  # the whole image
    gt = official_gt_mask(sample)
    assert gt.shape == (384, 384) and gt.dtype == np.bool_ and gt.all()
    assert official_gt_mask(sample, size=(12, 16)).shape == (12, 16)


def test_shards_partition_the_split(official_root: Path) -> None:
    ds = load_split(official_root, "refcoco", "val")
    shards = [ds.shard(i, 3) for i in range(3)]
    assert sorted(s.key for shard in shards for s in shard) == sorted(s.key for s in ds)
    assert [s.index for s in shards[1]] == [1]
    with pytest.raises(ValueError, match="0 <= index < count"):
        ds.shard(3, 3)
