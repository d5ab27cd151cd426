"""Result files shared by ``deris predict`` and ``deris client``: mask PNG, overlay PNG, scores JSON.

Every file is written to a temporary name in the target directory and renamed into place, so a
reader never sees a half-written file.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deris.postprocess import Prediction

TINT = np.array([255, 64, 32], dtype=np.float32)


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    out_dir: str | os.PathLike[str], image_name: str, image_rgb: np.ndarray, texts: Sequence[str], predictions: Sequence[Prediction]
) -> list[Path]:
    """For text i: ``<name>.t<i>.mask.png`` (0/255), ``<name>.t<i>.overlay.png``; plus ``<name>.json``."""
    out = Path(out_dir)
    stem = Path(image_name).stem
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
