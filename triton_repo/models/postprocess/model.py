"""Triton python-backend model ``postprocess``: final decoder outputs -> mask, scores, decision.

Runs the official post-processing of ``deris.postprocess`` (the same code ``deris predict`` runs).
Masks come back at each image's original size, so one request's items must share a size: this
model has ``max_batch_size: 0`` (the ensemble hands it each request whole, with the batch axis as
an ordinary first dimension) and refuses a multi-item request whose images differ in size.

Per-request parameters ``score_threshold`` and ``mask_threshold`` (numbers, or strings holding
numbers, inside (0, 1)) override the defaults from the config parameters of the same names.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from deris.postprocess import postprocess
from deris.prediction import THRESHOLDS, check_threshold
from deris.triton_repo.backend import RequestError, answer_each


def _threshold(name: str, value: object) -> float:
    try:
        return check_threshold(f"request parameter {name}", value)
    except ValueError as exc:
        raise RequestError(str(exc)) from None


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params = json.loads(args["model_config"]).get("parameters", {})
        self.defaults = {name: _threshold(name, params[name]["string_value"]) for name in THRESHOLDS}
        # Post-processing is light; intra-op threads would only compete with the graph models.
        torch.set_num_threads(1)

    def execute(self, requests: list[Any]) -> list[Any]:
        return answer_each(requests, self._finish, (RequestError,), "postprocess", pb_utils)

    def _thresholds(self, request: Any) -> dict[str, float]:
        given = json.loads(request.parameters() or "{}")
        return {name: _threshold(name, given[name]) if name in given else self.defaults[name] for name in THRESHOLDS}

    def _finish(self, request: Any) -> list[Any]:
        thresholds = self._thresholds(request)

        def tensor(name: str) -> np.ndarray:
            return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

        sizes = [(int(h), int(w)) for h, w in tensor("original_size")]
        if len(set(sizes)) > 1:
            raise RequestError(
                f"the {len(sizes)} images of one request have different sizes {sorted(set(sizes))}; masks are "
                "returned at the original size, so send images of different sizes in separate requests"
            )
        predictions = postprocess(
            torch.from_numpy(tensor("mask_logits")),
            torch.from_numpy(tensor("refer_logits")),
            torch.from_numpy(tensor("existence")),
            sizes,
            thresholds["score_threshold"],
            thresholds["mask_threshold"],
        )
        return [
            pb_utils.Tensor("MASK", np.stack([p.mask for p in predictions]).astype(np.uint8)),
            pb_utils.Tensor("SCORES", np.stack([p.scores for p in predictions]).astype(np.float32)),
            pb_utils.Tensor("NO_TARGET", np.array([[p.no_target] for p in predictions], dtype=bool)),
            pb_utils.Tensor("EXISTENCE_PROB", np.array([[p.existence_prob] for p in predictions], dtype=np.float32)),
        ]
