"""Result files shared by ``deris predict`` and ``deris client``: mask PNG, overlay PNG, scores JSON; and the
plots other commands write (matplotlib figures built outside pyplot, so no global state or GUI backend).

Every file is written to a temporary name in the target directory and renamed into place, so a
reader never sees a half-written file.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deris.atomic import OutputError, atomic_write
from deris.prediction import Prediction

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# What lies outside the mask keeps this share of its brightness; the mask keeps all of it.
DIM = 0.4
_DIMMED = np.round(np.arange(256) * DIM).astype(np.uint8)  # uint8 -> dimmed uint8, without a float copy


MATPLOTLIB = "needs matplotlib: pip install 'deris[bench]'"


def has_matplotlib() -> bool:
    """Whether plots can be drawn (checked before long work that ends in one)."""
    return importlib.util.find_spec("matplotlib") is not None


def new_figure(what: str, width: float, height: float) -> Figure:
    """A matplotlib figure of ``width`` x ``height`` inches; OutputError naming ``what`` without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise OutputError(f"{what} {MATPLOTLIB}") from None
    return Figure(figsize=(width, height))


def figure_png(figure: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def highlight(image_rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the mask made visible: the rest dimmed and the mask's edge traced, white inside
    and black outside it. A colour tint alone disappears on shapes of the tint's own colour; this shows
    on any colour. An empty mask (no target) dims the whole image."""
    from scipy import ndimage

    out = np.where(mask[..., None], image_rgb, _DIMMED[image_rgb])
    if mask.any():
        # The edge lies within `width` pixels of the mask's bounding box: work there, not on the whole photo.
        width = max(1, round(min(mask.shape) / 240))
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = (slice(max(0, rows[0] - width - 1), rows[-1] + width + 2), slice(max(0, cols[0] - width - 1), cols[-1] + width + 2))
        part, view = mask[box], out[box]
        view[part & ~ndimage.binary_erosion(part, iterations=width)] = 255
        view[ndimage.binary_dilation(part, iterations=width) & ~part] = 0
    return out


def with_caption(image_rgb: np.ndarray, caption: str, font_size: int | None = None) -> np.ndarray:
    """The image above a black strip holding ``caption`` (font size default: 1/40 of the width, at least 12)."""
    font_size = font_size or max(12, image_rgb.shape[1] // 40)
    font = ImageFont.load_default(size=font_size)
    width = image_rgb.shape[1]
    strip = Image.new("RGB", (width, font_size + 8), (0, 0, 0))
    ImageDraw.Draw(strip).text((4, 4), caption, fill=(255, 255, 255), font=font)
    result = Image.new("RGB", (width, image_rgb.shape[0] + strip.height))
    result.paste(Image.fromarray(image_rgb), (0, 0))
    result.paste(strip, (0, image_rgb.shape[0]))
    return np.asarray(result)


def overlay(image_rgb: np.ndarray, mask: np.ndarray, caption: str) -> np.ndarray:
    """The mask highlighted on the image (:func:`highlight`) with the expression and the decision below."""
    return with_caption(highlight(image_rgb, mask), caption)


def write_prediction_files(
    out_dir: str | os.PathLike[str],
    image_name: str,
    image_rgb: np.ndarray,
    texts: Sequence[str],
    predictions: Sequence[Prediction],
    *,
    force: bool = False,
) -> list[Path]:
    """For text i: ``<name>.t<i>.mask.png`` (0/255), ``<name>.t<i>.overlay.png``; plus ``<name>.json``.

    Existing result files are replaced only with ``force`` (checked before anything is written)."""
    out = Path(out_dir)
    stem = Path(image_name).stem
    if not force:
        targets = [out / f"{stem}.json"] + [out / f"{stem}.t{i}.{kind}.png" for i in range(len(texts)) for kind in ("mask", "overlay")]
        existing = [p.name for p in targets if p.exists()]
        if existing:
            raise OutputError(f"{out} already holds {', '.join(existing)}; pass --force to replace them")
    written = []
    records = []
    for i, (text, pred) in enumerate(zip(texts, predictions)):
        mask_path = out / f"{stem}.t{i}.mask.png"
        overlay_path = out / f"{stem}.t{i}.overlay.png"
        atomic_write(mask_path, png_bytes(pred.mask.astype(np.uint8) * 255))
        decision = "no target" if pred.no_target else f"queries {pred.selected}"
        caption = f'"{text}"  ({decision}, max score {pred.scores.max():.3f})'
        atomic_write(overlay_path, png_bytes(overlay(image_rgb, pred.mask, caption)))
        records.append({"text": text, "mask": mask_path.name, "overlay": overlay_path.name, **pred.to_json()})
        written += [mask_path, overlay_path]
    json_path = out / f"{stem}.json"
    atomic_write(json_path, (json.dumps({"image": image_name, "results": records}, indent=2) + "\n").encode())
    return written + [json_path]


def quoted(text: str, limit: int = 60) -> str:
    """``text`` quoted for a one-line message, cut after ``limit`` characters (the JSON keeps it whole)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def print_predictions(texts: Sequence[str], predictions: Sequence[Prediction], files: Sequence[Path], out: Path) -> None:
    """The one-line-per-expression summary that ``deris predict`` and ``deris client`` print."""
    for text, pred in zip(texts, predictions):
        decision = "no target" if pred.no_target else f"queries {pred.selected}, {int(pred.mask.sum())} pixels"
        print(f"{quoted(text)}: {decision} (max score {pred.scores.max():.3f}, threshold {pred.score_threshold})")
    print(f"wrote {len(files)} files to {out}")
