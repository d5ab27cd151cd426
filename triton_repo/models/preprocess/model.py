"""Triton python-backend model ``preprocess``: encoded image bytes + expression -> model inputs.

Runs the project's own preprocessing (``deris.preprocess``, ``deris.text``) in the server's python
environment, so the served inputs are bit-identical to ``deris predict``'s. Every bad request is
answered with its own INVALID_ARG error; the model never raises out of ``execute``.

Config parameters (written by ``deris-export triton-repo``): ``image_size``, ``mini_image_size``,
``max_text_len``, ``tokenizer`` (file name in the version folder), ``max_image_pixels`` and
``image_dtype`` (the dtype the graphs take the images in: float32, or float16 for fp16 exports).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import triton_python_backend_utils as pb_utils

from deris.preprocess import ImageError, preprocess_image
from deris.text import TextEncoder, TextError
from deris.triton_repo.backend import RequestError, answer_each


def _parameters(model_config: dict[str, Any]) -> dict[str, str]:
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params = _parameters(json.loads(args["model_config"]))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.image_size = int(params["image_size"])
        self.mini_image_size = int(params["mini_image_size"])
        self.max_image_pixels = int(params["max_image_pixels"])
        self.image_dtype = np.dtype(params["image_dtype"])
        self.encoder = TextEncoder.from_spm(version_dir / params["tokenizer"], int(params["max_text_len"]))
        # One image per call is small work; cv2's own thread pool would only compete with the
        # other models' instances for the same cores.
        cv2.setNumThreads(1)

    def execute(self, requests: list[Any]) -> list[Any]:
        return answer_each(requests, self._prepare, (ImageError, TextError, RequestError), "preprocess", pb_utils)

    def _prepare(self, request: Any) -> list[Any]:
        images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
        texts = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
        if len(images) != len(texts):
            raise RequestError(f"IMAGE has {len(images)} items and TEXT {len(texts)}; send one text per image")
        columns: dict[str, list[np.ndarray]] = {k: [] for k in ("img", "img_mini", "token_ids", "text_pad_mask", "original_size")}
        for index, (image, text) in enumerate(zip(images, texts)):
            where = f"item {index}: " if len(images) > 1 else ""
            try:
                prepared = preprocess_image(
                    bytes(image), self.image_size, self.mini_image_size, max_pixels=self.max_image_pixels
                )
                token_ids, pad_mask = self.encoder.encode(bytes(text))
            except (ImageError, TextError) as exc:
                raise type(exc)(f"{where}{exc}") from exc
            columns["img"].append(prepared.img.astype(self.image_dtype, copy=False))
            columns["img_mini"].append(prepared.img_mini.astype(self.image_dtype, copy=False))
            columns["token_ids"].append(token_ids)
            columns["text_pad_mask"].append(pad_mask)
            columns["original_size"].append(np.array(prepared.original_size, dtype=np.int64))
        return [pb_utils.Tensor(name, np.stack(values)) for name, values in columns.items()]
