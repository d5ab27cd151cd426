"""Official DeRIS post-processing (spec section 6), without the untrained box path.

score_q = softmax(refer_logits_q)[0]; the mask is the OR over queries with score_q > threshold
(strictly) of sigmoid(x4-upsampled mask logits) >= mask_threshold; "no target" means no query
passes. The existence probability is reported but, as in the official code, not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from deris.modeling.deris import upsample_masks


@dataclass
class Prediction:
    """One image-expression pair's result."""

    mask: np.ndarray  # bool [H0, W0]: the referred region at the original image size
    scores: np.ndarray  # float32 [N]: per-query referring score softmax(refer)[0]
    selected: list[int]  # queries whose score is above the threshold
    no_target: bool  # no query passed the threshold
    existence_prob: float  # sigmoid(existence logit); reported, not used for the decision
    score_threshold: float
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "no_target": self.no_target,
            "selected_queries": self.selected,
            "scores": [round(float(s), 6) for s in self.scores],
            "max_score": round(float(self.scores.max()), 6),
            "score_threshold": self.score_threshold,
            "existence_prob": round(self.existence_prob, 6),
            "mask_pixels": int(self.mask.sum()),
            "mask_size": list(self.mask.shape),
        }


def check_threshold(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be inside (0, 1), got {value}")
    return value


def decide(
    mask_logits_lowres: torch.Tensor,
    refer_logits: torch.Tensor,
    score_threshold: float,
    mask_threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B,N,h,w] logits, [B,N,2] refer logits -> (scores [B,N], selected [B,N] bool,
    mask [B,4h,4w] bool at the model's input resolution)."""
    check_threshold("score_threshold", score_threshold)
    check_threshold("mask_threshold", mask_threshold)
    scores = refer_logits.softmax(-1)[..., 0]
    selected = scores > score_threshold
    binary = upsample_masks(mask_logits_lowres).sigmoid() >= mask_threshold
    mask = (binary & selected[:, :, None, None]).any(dim=1)
    return scores, selected, mask


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a binary mask to (height, width), as the official demo rescales."""
    h, w = size
    return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


def postprocess(
    mask_logits_lowres: torch.Tensor,
    refer_logits: torch.Tensor,
    existence_logits: torch.Tensor,
    original_sizes: list[tuple[int, int]],
    score_threshold: float,
    mask_threshold: float = 0.5,
) -> list[Prediction]:
    """Batch outputs -> one :class:`Prediction` per sample, masks at each original size."""
    scores, selected, mask = decide(mask_logits_lowres, refer_logits, score_threshold, mask_threshold)
    existence = existence_logits.sigmoid().reshape(-1)
    results = []
    for b, size in enumerate(original_sizes):
        chosen = [int(i) for i in torch.nonzero(selected[b]).flatten()]
        results.append(
            Prediction(
                mask=resize_mask(mask[b].cpu().numpy(), size),
                scores=scores[b].float().cpu().numpy(),
                selected=chosen,
                no_target=not chosen,
                existence_prob=float(existence[b]),
                score_threshold=score_threshold,
            )
        )
    return results
