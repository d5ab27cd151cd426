"""Image input path: decode, resize and normalize exactly as the official DeRIS pipeline.

The official pipeline (docs/model.md, "Inputs") is ``mmcv.imfrombytes(flag="color")`` (BGR uint8),
``HierResize(keep_ratio=False)`` (``mmcv.imresize``: cv2 ``INTER_LINEAR`` on uint8, aspect ratio not kept),
then mmdet ``Normalize`` (``mmcv.imnormalize``: BGR->RGB, subtract the mean, multiply by 1/std, float32)
and ``DefaultFormatBundle`` (HWC->CHW). Both the 384x384 perception copy and the 224x224 cognition copy
are made from the original image.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# Refuse larger images before decoding them: a few bytes of header can claim gigapixels.
MAX_IMAGE_PIXELS = 100_000_000

# PIL header formats (``Image.format``) whose files cv2.imdecode also decodes. PIL reads the header
# for the size check, cv2 decodes the pixels (as the official code does), so a format must be known
# to both. MPO is how PIL names multi-picture JPEGs from cameras; cv2 reads their first picture.
_ACCEPTED_FORMATS = {
    "JPEG": "JPEG",
    "MPO": "JPEG",
    "PNG": "PNG",
    "BMP": "BMP",
    "WEBP": "WebP",
    "TIFF": "TIFF",
    "JPEG2000": "JPEG 2000",
    "PPM": "PBM/PGM/PPM",
    "SUN": "Sun raster",
}
ACCEPTED_FORMATS_TEXT = ", ".join(dict.fromkeys(_ACCEPTED_FORMATS.values()))

# mmdet Normalize config of every DeRIS model (RGB order, ImageNet statistics). mmdet stores them
# as float32 arrays; mmcv.imnormalize then promotes them to float64 (see _normalize).
MEAN_RGB = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD_RGB = np.array([58.395, 57.12, 57.375], dtype=np.float32)

IMAGE_SIZE = 384  # perception branch (Swin), HierResize img_scale
MINI_IMAGE_SIZE = 224  # cognition branch (BEiT-3), HierResize mini_img_scale; BEiT-3 asserts 224


class ImageError(ValueError):
    """An image input that cannot be used; the message says what was wrong and what is accepted."""


@dataclass(frozen=True)
class PreparedImage:
    """Model-ready tensors for one image.

    ``img`` [3,S,S] and ``img_mini`` [3,224,224] are normalized float32 RGB CHW; ``original_size`` is
    (h0, w0) of the decoded image; ``img_uint8_rgb`` [S,S,3] and ``img_mini_uint8_rgb`` [224,224,3]
    are the resized uint8 RGB images before normalization (for visualisation and debugging).
    """

    img: np.ndarray
    img_mini: np.ndarray
    original_size: tuple[int, int]
    img_uint8_rgb: np.ndarray
    img_mini_uint8_rgb: np.ndarray


def decode_image(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to BGR uint8 HxWx3, as ``mmcv.imfrombytes(flag="color")``.

    That is ``cv2.imdecode(..., cv2.IMREAD_COLOR)``: gray and palette images become 3-channel BGR,
    alpha is dropped, 16-bit images are scaled to 8 bits and EXIF orientation is applied.
    The size is read from the header first (PIL, without decoding the pixels); images with more than
    ``max_pixels`` pixels are refused. PIL's own decompression-bomb guard (2 x
    ``PIL.Image.MAX_IMAGE_PIXELS``, about 179 megapixels by default) also applies.

    Raises ImageError for empty, unrecognized, unsupported, corrupt or too large data.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError(f"image data is empty (0 bytes); expected an encoded image ({ACCEPTED_FORMATS_TEXT})")
    try:
        with Image.open(io.BytesIO(data)) as header:
            fmt, (width, height) = header.format, header.size
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image is too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"image data ({len(data)} bytes) is not in a recognized image format; "
            f"accepted formats: {ACCEPTED_FORMATS_TEXT}"
        ) from exc
    except Exception as exc:  # a damaged header makes PIL raise OSError, SyntaxError, struct.error...
        raise ImageError(
            f"image header is corrupt ({type(exc).__name__}: {exc}); accepted formats: {ACCEPTED_FORMATS_TEXT}"
        ) from exc
    if fmt not in _ACCEPTED_FORMATS:
        raise ImageError(f"image format {fmt} is not supported; accepted formats: {ACCEPTED_FORMATS_TEXT}")
    if width * height > max_pixels:
        raise ImageError(
            f"image is too large: {width}x{height} = {width * height} pixels, the limit is {max_pixels} pixels"
        )
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError(
            f"could not decode the {fmt} image ({width}x{height}, {len(data)} bytes): the data is corrupt "
            f"or uses a variant OpenCV cannot read; accepted formats: {ACCEPTED_FORMATS_TEXT}"
        )
    return bgr


def load_image(image: str | os.PathLike[str] | bytes | np.ndarray, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Load an image as BGR uint8 HxWx3 (the official pipeline's decoded form).

    ``image`` may be:
    * a path (str or Path) to an encoded image file, decoded by ``decode_image``;
    * encoded image bytes, decoded by ``decode_image``;
    * a numpy uint8 array in **RGB** order (as PIL, skimage and most Python libraries give it):
      HxWx3 RGB, HxWx4 RGBA (alpha dropped, as cv2's IMREAD_COLOR does for files) or HxW gray.
      It is converted to BGR here.

    Raises ImageError for a missing/unreadable file, bad bytes or an unsupported array.
    """
    if isinstance(image, np.ndarray):
        return _array_to_bgr(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(image, max_pixels=max_pixels)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise ImageError(f"image file not found: {path}") from exc
        except OSError as exc:
            raise ImageError(f"cannot read image file {path}: {exc}") from exc
        try:
            return decode_image(data, max_pixels=max_pixels)
        except ImageError as exc:
            raise ImageError(f"{path}: {exc}") from exc
    raise ImageError(
        f"unsupported image input of type {type(image).__name__}; "
        "expected a file path, encoded image bytes or a uint8 RGB/RGBA/gray numpy array"
    )


def _array_to_bgr(array: np.ndarray) -> np.ndarray:
    """Convert a caller's RGB / RGBA / gray uint8 array to BGR uint8 HxWx3."""
    if array.dtype != np.uint8:
        raise ImageError(f"image array must be uint8, got {array.dtype}; scale and convert it to uint8 (0..255) first")
    if array.ndim == 2:
        conversion = cv2.COLOR_GRAY2BGR
    elif array.ndim == 3 and array.shape[2] == 3:
        conversion = cv2.COLOR_RGB2BGR
    elif array.ndim == 3 and array.shape[2] == 4:
        conversion = cv2.COLOR_RGBA2BGR
    else:
        raise ImageError(f"image array has shape {array.shape}; expected HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"image array has shape {array.shape}; height and width must be at least 1")
    return cv2.cvtColor(np.ascontiguousarray(array), conversion)


def _check_bgr(bgr: np.ndarray) -> None:
    if not isinstance(bgr, np.ndarray) or bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] != 3:
        desc = f"{bgr.dtype} array of shape {bgr.shape}" if isinstance(bgr, np.ndarray) else type(bgr).__name__
        raise ImageError(f"expected a BGR uint8 HxWx3 array (see load_image), got {desc}")
    if bgr.shape[0] == 0 or bgr.shape[1] == 0:
        raise ImageError(f"image has shape {bgr.shape}; height and width must be at least 1")


def _resize(bgr: np.ndarray, size: int) -> np.ndarray:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"resize target must be a positive int, got {size!r}")
    # mmcv.imresize on the cv2 backend: bilinear without antialiasing, on uint8, aspect ratio not kept.
    return cv2.resize(bgr, (size, size), interpolation=cv2.INTER_LINEAR)


def _normalize(bgr: np.ndarray) -> np.ndarray:
    """mmcv.imnormalize(to_rgb=True) followed by HWC->CHW.

    The same cv2 calls with the same float64 mean and 1/std (promoted from the float32 config values)
    make the result bit-identical to mmcv's; a plain float32 numpy multiply by 1/std would differ in
    the last bit.
    """
    img = bgr.astype(np.float32)
    mean = MEAN_RGB.reshape(1, -1).astype(np.float64)
    stdinv = 1 / STD_RGB.reshape(1, -1).astype(np.float64)
    cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
    cv2.subtract(img, mean, img)
    cv2.multiply(img, stdinv, img)
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def resize_and_normalize(bgr: np.ndarray, size: int) -> np.ndarray:
    """Resize a BGR uint8 HxWx3 image to size x size and normalize it: float32 RGB CHW [3,size,size]."""
    _check_bgr(bgr)
    return _normalize(_resize(bgr, size))


def preprocess_image(
    image: str | os.PathLike[str] | bytes | np.ndarray,
    image_size: int = IMAGE_SIZE,
    mini_size: int = MINI_IMAGE_SIZE,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> PreparedImage:
    """Prepare one image for the model: both resized, normalized copies plus the original size.

    ``image`` is anything ``load_image`` accepts (numpy arrays are RGB). Both copies are resized from
    the original image, as ``HierResize`` does.
    """
    bgr = load_image(image, max_pixels=max_pixels)
    resized = _resize(bgr, image_size)
    resized_mini = _resize(bgr, mini_size)
    return PreparedImage(
        img=_normalize(resized),
        img_mini=_normalize(resized_mini),
        original_size=(bgr.shape[0], bgr.shape[1]),
        img_uint8_rgb=cv2.cvtColor(resized, cv2.COLOR_BGR2RGB),
        img_mini_uint8_rgb=cv2.cvtColor(resized_mini, cv2.COLOR_BGR2RGB),
    )


def resize_mask_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` (bool [H, W]) nearest-resized to ``size`` = (height, width), as the official evaluation resizes
    the GT and the official demo its masks (mmdet ``BitmapMasks.resize`` -> ``mmcv.imresize(..., interpolation="nearest")`` -> cv2
    ``INTER_NEAREST``)."""
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"mask must be 2-D (height, width), got shape {array.shape}")
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive (height, width), got {size!r}")
    resized = cv2.resize(array.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    return resized.astype(bool)
