"""Synthetic referring scenes: grammar semantics, occlusion and textures, the gRefCOCO-format writer and
``deris make-synthetic``."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from deris import datasets
from deris.cli_support import run_main
from deris.scenes import (
    ANNOTATION_DIR,
    ANNOTATION_FILE,
    COLOURS,
    EMPTY_ANNOTATION,
    IMAGE_DIR,
    SHAPES,
    SIZES,
    Scene,
    make_scene,
    split_sizes,
    write_dataset,
)
from deris.training.cli import add_make_synthetic

NUM_IMAGES = 8
SEED = 3


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, NUM_IMAGES, SEED)
    return out


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(11)
    return [make_scene(rng) for _ in range(150)]


def interpret(text: str, scene: Scene) -> tuple[int, ...]:
    """An independent reading of the grammar: which shapes an expression refers to (sorted)."""
    words = text.split()
    colour = next((w for w in words if w in COLOURS), None)
    size = next((w for w in words if w in SIZES), None)
    shape = next((s for s in SHAPES for w in words if w in (s, s + "s")), None)
    hits = [i for i, s in enumerate(scene.shapes) if s.matches(colour, shape, size)]
    xs = [scene.shapes[i].cx for i in hits]
    ys = [scene.shapes[i].cy for i in hits]
    if "leftmost" in words or text.endswith("on the left"):
        return (hits[int(np.argmin(xs))],)
    if "rightmost" in words or text.endswith("on the right"):
        return (hits[int(np.argmax(xs))],)
    if text.endswith("at the top"):
        return (hits[int(np.argmin(ys))],)
    if text.endswith("at the bottom"):
        return (hits[int(np.argmax(ys))],)
    return tuple(hits)


def test_expressions_refer_to_exactly_the_shapes_they_describe(scenes):
    for scene in scenes:
        for e in scene.expressions:
            assert tuple(sorted(e.targets)) == interpret(e.text, scene), (e, [(s.colour, s.shape, s.size) for s in scene.shapes])
            words = e.text.split()
            if words[0] == "both" or words[:2] == ["the", "two"]:
                assert len(e.targets) == 2
            if words[0] == "all" and e.targets:
                assert len(e.targets) >= 2
            if e.text.endswith(("on the left", "on the right", "at the top", "at the bottom")):
                assert len(interpret(" ".join(words[:-3]), scene)) == 2  # between exactly two candidates


def test_grammar_covers_the_required_vocabulary_and_forms(scenes):
    texts = [e.text for s in scenes for e in s.expressions]
    vocabulary = Counter(w for t in texts for w in t.split())
    required = [*COLOURS, *SHAPES, *SIZES, "left", "right", "top", "bottom", "leftmost", "rightmost", "all", "both"]
    assert all(vocabulary[w] > 0 for w in required), {w: vocabulary[w] for w in required}
    assert any(t.startswith("all ") and t.endswith("circles") for t in texts)
    assert any(t.startswith("the ") and t.split()[-1] == "shapes" and t.split()[1] in COLOURS for t in texts)  # "the red shapes"
    assert any(t.startswith("both ") and t.endswith("squares") for t in texts)
    kinds = Counter(e.kind for s in scenes for e in s.expressions)
    assert 0.10 <= kinds["no-target"] / sum(kinds.values()) <= 0.20
    assert sum(len(e.targets) >= 2 for s in scenes for e in s.expressions) > 50  # multi-target


def test_no_target_expressions_name_absent_combinations(scenes):
    hard = 0
    for scene in scenes:
        present = [{s.size for s in scene.shapes}, {s.colour for s in scene.shapes}, {s.shape for s in scene.shapes}]
        for e in scene.expressions:
            if e.kind == "no-target":
                assert e.targets == () and interpret(e.text, scene) == ()
                words = set(e.text.split())
                named = [words & set(SIZES), words & set(COLOURS), words & ({*SHAPES} | {s + "s" for s in SHAPES})]
                assert sum(bool(n) for n in named) >= 2
                hard += all(not n or {w.rstrip("s") for w in n} <= p for n, p in zip(named, present))
    assert hard > 0.5 * sum(e.kind == "no-target" for s in scenes for e in s.expressions)


def test_scenes_have_occlusion_and_textured_varied_backgrounds(scenes):
    fractions = [s.visible_fraction for scene in scenes for s in scene.shapes]
    assert min(fractions) >= 0.5
    assert sum(f < 0.9 for f in fractions) > 0.1 * len(fractions)  # a good share is partly hidden
    spreads, means, sizes = [], [], set()
    for scene in scenes:
        background = ~np.any([s.mask for s in scene.shapes], axis=0)
        grey = scene.image.mean(axis=2)[background]
        spreads.append(grey.std())
        means.append(grey.mean())
        sizes.add(scene.image.shape[:2])
    assert np.median(spreads) > 5  # textured, not flat
    assert np.std(means) > 15 and len(sizes) > 10  # varied brightness and image sizes


def test_split_sizes():
    assert split_sizes(4) == {"train": 1, "val": 1, "testA": 1, "testB": 1}
    assert split_sizes(100) == {"train": 80, "val": 10, "testA": 5, "testB": 5}
    with pytest.raises(ValueError, match="at least 4"):
        split_sizes(3)


def test_written_layout_is_the_official_grefcoco_one(written):
    annotations = json.loads((written / ANNOTATION_DIR / ANNOTATION_FILE).read_text())
    assert list(annotations) == ["train", "val", "testA", "testB"]
    sizes = split_sizes(NUM_IMAGES)
    ids = {split: sorted({e["image_id"] for e in entries}) for split, entries in annotations.items()}
    assert [len(ids[s]) for s in annotations] == [sizes[s] for s in annotations]
    assert sorted(i for v in ids.values() for i in v) == list(range(1, NUM_IMAGES + 1))
    for i in range(1, NUM_IMAGES + 1):
        assert (written / IMAGE_DIR / f"COCO_train2014_{i:012d}.jpg").is_file()
    for entries in annotations.values():
        for entry in entries:
            assert set(entry) == {"image_id", "height", "width", "expressions", "annotations"}
            assert isinstance(entry["expressions"]["raw"], str)
            for ann in entry["annotations"]:
                if ann["empty"]:
                    assert ann == EMPTY_ANNOTATION
                else:
                    assert ann["id"] >= 1 and ann["iscrowd"] == 0 and len(ann["bbox"]) == 4
                    assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
    train_dict = json.loads((written / ANNOTATION_DIR / "train_dict.json").read_text())
    assert sorted(train_dict) == sorted(str(i) for i in ids["train"])
    raws = sorted(e["expressions"]["raw"] for e in annotations["train"])
    assert sorted(x["raw"] for v in train_dict.values() for x in v["expressions"]) == raws


def test_loader_reads_it_and_ground_truth_matches_the_pixels(written):
    rng = np.random.default_rng(SEED)
    regenerated = [make_scene(rng) for _ in range(NUM_IMAGES)]
    seen = 0
    for split in ("train", "val", "testA", "testB"):
        data = datasets.load_split(written, "grefcoco", split)
        assert data.has_no_target
        for sample in data:
            scene = regenerated[sample.image_id - 1]
            e = next(x for x in scene.expressions if x.text == sample.expression)
            assert sample.no_target == (not e.targets)
            union = np.zeros(scene.image.shape[:2], bool)
            for i in e.targets:
                union |= scene.shapes[i].mask
            assert np.array_equal(sample.gt_mask, union)
            image = cv2.cvtColor(cv2.imread(str(sample.image_path)), cv2.COLOR_BGR2RGB).astype(float)
            for i in e.targets:
                shape = scene.shapes[i]
                inner = cv2.erode(shape.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
                assert np.linalg.norm(image[inner].mean(axis=0) - COLOURS[shape.colour]) < 40
            seen += 1
    assert seen == sum(len(s.expressions) for s in regenerated)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_files(tmp_path):
    write_dataset(tmp_path / "a", 4, seed=5)
    write_dataset(tmp_path / "b", 4, seed=5)
    write_dataset(tmp_path / "c", 4, seed=6)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="deris")
    add_make_synthetic(parser.add_subparsers(dest="command", required=True))
    return run_main("deris", parser, list(argv))


def test_make_synthetic_cli(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert _cli("make-synthetic", "--out", str(out), "--images", "4", "--seed", "1", "--quiet") == 0
    assert "wrote" in capsys.readouterr().out
    assert len(datasets.load_split(out, "grefcoco", "train")) > 0
    assert _cli("make-synthetic", "--out", str(out), "--images", "4", "--quiet") == 2
    err = capsys.readouterr().err
    assert err.startswith("deris make-synthetic: error:") and "--force" in err
    assert _cli("make-synthetic", "--out", str(out), "--images", "4", "--seed", "2", "--force", "--quiet") == 0
    assert _cli("make-synthetic", "--out", str(tmp_path / "x"), "--images", "3", "--quiet") == 2
    assert "at least 4 images" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
