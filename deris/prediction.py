"""The result of one image-expression pair, and the thresholds that decide it.

Torch-free on purpose: the Triton client, the server's pre/post-processing models and the
result writers use this module on machines (or in processes) that have no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Both thresholds are probabilities compared strictly inside the open interval: 0 or 1 would
# select every query / pixel or none whatever the model says.
THRESHOLD_RANGE = (0.0, 1.0)
THRESHOLDS = ("score_threshold", "mask_threshold")


def check_threshold(name: str, value: object) -> float:
    """``value`` as a float inside (0, 1); ValueError naming ``name`` and the accepted range otherwise.

    Numbers and strings holding numbers are accepted (request parameters arrive as either);
    booleans are not.
    """
    low, high = THRESHOLD_RANGE
    try:
        number = float(value)  # type: ignore[arg-type]  # anything float() takes; the rest is refused below
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not low < number < high:
        raise ValueError(f"{name} must be a number inside ({low:g}, {high:g}), got {value!r}")
    return number


@dataclass
class Prediction:
    """One image-expression pair's result."""

    mask: np.ndarray  # bool [H0, W0]: the referred region at the original image size
    scores: np.ndarray  # float32 [N]: per-query referring score softmax(refer)[0]
    selected: list[int]  # queries whose score is above the threshold
    no_target: bool  # no query passed the threshold
    existence_prob: float  # sigmoid(existence logit); reported, not used for the decision
    score_threshold: float
    # The mask and no-target decision at other score thresholds, when asked for (``deris eval --score-sweep``):
    # threshold -> (mask like ``mask``, no_target). The same model outputs, decided again.
    by_threshold: dict[float, tuple[np.ndarray, bool]] = field(default_factory=dict)

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
