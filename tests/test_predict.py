"""Predictor and ``deris predict`` end to end on CPU (deris-tiny, random weights)."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from spm import train_sentencepiece

import deris
from deris.predictor import Predictor
from deris.text import TextEncoder


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rng = np.random.RandomState(0)
    path = tmp_path_factory.mktemp("img") / "scene.jpg"
    cv2.imwrite(str(path), (rng.rand(150, 210, 3) * 255).astype(np.uint8))
    return path


@pytest.fixture(scope="module")
def predictor(spm_path):
    torch.manual_seed(0)
    model = deris.build_model("deris-tiny")
    return Predictor(model, TextEncoder.from_spm(spm_path, model.cfg.max_text_len))


def test_prediction_matches_model_and_postprocessing(predictor, image_path):
    result = predictor.predict(image_path, "the man on the left")
    assert result.mask.shape == (150, 210) and result.mask.dtype == bool
    assert result.scores.shape == (predictor.model.cfg.num_queries,)
    assert result.selected == [i for i, s in enumerate(result.scores) if s > predictor.score_threshold]
    assert result.no_target == (not result.selected)
    assert 0.0 < result.existence_prob < 1.0


def test_batch_equals_single(predictor, image_path):
    texts = ["the man on the left", "a red cup", "nothing here at all", "the cat"]
    rgb = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
    images = [image_path, rgb[::-1].copy(), image_path, rgb]
    batch = predictor.predict_batch(images, texts)
    for image, text, together in zip(images, texts, batch):
        alone = predictor.predict(image, text)
        np.testing.assert_allclose(alone.scores, together.scores, atol=1e-5)
        assert np.array_equal(alone.mask, together.mask)


def test_threshold_controls_selection(spm_path, image_path):
    torch.manual_seed(0)
    model = deris.build_model("deris-tiny")
    encoder = TextEncoder.from_spm(spm_path, model.cfg.max_text_len)
    low = Predictor(model, encoder, score_threshold=1e-6).predict(image_path, "a cup")
    high = Predictor(model, encoder, score_threshold=1 - 1e-6).predict(image_path, "a cup")
    assert len(low.selected) == model.cfg.num_queries and not high.selected and high.no_target
    assert not high.mask.any()
    for bad in (0.0, 1.0, -0.2, 3):
        with pytest.raises(ValueError, match=r"score_threshold must be a number inside \(0, 1\)"):
            Predictor(model, encoder, score_threshold=bad)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deris.cli", *args], capture_output=True, text=True, timeout=300)


def test_predict_cli_writes_images_of_input_size(spm_path, image_path, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "predict", "--preset", "deris-tiny", "--random-weights", "--tokenizer", str(spm_path),
        "--image", str(image_path), "--text", "the man on the left", "--text", "a red cup", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stderr and "meaningless" in result.stderr
    for i in range(2):
        mask = Image.open(out / f"scene.t{i}.mask.png")
        assert mask.size == (210, 150) and set(np.unique(np.asarray(mask))) <= {0, 255}
        overlay = Image.open(out / f"scene.t{i}.overlay.png")
        assert overlay.size[0] == 210 and overlay.size[1] > 150  # caption strip below the image
    report = json.loads((out / "scene.json").read_text())
    assert [r["text"] for r in report["results"]] == ["the man on the left", "a red cup"]
    assert len(report["results"][0]["scores"]) == deris.get_config("deris-tiny").num_queries


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "pass exactly one of --checkpoint FILE or --random-weights"),
        (["--random-weights", "--image", "MISSING.jpg"], "MISSING.jpg"),
        (["--random-weights", "--text", "?!."], "no tokens after cleaning"),
        (["--random-weights", "--score-threshold", "1.5"], "score_threshold must be a number inside (0, 1)"),
        (["--random-weights", "--image", "BROKEN"], "not in a recognized image format"),
    ],
)
def test_predict_cli_bad_inputs(spm_path, image_path, tmp_path, extra, message):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    args = ["predict", "--preset", "deris-tiny", "--tokenizer", str(spm_path), "--out", str(tmp_path / "o")]
    if "--image" not in extra:
        args += ["--image", str(image_path)]
    if "--text" not in extra:
        args += ["--text", "a cup"]
    extra = [str(broken) if e == "BROKEN" else str(tmp_path / e) if e == "MISSING.jpg" else e for e in extra]
    result = run_cli(*args, *extra)
    assert result.returncode == 2
    assert message.lower() in result.stderr.lower(), result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_preset_cli():
    result = run_cli("predict", "--preset", "deris-xxl", "--tokenizer", "x", "--image", "y", "--text", "z", "--out", "o")
    assert result.returncode == 2 and "unknown preset 'deris-xxl'; accepted: deris-b-grefcoco" in result.stderr


def test_predict_cli_defaults_to_the_demo_model(tmp_path):
    """With no preset, checkpoint or tokenizer, `deris predict` runs the shipped demo model and says so in one line."""
    from PIL import ImageDraw

    image = Image.new("RGB", (200, 160), (90, 90, 90))
    ImageDraw.Draw(image).ellipse((30, 40, 100, 110), fill=(220, 30, 30))
    path = tmp_path / "shapes.png"
    image.save(path)
    result = run_cli("predict", "--image", str(path), "--text", "the red circle", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if line] == [result.stderr.strip()]
    assert "built-in demo model" in result.stderr
    report = json.loads((tmp_path / "out" / "shapes.json").read_text())
    assert len(report["results"][0]["scores"]) == deris.get_config("deris-demo").num_queries
    result = run_cli("predict", "--image", str(path), "--text", "the red circle " * 30, "--out", str(tmp_path / "long"))
    assert result.returncode == 0 and "tokens too long for deris-demo" in result.stderr  # truncated, and said so
    result = run_cli("predict", "--checkpoint", "x.pth", "--image", str(path), "--text", "a", "--out", str(tmp_path / "o2"))
    assert result.returncode == 2 and "go with --preset NAME" in result.stderr


def test_highlight_shows_a_mask_on_a_shape_of_any_colour():
    from deris.outputs import DIM, highlight

    image = np.zeros((60, 80, 3), np.uint8)
    image[...] = (230, 40, 30)  # a red scene: a red tint would not show on it
    mask = np.zeros((60, 80), bool)
    mask[20:40, 30:60] = True
    out = highlight(image, mask).astype(int)
    assert (out[30, 45] == image[30, 45]).all()  # inside: the image as it is
    assert np.allclose(out[5, 5], image[5, 5] * DIM, atol=1)  # outside: dimmed
    assert (out[20, 45] == 255).all() and (out[19, 45] == 0).all()  # the edge: white inside, black outside
    assert (out[~mask] <= 255 * DIM + 1).all()  # nothing outside the mask is as bright as the mask
    empty = highlight(image, np.zeros_like(mask)).astype(int)
    assert np.allclose(empty, image * DIM, atol=1)  # no target: all dimmed, no edge


def test_highlight_traces_the_edge_of_the_whole_mask():
    """The edge is worked out around the mask's bounding box: it equals the whole image's, border included."""
    from scipy import ndimage

    from deris.outputs import highlight

    rng = np.random.default_rng(0)
    mask = ndimage.binary_opening(rng.random((240, 320)) < 0.6, iterations=3)
    mask[:, 250:] = False
    mask[:40, :40] = True  # touches the image border
    out = highlight(np.full((240, 320, 3), 128, np.uint8), mask)
    width = 1  # min(240, 320) / 240
    inner = mask & ~ndimage.binary_erosion(mask, iterations=width)
    outer = ndimage.binary_dilation(mask, iterations=width) & ~mask
    assert ((out == 255).all(-1) == inner).all() and ((out == 0).all(-1) == outer).all()
