"""The shipped demo model: its files and their sha256, its tokenizer, and that it recognises colours and shapes
on an image the scene generator did not make (a plain PIL drawing on a noisy background)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from deris.cli_support import run_main
from deris.config import get_config
from deris.demo import (
    DEMO_TOKENIZER,
    DEMO_WEIGHTS,
    DemoAssetError,
    demo_paths,
    load_demo_predictor,
    register,
    sha256_of,
    train_tokenizer,
    verify_asset,
)
from deris.predictor import Predictor
from deris.scenes import grammar_expressions, make_scene
from deris.text import TextEncoder
from deris.training.cli import _train_config, add_train


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return load_demo_predictor()


def test_shipped_files_have_their_registered_sha256_and_fit_8_mb():
    weights, tokenizer = demo_paths()
    assert sha256_of(weights) == DEMO_WEIGHTS.sha256 and sha256_of(tokenizer) == DEMO_TOKENIZER.sha256
    assert weights.stat().st_size + tokenizer.stat().st_size <= 8 * 2**20


def test_a_corrupted_or_missing_copy_is_refused_with_a_clear_error(tmp_path: Path):
    copy = tmp_path / DEMO_WEIGHTS.name
    shutil.copyfile(DEMO_WEIGHTS.path, copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(DemoAssetError, match=r"has sha256 [0-9a-f]{64}, not the registered .* corrupted"):
        verify_asset(DEMO_WEIGHTS, copy)
    with pytest.raises(DemoAssetError, match="not found"):
        verify_asset(DEMO_WEIGHTS, tmp_path / "absent.safetensors")


def test_the_tokenizer_rebuilds_byte_for_byte_and_fits_the_preset(tmp_path: Path):
    rebuilt = train_tokenizer(tmp_path / "demo.spm")
    assert sha256_of(rebuilt) == DEMO_TOKENIZER.sha256
    cfg = get_config("deris-demo")
    encoder = TextEncoder.from_spm(rebuilt, cfg.max_text_len)
    assert len(encoder.tokenizer) == cfg.beit3.vocab_size
    corpus = grammar_expressions()
    assert max(len(encoder.piece_ids(text)) for text in corpus) + 2 <= cfg.max_text_len
    assert all(3 not in encoder.piece_ids(text) for text in corpus)  # no <unk>


def test_the_grammar_corpus_holds_every_generated_expression():
    corpus = set(grammar_expressions())
    rng = np.random.default_rng(5)
    generated = {e.text for _ in range(60) for e in make_scene(rng).expressions}
    assert generated <= corpus


def test_the_float16_weights_load_as_float32(predictor: Predictor):
    assert {p.dtype for p in predictor.model.parameters()} == {next(predictor.model.parameters()).dtype}
    assert str(next(predictor.model.parameters()).dtype) == "torch.float32"


def _draw(shapes: list[tuple[str, tuple[int, int, int, int], tuple[int, int, int]]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(kind, box, RGB) shapes drawn with PIL on a noisy grey 400x300 background: the image and each
    shape's mask. Not the scene generator's renderer: PIL's own ellipses and polygons, flat colours."""
    rng = np.random.default_rng(0)
    height, width = 300, 400
    image = Image.fromarray(np.clip(rng.normal(120, 25, size=(height, width, 3)), 0, 255).astype(np.uint8))
    masks = []
    for kind, (x0, y0, x1, y1), colour in shapes:
        mask = Image.new("L", (width, height))
        for canvas, fill in ((ImageDraw.Draw(image), colour), (ImageDraw.Draw(mask), 255)):
            if kind == "circle":
                canvas.ellipse((x0, y0, x1, y1), fill=fill)
            elif kind == "square":
                canvas.rectangle((x0, y0, x1, y1), fill=fill)
            else:
                canvas.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        masks.append(np.asarray(mask) > 0)
    return np.asarray(image), masks


def _drawing() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A red circle and a blue square; (image, circle, square)."""
    image, (circle, square) = _draw([("circle", (70, 90, 180, 200), (220, 40, 40)), ("square", (240, 100, 340, 200), (40, 80, 220))])
    return image, circle, square


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_the_model_segments_a_plain_pil_drawing(predictor: Predictor):
    image, circle, square = _drawing()
    red_circle, blue_square = predictor.predict_batch([image] * 2, ["the red circle", "the blue square"])
    assert not red_circle.no_target and _iou(red_circle.mask, circle) >= 0.5
    assert not blue_square.no_target and _iou(blue_square.mask, square) >= 0.5


# The shipped model does not meet this part of the bar yet (README, "Demo model"): on this drawing
# every "the red <shape>" selects the same two queries, whose mask covers parts of all three shapes (IoU
# 0.14-0.38). Strict: a model that passes turns this into a failure, so the mark goes when it ships.
@pytest.mark.xfail(strict=True, reason="the shipped demo model does not tell shapes of one colour apart on a PIL drawing")
def test_the_model_tells_shapes_of_one_colour_apart_in_a_pil_drawing(predictor: Predictor):
    """Shapes, not only colours: a red circle, a red square and a red triangle, each asked for by name."""
    red = (220, 40, 40)
    image, masks = _draw([("circle", (30, 100, 140, 210), red), ("square", (160, 105, 260, 205), red),
                          ("triangle", (275, 95, 385, 210), red)])
    names = ("circle", "square", "triangle")
    results = predictor.predict_batch([image] * 3, [f"the red {name}" for name in names])
    for name, result, mask in zip(names, results, masks):
        others = [m for m in masks if m is not mask]
        assert not result.no_target and _iou(result.mask, mask) >= 0.5, name
        assert all(_iou(result.mask, other) < 0.2 for other in others), f"the red {name} also covers another shape"


def test_the_model_finds_no_target_for_an_absent_combination_in_a_pil_drawing(predictor: Predictor):
    image, _, _ = _drawing()
    green_triangle = predictor.predict(image, "the green triangle")
    assert green_triangle.no_target and not green_triangle.mask.any()


def test_deris_demo_writes_overlays_and_a_contact_sheet(tmp_path: Path):
    parser = argparse.ArgumentParser(prog="deris")
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "demo"
    assert run_main("deris", parser, ["demo", "--out", str(out)]) == 0
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 0 and sheet.height > 0
    assert len(list(out.glob("scene*.t*.overlay.png"))) >= 4 * 2 and len(list(out.glob("scene*.json"))) == 4
    assert run_main("deris", parser, ["demo", "--out", str(out)]) == 2  # refused without --force


def test_deris_train_exposes_from_scratch_options():
    parser = argparse.ArgumentParser()
    add_train(parser.add_subparsers(dest="command"))
    common = ["train", "--preset", "deris-demo", "--data-root", "d", "--tokenizer", "t.spm", "--out", "o", "--lr", "4e-4"]
    official = _train_config(parser.parse_args(common))
    assert (official.train_swin, official.lr_beit3, official.lr_swin, official.grad_clip) == (False, 2e-4, 4e-5, 0.15)
    scratch = _train_config(parser.parse_args([*common, "--train-swin", "--lr-swin", "3e-4", "--lr-beit3", "1e-4",
                                               "--grad-clip", "1.0"]))
    assert (scratch.train_swin, scratch.lr_beit3, scratch.lr_swin, scratch.grad_clip) == (True, 1e-4, 3e-4, 1.0)


def test_contact_sheet_captions_have_one_size_whatever_the_image_width():
    from deris.demo import CAPTION_SIZE, TILE_WIDTH, contact_sheet

    small, large = np.full((100, 200, 3), 90, np.uint8), np.full((320, 640, 3), 90, np.uint8)
    sheet = contact_sheet([[(small, "a")], [(large, "b")]])
    strip = CAPTION_SIZE + 8
    assert sheet.shape == (160 + strip + 160 + strip, TILE_WIDTH, 3)
    for top in (160, 160 + strip + 160):  # both caption strips are black and the same height
        assert (sheet[top + 1, -4:] == 0).all() and (sheet[top + strip - 1, -4:] == 0).all()
        assert (sheet[top - 1, -4:] == 90).all()


def test_eval_defaults_to_the_demo_model_on_synthetic_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`deris make-synthetic` then `deris eval` with no backend, model or tokenizer: the demo model, said so."""
    import json

    from deris.cli import main as deris_main

    data = tmp_path / "synthetic"
    assert deris_main(["make-synthetic", "--out", str(data), "--images", "24", "--seed", "5", "--quiet"]) == 0
    capsys.readouterr()
    args = ["eval", "--data-root", str(data), "--dataset", "grefcoco", "--split", "train", "--quiet"]
    assert deris_main([*args, "--out", str(tmp_path / "eval")]) == 0
    assert "built-in demo model" in capsys.readouterr().err
    backend = json.loads((tmp_path / "eval" / "metrics.json").read_text())["backends"][0]
    assert backend["spec"] == "torch" and backend["details"]["preset"] == "deris-demo"
    assert backend["details"]["checkpoint"] == DEMO_WEIGHTS.name
    assert backend["metrics"]["gIoU"] > 40  # the trained model (about 60 on held-out scenes, README)
    # A preset without its checkpoint is refused, not completed with the demo weights.
    assert deris_main([*args, "--out", str(tmp_path / "x"), "--preset", "deris-demo"]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err
