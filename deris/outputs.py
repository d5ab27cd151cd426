"""Result files shared by ``deris predict`` and ``deris client``: mask PNG, overlay PNG, scores JSON.

Every file is written to a temporary name in the target directory and renamed into place, so a
reader never sees a half-written file.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deris.atomic import OutputError, atomic_write
from deris.prediction import Prediction

TINT = np.array([255, 64, 32], dtype=np.float32)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def overlay(image_rgb: np.ndarray, mask: np.ndarray, caption: str) -> np.ndarray:
    """The mask tinted over the image with the expression (and the decision) as a caption strip."""
    out = image_rgb.astype(np.float32)
    out[mask] = 0.5 * out[mask] + 0.5 * TINT
    canvas = Image.fromarray(out.round().astype(np.uint8))
    font_size = max(12, image_rgb.shape[1] // 40)
    font = ImageFont.load_default(size=font_size)
    strip = Image.new("RGB", (canvas.width, font_size + 8), (0, 0, 0))
    ImageDraw.Draw(strip).text((4, 4), caption, fill=(255, 255, 255), font=font)
    result = Image.new("RGB", (canvas.width, canvas.height + strip.height))
    result.paste(canvas, (0, 0))
    result.paste(strip, (0, canvas.height))
    return np.asarray(result)


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


def print_predictions(texts: Sequence[str], predictions: Sequence[Prediction], files: Sequence[Path], out: Path) -> None:
    """The one-line-per-expression summary that ``deris predict`` and ``deris client`` print."""
    for text, pred in zip(texts, predictions):
        decision = "no target" if pred.no_target else f"queries {pred.selected}, {int(pred.mask.sum())} pixels"
        print(f"{text!r}: {decision} (max score {pred.scores.max():.3f}, threshold {pred.score_threshold})")
    print(f"wrote {len(files)} files to {out}")
