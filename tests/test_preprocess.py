"""Image preprocessing: golden inputs of the official pipeline, decoding and input validation."""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from golden import case_params, require_case
from PIL import Image

from deris.preprocess import (
    ImageError,
    decode_image,
    load_image,
    preprocess_image,
    resize_and_normalize,
)


def _rng_bgr(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encode(image: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid 1x1 PNG whose IHDR is patched (CRC included) to claim width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    # signature (8) + chunk length (4) + b"IHDR" (4), then width, height, 5 more fields, CRC.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _sample_image_rgb(name: str) -> np.ndarray:
    try:
        return getattr(skimage.data, name)()
    except Exception as exc:  # other cases may name images that need a download
        pytest.skip(f"scikit-image sample {name!r} is not available offline: {exc}")


@pytest.mark.parametrize("npz_path", case_params())
def test_golden_inputs(npz_path: Path | None) -> None:
    npz_path = require_case(npz_path)
    golden = np.load(npz_path)
    meta = json.loads(npz_path.with_suffix(".json").read_text())
    for index, name in enumerate(meta["images"]):
        rgb = _sample_image_rgb(name)
        # The official pipeline decoded files to BGR; the same pixels as a BGR array:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        image_size = golden["in_img"].shape[-1]
        mini_size = golden["in_img_mini"].shape[-1]
        for size, key in ((image_size, "in_img"), (mini_size, "in_img_mini")):
            np.testing.assert_allclose(resize_and_normalize(bgr, size), golden[key][index], rtol=0, atol=1e-5)

        # The public entry point takes arrays as RGB.
        prepared = preprocess_image(rgb, image_size, mini_size)
        np.testing.assert_allclose(prepared.img, golden["in_img"][index], rtol=0, atol=1e-5)
        np.testing.assert_allclose(prepared.img_mini, golden["in_img_mini"][index], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(prepared.img_uint8_rgb, golden["in_img_uint8_rgb"][index])
        np.testing.assert_array_equal(prepared.img_mini_uint8_rgb, golden["in_img_mini_uint8_rgb"][index])
        assert prepared.original_size == rgb.shape[:2]


def test_prepared_image_shapes_non_square() -> None:
    prepared = preprocess_image(_rng_bgr(30, 70))
    assert prepared.original_size == (30, 70)
    assert prepared.img.shape == (3, 384, 384) and prepared.img.dtype == np.float32
    assert prepared.img_mini.shape == (3, 224, 224) and prepared.img_mini.dtype == np.float32
    assert prepared.img.flags.c_contiguous and prepared.img_mini.flags.c_contiguous
    assert prepared.img_uint8_rgb.shape == (384, 384, 3) and prepared.img_uint8_rgb.dtype == np.uint8
    assert prepared.img_mini_uint8_rgb.shape == (224, 224, 3)


def test_normalize_channel_order() -> None:
    # A pure blue BGR image: after BGR->RGB only channel 2 holds 255.
    bgr = np.zeros((4, 4, 3), np.uint8)
    bgr[..., 0] = 255
    out = resize_and_normalize(bgr, 8)
    mean = np.array([123.675, 116.28, 103.53])
    std = np.array([58.395, 57.12, 57.375])
    expected = (np.array([0, 0, 255]) - mean) / std
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=0, atol=1e-5)


def test_png_and_jpeg_round_trip() -> None:
    bgr = _rng_bgr(37, 53)
    np.testing.assert_array_equal(decode_image(_encode(bgr, ".png")), bgr)
    jpeg = _encode(bgr, ".jpg")
    decoded = decode_image(jpeg)
    np.testing.assert_array_equal(decoded, cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))
    assert decoded.shape == bgr.shape and decoded.dtype == np.uint8
    for ext in (".bmp", ".webp"):
        assert decode_image(_encode(bgr, ext)).shape == bgr.shape


def test_gray_and_rgba_files_become_bgr() -> None:
    gray = _rng_bgr(9, 11)[..., 0]
    decoded = decode_image(_encode(gray, ".png"))
    assert decoded.shape == (9, 11, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], gray)

    bgra = np.dstack([_rng_bgr(9, 11), np.full((9, 11), 7, np.uint8)])
    decoded = decode_image(_encode(bgra, ".png"))
    np.testing.assert_array_equal(decoded, bgra[..., :3])


def test_one_pixel_image_is_accepted() -> None:
    bgr = np.array([[[10, 20, 30]]], np.uint8)
    decoded = decode_image(_encode(bgr, ".png"))
    np.testing.assert_array_equal(decoded, bgr)
    prepared = preprocess_image(decoded[..., ::-1])
    assert prepared.original_size == (1, 1)
    assert np.all(prepared.img_uint8_rgb == [30, 20, 10])


def test_empty_and_corrupt_data_rejected() -> None:
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageError, match="not in a recognized image format.*JPEG, PNG"):
        decode_image(b"this is not an image at all")
    truncated = _encode(_rng_bgr(64, 64), ".png")[:100]
    with pytest.raises(ImageError, match="could not decode the PNG"):
        decode_image(truncated)
    with pytest.raises(ImageError, match="must be bytes"):
        decode_image("image.png")  # type: ignore[arg-type]


def test_unsupported_format_rejected() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "GIF")
    with pytest.raises(ImageError, match="GIF is not supported.*PNG"):
        decode_image(buf.getvalue())


def test_huge_header_refused_without_decoding() -> None:
    start = time.perf_counter()
    with pytest.raises(ImageError, match="too large"):
        decode_image(_png_claiming_size(20000, 20000))
    assert time.perf_counter() - start < 1.0


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit() -> None:
    # 120 megapixels: under PIL's own bomb limit, over ours.
    with pytest.raises(ImageError, match="12000x10000 = 120000000 pixels, the limit is 100000000"):
        decode_image(_png_claiming_size(12000, 10000))
    png = _encode(_rng_bgr(50, 40), ".png")
    with pytest.raises(ImageError, match="limit is 1999"):
        load_image(png, max_pixels=1999)
    assert decode_image(png, max_pixels=2000).shape == (50, 40, 3)


def test_load_image_from_path(tmp_path: Path) -> None:
    bgr = _rng_bgr(12, 8)
    path = tmp_path / "img.png"
    path.write_bytes(_encode(bgr, ".png"))
    np.testing.assert_array_equal(load_image(path), bgr)
    np.testing.assert_array_equal(load_image(str(path)), bgr)

    missing = tmp_path / "missing.jpg"
    with pytest.raises(ImageError, match="not found.*missing.jpg"):
        load_image(missing)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    with pytest.raises(ImageError, match="bad.jpg.*empty"):
        load_image(bad)


def test_load_image_arrays_are_rgb() -> None:
    rgb = _rng_bgr(5, 6)
    np.testing.assert_array_equal(load_image(rgb), rgb[..., ::-1])
    rgba = np.dstack([rgb, np.zeros((5, 6), np.uint8)])
    np.testing.assert_array_equal(load_image(rgba), rgb[..., ::-1])
    gray = rgb[..., 0]
    np.testing.assert_array_equal(load_image(gray), np.dstack([gray] * 3))
    # Views (non-contiguous) are fine.
    np.testing.assert_array_equal(load_image(rgb[:, ::2]), rgb[:, ::2, ::-1])


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((5, 6, 3), np.float32), "must be uint8"),
        (np.zeros((5, 6, 2), np.uint8), r"shape \(5, 6, 2\)"),
        (np.zeros((2, 5, 6, 3), np.uint8), "expected HxW"),
        (np.zeros((0, 6, 3), np.uint8), "at least 1"),
    ],
)
def test_load_image_rejects_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(array)


def test_bad_inputs_rejected() -> None:
    with pytest.raises(ImageError, match="unsupported image input of type list"):
        load_image([[1, 2, 3]])  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="BGR uint8 HxWx3"):
        resize_and_normalize(np.zeros((4, 4, 3), np.float32), 8)
    with pytest.raises(ValueError, match="positive int"):
        resize_and_normalize(np.zeros((4, 4, 3), np.uint8), 0)
