"""The official DeRIS accuracy metrics, streamed: constant memory, one sample at a time.

Numpy only on purpose (no torch, no pycocotools): a client machine that holds predictions and
ground-truth masks can score them.

Both accumulators keep only integer sums (intersections, unions, counts) and one float sum of the
per-sample IoUs, so they can be written to JSON (:meth:`to_state`), combined across shards
(:meth:`merge`) and rebuilt from per-sample records (``update_from_counts``).

Official formulas (DeRIS repository, ``deris/apis/test.py`` and ``deris/evaluations/grefcoco.py``):

* RefCOCO/+/g, :class:`RisMetrics` (``accuracy`` / ``mask_overlaps_withIU``): per sample I = |P & G|,
  U = |P| + |G| - I, IoU = I / U if U >= 1 else 0. mIoU = 100 * mean(IoU); oIoU = 100 * sum(I) / sum(U);
  Pr@t = 100 * mean(IoU >= t) for t in 0.5 .. 0.9.
* gRefCOCO, :class:`GresMetrics` (``gres_evaluate``): I = |P & G|, U = |P | G|. No-target GT predicted
  no-target: IoU 1, adds nothing to I or U. No-target GT given a target: IoU 0, U (the predicted area)
  enters sum(U). Target GT predicted no-target: I := 0, U as computed, IoU = 0. Target GT predicted a
  target: IoU = I / U (0 if U = 0). gIoU = 100 * mean IoU over all samples; cIoU = 100 * sum(I) / sum(U);
  N-acc = 100 * TP / (TP + FN) and T-acc = 100 * TN / (TN + FP), both 0 when the split has no
  no-target sample; Pr@t = 100 * share of target samples with IoU >= t, t in 0.7, 0.8, 0.9.

Where the official code divides by zero (no sample at all, sum(U) = 0, no target sample for T-acc and
Pr@t) it raises ZeroDivisionError; here that metric is 0.0 instead.

Thresholds are compared in float64. The official RefCOCO code compares float32 IoUs; the two agree for
every mask of fewer than 2**21 pixels, since I / U then never lies within float32 rounding of a
threshold without equalling it.

The official protocol scores at 384x384: the model's stretched 384x384 prediction against the GT mask
nearest-resized to 384x384 (``OFFICIAL_EVAL_SIZE``; :func:`deris.datasets.official_gt_mask`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

OFFICIAL_EVAL_SIZE = (384, 384)  # (height, width) at which the official evaluation compares masks

RIS_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
GRES_THRESHOLDS = (0.7, 0.8, 0.9)

RIS_KEYS = ("mIoU", "oIoU") + tuple(f"Pr@{t:.1f}" for t in RIS_THRESHOLDS)
GRES_KEYS = ("gIoU", "cIoU", "N-acc", "T-acc") + tuple(f"Pr@{t:.1f}" for t in GRES_THRESHOLDS)

# gres_evaluate's names for the four (GT, prediction) cases.
Outcome = Literal["TP", "FN", "FP", "TN"]


def _percent(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0


def _as_bool_mask(mask: object, name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (height, width) mask, got shape {array.shape}")
    if array.dtype == np.bool_:
        return array
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError(f"{name} is an integer array with values outside {{0, 1}}; pass a boolean mask")
        return array.astype(bool)
    raise TypeError(f"{name} must be a boolean (or 0/1 integer) mask, got dtype {array.dtype}; threshold it first")


def mask_counts(pred_mask: object, gt_mask: object) -> tuple[int, int]:
    """(|P & G|, |P | G|) of two same-shape boolean masks.

    Raises ValueError for masks that are not 2-D or differ in shape (resize the prediction or the GT
    first, e.g. with :func:`deris.datasets.resize_mask_nearest`), TypeError for non-boolean dtypes.
    """
    pred = _as_bool_mask(pred_mask, "pred_mask")
    gt = _as_bool_mask(gt_mask, "gt_mask")
    if pred.shape != gt.shape:
        raise ValueError(
            f"pred_mask {pred.shape} and gt_mask {gt.shape} differ in shape; resize one to the other "
            f"(the official protocol compares both at {OFFICIAL_EVAL_SIZE})"
        )
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def _check_counts(intersection: int, union: int) -> tuple[int, int]:
    i, u = int(intersection), int(union)
    if i != intersection or u != union or not 0 <= i <= u:
        raise ValueError(f"need integers 0 <= intersection <= union, got intersection={intersection!r}, union={union!r}")
    return i, u


@dataclass(frozen=True)
class RisScore:
    """One RefCOCO sample: the counts and IoU it contributes to :class:`RisMetrics`."""

    intersection: int
    union: int
    iou: float  # I / U, 0 when U = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GresScore:
    """One gRefCOCO sample: what it contributes to :class:`GresMetrics`, as ``gres_evaluate`` records it.

    ``intersection`` and ``union`` are the amounts added to sum(I) and sum(U) (I is 0 for a no-target GT
    or a "no target" prediction; U is 0 for a correctly predicted no-target sample).
    """

    intersection: int
    union: int
    iou: float
    gt_no_target: bool
    pred_no_target: bool
    outcome: Outcome

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RisMetrics:
    """Streaming RefCOCO/+/g mask metrics: mIoU, oIoU, Pr@0.5..0.9 (percent), as ``deris/apis/test.py``."""

    kind = "ris"

    def __init__(self) -> None:
        self.count = 0
        self.sum_i = 0
        self.sum_u = 0
        self.sum_iou = 0.0
        self.pr_counts = [0] * len(RIS_THRESHOLDS)

    def update(self, pred_mask: object, gt_mask: object) -> RisScore:
        """Score one sample (same-shape boolean masks), accumulate it and return its record."""
        return self.update_from_counts(*mask_counts(pred_mask, gt_mask))

    def update_from_counts(self, intersection: int, union: int) -> RisScore:
        """Accumulate one sample given |P & G| and |P | G| (e.g. read back from a per-sample record)."""
        i, u = _check_counts(intersection, union)
        iou = i / u if u >= 1 else 0.0
        self.count += 1
        self.sum_i += i
        self.sum_u += u
        self.sum_iou += iou
        for k, t in enumerate(RIS_THRESHOLDS):
            if iou >= t:
                self.pr_counts[k] += 1
        return RisScore(i, u, iou)

    def merge(self, other: RisMetrics) -> RisMetrics:
        """A new accumulator holding both (e.g. two shards of one split); neither input changes."""
        if not isinstance(other, RisMetrics):
            raise TypeError(f"can only merge RisMetrics with RisMetrics, got {type(other).__name__}")
        merged = RisMetrics()
        merged.count = self.count + other.count
        merged.sum_i = self.sum_i + other.sum_i
        merged.sum_u = self.sum_u + other.sum_u
        merged.sum_iou = self.sum_iou + other.sum_iou
        merged.pr_counts = [a + b for a, b in zip(self.pr_counts, other.pr_counts)]
        return merged

    def compute(self) -> dict[str, float]:
        """``mIoU``, ``oIoU``, ``Pr@0.5`` .. ``Pr@0.9``, in percent (0.0 where a denominator is 0)."""
        result = {"mIoU": _percent(self.sum_iou, self.count), "oIoU": _percent(self.sum_i, self.sum_u)}
        for t, hits in zip(RIS_THRESHOLDS, self.pr_counts):
            result[f"Pr@{t:.1f}"] = _percent(hits, self.count)
        return result

    def to_state(self) -> dict[str, Any]:
        """The accumulator as JSON-ready numbers, for :meth:`from_state`."""
        return {
            "kind": self.kind,
            "count": self.count,
            "sum_i": self.sum_i,
            "sum_u": self.sum_u,
            "sum_iou": self.sum_iou,
            "pr_counts": list(self.pr_counts),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RisMetrics:
        """Rebuild an accumulator written by :meth:`to_state`."""
        _check_state(state, cls.kind, len(RIS_THRESHOLDS))
        metrics = cls()
        metrics.count = int(state["count"])
        metrics.sum_i = int(state["sum_i"])
        metrics.sum_u = int(state["sum_u"])
        metrics.sum_iou = float(state["sum_iou"])
        metrics.pr_counts = [int(c) for c in state["pr_counts"]]
        return metrics


class GresMetrics:
    """Streaming gRefCOCO metrics: gIoU, cIoU, N-acc, T-acc, Pr@0.7..0.9 (percent), as ``gres_evaluate``."""

    kind = "gres"

    def __init__(self) -> None:
        self.count = 0
        self.target_count = 0
        self.sum_i = 0
        self.sum_u = 0
        self.sum_iou = 0.0
        self.outcomes: dict[str, int] = {"TP": 0, "FN": 0, "FP": 0, "TN": 0}
        self.pr_counts = [0] * len(GRES_THRESHOLDS)

    def update(self, pred_mask: object, gt_mask: object, pred_no_target: bool, gt_no_target: bool) -> GresScore:
        """Score one sample (same-shape boolean masks and the two no-target decisions), accumulate it and
        return its record.

        ``pred_no_target`` is the model's decision (officially: no query score above the threshold, in which
        case the official predicted mask is empty); ``gt_no_target`` is the sample's no-target flag.
        """
        return self.update_from_counts(*mask_counts(pred_mask, gt_mask), pred_no_target, gt_no_target)

    def update_from_counts(self, intersection: int, union: int, pred_no_target: bool, gt_no_target: bool) -> GresScore:
        """Accumulate one sample given the raw |P & G| and |P | G| of its masks and the two decisions."""
        i, u = _check_counts(intersection, union)
        pred_nt, gt_nt = _check_flag(pred_no_target, "pred_no_target"), _check_flag(gt_no_target, "gt_no_target")
        outcome: Outcome
        if gt_nt:
            if pred_nt:
                outcome, i, u, iou = "TP", 0, 0, 1.0
            else:
                outcome, i, iou = "FN", 0, 0.0
        else:
            if pred_nt:
                outcome, i = "FP", 0
            else:
                outcome = "TN"
            iou = i / u if u else 0.0
            self.target_count += 1
            for k, t in enumerate(GRES_THRESHOLDS):
                if iou >= t:
                    self.pr_counts[k] += 1
        self.count += 1
        self.outcomes[outcome] += 1
        self.sum_i += i
        self.sum_u += u
        self.sum_iou += iou
        return GresScore(i, u, iou, gt_nt, pred_nt, outcome)

    def merge(self, other: GresMetrics) -> GresMetrics:
        """A new accumulator holding both (e.g. two shards of one split); neither input changes."""
        if not isinstance(other, GresMetrics):
            raise TypeError(f"can only merge GresMetrics with GresMetrics, got {type(other).__name__}")
        merged = GresMetrics()
        merged.count = self.count + other.count
        merged.target_count = self.target_count + other.target_count
        merged.sum_i = self.sum_i + other.sum_i
        merged.sum_u = self.sum_u + other.sum_u
        merged.sum_iou = self.sum_iou + other.sum_iou
        merged.outcomes = {k: self.outcomes[k] + other.outcomes[k] for k in self.outcomes}
        merged.pr_counts = [a + b for a, b in zip(self.pr_counts, other.pr_counts)]
        return merged

    def compute(self) -> dict[str, float]:
        """``gIoU``, ``cIoU``, ``N-acc``, ``T-acc``, ``Pr@0.7`` .. ``Pr@0.9``, in percent.

        0.0 where a denominator is 0; N-acc and T-acc are both 0.0 when no sample is no-target (official).
        """
        o = self.outcomes
        has_no_target = o["TP"] + o["FN"] > 0
        result = {
            "gIoU": _percent(self.sum_iou, self.count),
            "cIoU": _percent(self.sum_i, self.sum_u),
            "N-acc": _percent(o["TP"], o["TP"] + o["FN"]) if has_no_target else 0.0,
            "T-acc": _percent(o["TN"], o["TN"] + o["FP"]) if has_no_target else 0.0,
        }
        for t, hits in zip(GRES_THRESHOLDS, self.pr_counts):
            result[f"Pr@{t:.1f}"] = _percent(hits, self.target_count)
        return result

    def to_state(self) -> dict[str, Any]:
        """The accumulator as JSON-ready numbers, for :meth:`from_state`."""
        return {
            "kind": self.kind,
            "count": self.count,
            "target_count": self.target_count,
            "sum_i": self.sum_i,
            "sum_u": self.sum_u,
            "sum_iou": self.sum_iou,
            "outcomes": dict(self.outcomes),
            "pr_counts": list(self.pr_counts),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> GresMetrics:
        """Rebuild an accumulator written by :meth:`to_state`."""
        _check_state(state, cls.kind, len(GRES_THRESHOLDS))
        metrics = cls()
        metrics.count = int(state["count"])
        metrics.target_count = int(state["target_count"])
        metrics.sum_i = int(state["sum_i"])
        metrics.sum_u = int(state["sum_u"])
        metrics.sum_iou = float(state["sum_iou"])
        if set(state["outcomes"]) != set(metrics.outcomes):
            raise ValueError(f"gres state outcomes must have keys {sorted(metrics.outcomes)}, got {sorted(state['outcomes'])}")
        metrics.outcomes = {k: int(v) for k, v in state["outcomes"].items()}
        metrics.pr_counts = [int(c) for c in state["pr_counts"]]
        return metrics


def _check_flag(value: object, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")


def _check_state(state: dict[str, Any], kind: str, n_thresholds: int) -> None:
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"expected a {kind!r} metrics state, got kind {found!r}")
    if len(state.get("pr_counts", ())) != n_thresholds:
        raise ValueError(f"{kind} state needs {n_thresholds} pr_counts, got {state.get('pr_counts')!r}")


def metrics_from_state(state: dict[str, Any]) -> RisMetrics | GresMetrics:
    """The accumulator a ``to_state()`` dict describes, of either kind (for merging shards read from disk)."""
    kinds: dict[str, type[RisMetrics] | type[GresMetrics]] = {RisMetrics.kind: RisMetrics, GresMetrics.kind: GresMetrics}
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in kinds:
        raise ValueError(f"unknown metrics state kind {kind!r}; accepted: {sorted(kinds)}")
    return kinds[kind].from_state(state)
