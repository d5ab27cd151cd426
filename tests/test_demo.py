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


def _drawing() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A red circle and a blue square drawn with PIL on a noisy grey background; (image, circle, square)."""
    rng = np.random.default_rng(0)
    height, width = 300, 400
    background = np.clip(rng.normal(120, 25, size=(height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    circle, square = Image.new("L", (width, height)), Image.new("L", (width, height))
    box_circle, box_square = (70, 90, 180, 200), (240, 100, 340, 200)
    for canvas, fill in ((ImageDraw.Draw(image), None), (ImageDraw.Draw(circle), 255)):
        canvas.ellipse(box_circle, fill=fill or (220, 40, 40))
    for canvas, fill in ((ImageDraw.Draw(image), None), (ImageDraw.Draw(square), 255)):
        canvas.rectangle(box_square, fill=fill or (40, 80, 220))
    return np.asarray(image), np.asarray(circle) > 0, np.asarray(square) > 0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_the_model_segments_a_plain_pil_drawing(predictor: Predictor):
    image, circle, square = _drawing()
    red_circle, blue_square = predictor.predict_batch([image] * 2, ["the red circle", "the blue square"])
    assert not red_circle.no_target and _iou(red_circle.mask, circle) >= 0.5
    assert not blue_square.no_target and _iou(blue_square.mask, square) >= 0.5


# The shipped model does not meet the quality bar yet (README, "Demo model": N-acc 46 on the
# held-out split): it picks the green-free drawing's blue square, score 0.85 > 0.8. Strict: a model that
# passes turns this into a failure, so the mark goes when the better model ships.
@pytest.mark.xfail(strict=True, reason="the shipped demo model finds a target for an absent combination (N-acc 46)")
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
    assert (official.train_swin, official.lr_beit3, official.lr_swin) == (False, 2e-4, 4e-5)
    scratch = _train_config(parser.parse_args([*common, "--train-swin", "--lr-swin", "3e-4", "--lr-beit3", "1e-4"]))
    assert (scratch.train_swin, scratch.lr_beit3, scratch.lr_swin) == (True, 1e-4, 3e-4)
