"""Official DeRIS post-processing (docs/model.md, quirks 10-12), without the untrained box path.

score_q = softmax(refer_logits_q)[0]; the mask is the OR over queries with score_q > threshold
(strictly) of sigmoid(x4-upsampled mask logits) >= mask_threshold; "no target" means no query
passes. The existence probability is reported but, as in the official code, not used.

Imports torch but neither the model nor the kernels: the server's postprocess model runs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from deris.prediction import Prediction, check_threshold
from deris.preprocess import resize_mask_nearest


def upsample_masks(mask_logits: torch.Tensor) -> torch.Tensor:
    """The official x4 upsampling of the final mask logits (bilinear, align_corners=True)."""
    h, w = mask_logits.shape[-2:]
    return F.interpolate(mask_logits, size=(4 * h, 4 * w), mode="bilinear", align_corners=True)



def decide(
    mask_logits_lowres: torch.Tensor,
    refer_logits: torch.Tensor,
    score_threshold: float,
    mask_threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B,N,h,w] logits, [B,N,2] refer logits -> (scores [B,N], selected [B,N] bool,
    mask [B,4h,4w] bool at the model's input resolution)."""
    scores, query_masks = _scores_and_query_masks(mask_logits_lowres, refer_logits, mask_threshold)
    selected, mask = _select(scores, query_masks, score_threshold)
    return scores, selected, mask


def _scores_and_query_masks(
    mask_logits_lowres: torch.Tensor, refer_logits: torch.Tensor, mask_threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query referring scores [B,N] and binary masks [B,N,4h,4w]: what every score threshold decides from."""
    check_threshold("mask_threshold", mask_threshold)
    return refer_logits.softmax(-1)[..., 0], upsample_masks(mask_logits_lowres).sigmoid() >= mask_threshold


def _select(scores: torch.Tensor, query_masks: torch.Tensor, score_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries above ``score_threshold`` (strictly) and the OR of their masks."""
    check_threshold("score_threshold", score_threshold)
    selected = scores > score_threshold
    return selected, (query_masks & selected[:, :, None, None]).any(dim=1)


def postprocess(
    mask_logits_lowres: torch.Tensor,
    refer_logits: torch.Tensor,
    existence_logits: torch.Tensor,
    original_sizes: list[tuple[int, int]],
    score_threshold: float,
    mask_threshold: float = 0.5,
    sweep: Sequence[float] = (),
) -> list[Prediction]:
    """Batch outputs -> one :class:`Prediction` per sample, masks at each original size; with ``sweep``, each
    prediction also holds the mask and decision at those score thresholds (``Prediction.by_threshold``)."""
    scores, query_masks = _scores_and_query_masks(mask_logits_lowres, refer_logits, mask_threshold)
    selected, mask = _select(scores, query_masks, score_threshold)
    existence = existence_logits.sigmoid().reshape(-1)
    others = {t: _select(scores, query_masks, t) for t in sweep}  # the same masks, decided again
    results = []
    for b, size in enumerate(original_sizes):
        chosen = [int(i) for i in torch.nonzero(selected[b]).flatten()]
        results.append(
            Prediction(
                mask=resize_mask_nearest(mask[b].cpu().numpy(), size),
                scores=scores[b].float().cpu().numpy(),
                selected=chosen,
                no_target=not chosen,
                existence_prob=float(existence[b]),
                score_threshold=score_threshold,
                by_threshold={
                    t: (resize_mask_nearest(m[b].cpu().numpy(), size), not bool(s[b].any())) for t, (s, m) in others.items()
                },
            )
        )
    return results
