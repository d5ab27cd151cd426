"""The official training losses (``HierVG_criterion`` and ``SimpleHead_Independent_match.forward_train``).

For the final round and, as auxiliary outputs, each earlier round (each round's x4-upsampled mask
logits paired with that round's refer logits), queries are matched to the referred instances
(:mod:`deris.training.matcher`, recomputed per round) and scored by

* ``loss_class``: 2-class softmax CE over all N queries of the batch, target 0 ("referred") for matched
  queries and 1 otherwise, class weights ``empty_weight`` = [1, 0.1]; PyTorch's weighted mean
  sum(w_y * nll) / sum(w_y);
* ``loss_mask``: BCE-with-logits at ``num_points`` points per matched mask, averaged over the points,
  summed over the masks and divided by ``num_masks``;
* ``loss_dice``: on the same points, 1 - (2 sum(p t) + 1) / (sum p + sum t + 1) per mask, summed and
  divided by ``num_masks``.

The points of the mask losses come from PointRend importance sampling on the predicted logits
(``oversample_ratio`` x ``num_points`` uniform candidates, the ``importance_sample_ratio`` share with
the largest uncertainty -|logit| kept, the rest drawn uniformly anew); labels are the bilinearly
sampled 0/1 targets. ``num_masks`` is the batch's number of target masks, summed over the processes,
divided by the world size and clamped to at least 1.

Weights (Mask2Former YAML x the head's ``loss_weight``): class 2, mask 5, dice 5, auxiliary rounds
x 0.2, existence 1. The existence term, BCE(sigmoid(existence logit), has target) averaged over the
batch, is applied to the final output only. The box losses have weight 0 (and ``loss_giou`` is not
even in the official ``weight_dict``), so they are not computed. A sample with no target contributes
only "not referred" class targets and existence target 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from deris.training.matcher import NUM_POINTS, REFERRED, MatchCosts, hungarian_match, point_sample

NOT_REFERRED = 1 - REFERRED


@dataclass(frozen=True)
class LossWeights:
    """Official loss weights: CLASS/MASK/DICE_WEIGHT (2, 5, 5) x ``loss_weight`` {cls 1, mask 1, aux 0.2,
    existence 1}, and the refer-class weights ``empty_weight`` ([referred, not referred])."""

    cls: float = 2.0
    mask: float = 5.0
    dice: float = 5.0
    aux: float = 0.2
    existence: float = 1.0
    empty_weight: tuple[float, float] = (1.0, 0.1)


@dataclass(frozen=True)
class PointSampling:
    """Mask2Former's TRAIN_NUM_POINTS, OVERSAMPLE_RATIO and IMPORTANCE_SAMPLE_RATIO."""

    num_points: int = NUM_POINTS
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75


@dataclass
class Losses:
    """``total`` (what is back-propagated) = loss_class + loss_mask + loss_label_nt of ``weighted``.

    ``weighted``: the three sums the official head returns (``loss_mask`` includes Dice, both include
    the auxiliary rounds). ``terms``: every unweighted term under the official names — ``loss_class``,
    ``loss_mask``, ``loss_dice`` for the final round, the same with suffix ``_i`` for auxiliary round
    i, and ``loss_label_nt``.
    """

    total: torch.Tensor
    weighted: dict[str, torch.Tensor]
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    num_masks: float = 1.0


def uncertain_point_coords(
    mask_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PointRend importance sampling: mask_logits [M,1,H,W] -> points [M,num_points,2] in [0,1]^2.

    The first ``int(importance_sample_ratio * num_points)`` points are the most uncertain (smallest
    |logit|, measured at the sampled point, not at the pixels) of ``int(oversample_ratio * num_points)``
    uniform candidates; the rest are fresh uniform points.
    """
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"need oversample_ratio >= 1 and 0 <= importance_sample_ratio <= 1, got {oversample_ratio}, "
                         f"{importance_sample_ratio}")
    m, device = mask_logits.shape[0], mask_logits.device
    candidates = torch.rand(m, int(num_points * oversample_ratio), 2, generator=generator, device=device)
    uncertainty = -point_sample(mask_logits, candidates)[:, 0].abs()
    num_uncertain = int(importance_sample_ratio * num_points)
    top = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, top[:, :, None].expand(-1, -1, 2))
    extra = torch.rand(m, num_points - num_uncertain, 2, generator=generator, device=device)
    return torch.cat([chosen, extra], dim=1)


def refer_class_loss(
    refer_logits: torch.Tensor, indices: Sequence[tuple[torch.Tensor, torch.Tensor]], empty_weight: torch.Tensor
) -> torch.Tensor:
    """Weighted softmax CE: refer_logits [B,N,2]; matched queries target "referred", all others "not referred"."""
    target = torch.full(refer_logits.shape[:2], NOT_REFERRED, dtype=torch.int64, device=refer_logits.device)
    for b, (src, _) in enumerate(indices):
        target[b, src.to(refer_logits.device)] = REFERRED
    return F.cross_entropy(refer_logits.transpose(1, 2), target, weight=empty_weight.to(refer_logits))


def mask_point_losses(
    point_logits: torch.Tensor, point_labels: torch.Tensor, num_masks: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, Dice) of matched masks at sampled points: point_logits, point_labels [M,P] -> two scalars,
    each summed over the M masks and divided by ``num_masks``."""
    bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none").mean(1).sum() / num_masks
    probs = point_logits.sigmoid()
    numerator = 2.0 * (probs * point_labels).sum(-1)
    denominator = probs.sum(-1) + point_labels.sum(-1)
    dice = (1.0 - (numerator + 1.0) / (denominator + 1.0)).sum() / num_masks
    return bce, dice


def existence_loss(existence_logit: torch.Tensor, has_target: torch.Tensor) -> torch.Tensor:
    """Mean BCE(sigmoid(logit), has_target) over the batch: existence_logit [B,1], has_target [B].

    On probabilities, as the official ``F.binary_cross_entropy``, whose log is clamped at -100, so a
    saturated sigmoid gives a loss of 100 rather than the with-logits value.
    """
    return F.binary_cross_entropy(existence_logit.sigmoid().reshape(-1), has_target.reshape(-1).to(existence_logit))


def global_num_masks(target_masks: Sequence[torch.Tensor], device: torch.device) -> float:
    """The official normaliser: target masks in the batch, summed over processes / world size, >= 1."""
    count = torch.tensor([float(sum(t.shape[0] for t in target_masks))], device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        world = dist.get_world_size()
    return float(torch.clamp(count / world, min=1).item())


class Criterion:
    """The official DeRIS training loss for a batch.

    ``rounds``: one (mask logits [B,N,H,W] at the targets' resolution, refer logits [B,N,2]) pair per
    decoder round, the final round last; ``existence_logit`` [B,1]; ``target_masks[b]`` [T_b,H,W] 0/1,
    T_b = 0 for a no-target sample. Losses are computed in float32 with autocast off.
    """

    def __init__(
        self,
        weights: LossWeights | None = None,
        sampling: PointSampling | None = None,
        costs: MatchCosts | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.weights = weights or LossWeights()
        self.sampling = sampling or PointSampling()
        self.costs = costs or MatchCosts()
        self.generator = generator

    def round_losses(
        self, mask_logits: torch.Tensor, refer_logits: torch.Tensor, target_masks: Sequence[torch.Tensor], num_masks: float
    ) -> dict[str, torch.Tensor]:
        """Match, then ``loss_class``, ``loss_mask``, ``loss_dice`` (unweighted) for one round."""
        s = self.sampling
        indices = hungarian_match(refer_logits, mask_logits, target_masks, s.num_points, self.costs, self.generator)
        empty_weight = torch.tensor(self.weights.empty_weight)
        losses = {"loss_class": refer_class_loss(refer_logits, indices, empty_weight)}
        batch = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(mask_logits.device)
        src = torch.cat([src for src, _ in indices]).to(mask_logits.device)
        pred = mask_logits[batch, src][:, None]  # [M,1,H,W]
        gt = torch.cat([t[tgt.to(t.device)] for t, (_, tgt) in zip(target_masks, indices)])[:, None].to(pred)
        with torch.no_grad():
            points = uncertain_point_coords(pred, s.num_points, s.oversample_ratio, s.importance_sample_ratio, self.generator)
            labels = point_sample(gt, points)[:, 0]
        losses["loss_mask"], losses["loss_dice"] = mask_point_losses(point_sample(pred, points)[:, 0], labels, num_masks)
        return losses

    def __call__(
        self,
        rounds: Sequence[tuple[torch.Tensor, torch.Tensor]],
        existence_logit: torch.Tensor,
        target_masks: Sequence[torch.Tensor],
    ) -> Losses:
        if not rounds:
            raise ValueError("the criterion needs at least the final round's outputs")
        w = self.weights
        device = existence_logit.device
        num_masks = global_num_masks(target_masks, device)
        has_target = torch.tensor([t.shape[0] > 0 for t in target_masks], device=device)
        terms: dict[str, torch.Tensor] = {}
        loss_class = torch.zeros((), device=device)
        loss_mask = torch.zeros((), device=device)
        with torch.autocast(device.type, enabled=False):
            *aux, final = rounds
            # The final round first, then auxiliary round i (suffix _i), in the official order.
            ordered = [("", 1.0, final)] + [(f"_{i}", w.aux, r) for i, r in enumerate(aux)]
            for suffix, factor, (mask_logits, refer_logits) in ordered:
                round_terms = self.round_losses(mask_logits.float(), refer_logits.float(), target_masks, num_masks)
                terms.update({k + suffix: v for k, v in round_terms.items()})
                loss_class = loss_class + factor * w.cls * round_terms["loss_class"]
                loss_mask = loss_mask + factor * (w.mask * round_terms["loss_mask"] + w.dice * round_terms["loss_dice"])
            terms["loss_label_nt"] = existence_loss(existence_logit.float(), has_target)
        weighted = {"loss_class": loss_class, "loss_mask": loss_mask, "loss_label_nt": w.existence * terms["loss_label_nt"]}
        total = weighted["loss_class"] + weighted["loss_mask"] + weighted["loss_label_nt"]
        return Losses(total=total, weighted=weighted, terms=terms, num_masks=num_masks)
