"""Point sampling and the per-image Hungarian matching of queries to referred instances.

As the official ``hungarian_matcher_HierVG`` (``Mask_Criterion.py``) with the gRefCOCO/RefCOCO head
configuration (``simplehead_Independent_matching.py``, Mask2Former YAML ``CLASS_WEIGHT``,
``MASK_WEIGHT``, ``DICE_WEIGHT`` = 2, 5, 5; ``matching_cost_weight`` {cls 1, mask 1, bbox 0}):

    C[q, t] = 2 * (-softmax(refer_logits_q)[0]) + 5 * CE_pts(q, t) + 5 * Dice_pts(q, t)

CE and Dice are computed on ``num_points`` (12544) uniformly random points shared by every query
and target of the image, sampled bilinearly (``grid_sample``, ``align_corners=False``, zero padding)
from the mask logits and from the 0/1 target masks. The box terms have weight 0 and are omitted.
Every target is of class 0 ("referred"), so the class cost is the same column for each target.
The assignment is ``scipy.optimize.linear_sum_assignment`` on the [N, T] matrix, per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

# Mask2Former's TRAIN_NUM_POINTS: points per mask for the matching costs and the mask losses.
NUM_POINTS = 12544
REFERRED = 0  # refer-class index of "referred"; index 1 is "not referred / no object"


@dataclass(frozen=True)
class MatchCosts:
    """Weights of the matching cost terms (official: class 2, mask BCE 5, Dice 5)."""

    cls: float = 2.0
    mask: float = 5.0
    dice: float = 5.0


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``inputs`` [R,C,H,W] at ``coords`` [R,P,2] -> [R,C,P].

    ``coords`` are (x, y) in [0, 1]^2 over the whole map (0 = left/top edge, 1 = right/bottom edge),
    so pixel j's centre is (j + 0.5) / W. Outside the outermost pixel centres the samples blend with
    zeros, as ``grid_sample``'s default padding does in the official helper.
    """
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # [R,P,1,2] in grid_sample's [-1, 1]
    return F.grid_sample(inputs, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def sigmoid_ce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise mean BCE-with-logits: logits [Q,P], targets [T,P] -> [Q,T].

    BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x), averaged over the P points; written as two
    matrix products so the [Q,T,P] tensor is never built.
    """
    pos = F.softplus(-logits)  # BCE against target 1
    neg = F.softplus(logits)  # BCE against target 0
    return (pos @ targets.T + neg @ (1.0 - targets).T) / logits.shape[1]


def dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise Dice loss with +1 smoothing: 1 - (2 sum(p t) + 1) / (sum p + sum t + 1), p = sigmoid(logits)."""
    probs = logits.sigmoid()
    numerator = 2.0 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


@torch.no_grad()
def match_image(
    refer_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    target_masks: torch.Tensor,
    points: torch.Tensor,
    costs: MatchCosts = MatchCosts(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match one image's N queries to its T targets.

    refer_logits [N,2], mask_logits [N,H,W], target_masks [T,H,W] (0/1), points [P,2] in [0,1]^2
    -> (query indices, target indices), int64 [min(N,T)] each, query indices ascending.
    T = 0 gives two empty tensors: every query is then "not referred".
    """
    n, t = mask_logits.shape[0], target_masks.shape[0]
    if t == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    # The official matcher computes its costs in float32 with autocast off.
    with torch.autocast(mask_logits.device.type, enabled=False):
        prob_referred = refer_logits.float().softmax(-1)[:, REFERRED]
        pred = point_sample(mask_logits.float()[:, None], points.expand(n, -1, -1)).squeeze(1)
        gt = point_sample(target_masks.float()[:, None], points.expand(t, -1, -1)).squeeze(1)
        cost = (
            costs.cls * -prob_referred[:, None].expand(n, t)
            + costs.mask * sigmoid_ce_cost(pred, gt)
            + costs.dice * dice_cost(pred, gt)
        )
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


@torch.no_grad()
def hungarian_match(
    refer_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    target_masks: Sequence[torch.Tensor],
    num_points: int = NUM_POINTS,
    costs: MatchCosts = MatchCosts(),
    generator: torch.Generator | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-image matching for a batch: refer_logits [B,N,2], mask_logits [B,N,H,W], ``target_masks[b]``
    [T_b,H,W] -> one (query indices, target indices) pair per image.

    Each image draws its own ``num_points`` uniform points on the masks' device, from ``generator``
    (on that device) if given, else from torch's global generator, as the official ``torch.rand``.
    """
    if len(target_masks) != mask_logits.shape[0]:
        raise ValueError(f"{len(target_masks)} target sets for a batch of {mask_logits.shape[0]}")
    indices = []
    for b in range(mask_logits.shape[0]):
        points = torch.rand(num_points, 2, generator=generator, device=mask_logits.device)
        indices.append(match_image(refer_logits[b], mask_logits[b], target_masks[b], points, costs))
    return indices
