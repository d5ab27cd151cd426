"""Non-referent sample conversion (NSC), as the official ``turn_hard_negative`` of the gRefCOCO loader
(``LoadImageAnnotationsFromFileGRES_TO._load_expression_tokenize_beit3``, config ``enable=True,
rate=0.15, sim=True, min_text_length=0, simlarity_threshold=0.6``).

A training sample that has a target is, with probability ``rate`` (``random() <= rate``), given the
expression of another image, if one is found whose similarity to its own expression is below
``similarity_threshold``; the sample then has no target (existence target 0, empty mask). Each try
draws an image id, then one of its expressions; an expression with at most ``min_text_length``
words is skipped; after ``max_tries`` (51: the official counter is checked against 50 after each
try) the sample stays as it was.

Similarity = (Jaccard + cosine) / 2 of the two raw strings (before ``clean_string``: case, spaces
and punctuation count) as *multisets of characters*, which is what the official
``textdistance.jaccard`` and ``textdistance.cosine`` compute with their defaults (qval=1,
as_set=False): with character counts c_a, c_b,

    Jaccard = sum(min(c_a, c_b)) / sum(max(c_a, c_b)),    cosine = sum(min(c_a, c_b)) / sqrt(|a| |b|).

Identical strings give 1 and a comparison with an empty string gives 0 (textdistance's quick answers).

Two deliberate differences from the official code:

* the drawn image must differ from the sample's own image. The official code intends this but
  compares a JSON string key with an integer id, so the check never fires; on gRefCOCO the chance
  of drawing the own image is negligible, on a small dataset it would turn referring expressions
  into false "no target" samples;
* the conversion returns a new expression instead of rewriting the annotation in place, so a
  converted sample is not left converted for later epochs (with persistent workers the official
  negative rate drifts upwards).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class NSCConfig:
    """The official NSC settings (``rate``, tries, ``simlarity_threshold``, ``min_text_length``)."""

    rate: float = 0.15
    max_tries: int = 51
    similarity_threshold: float = 0.6
    min_text_length: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"NSC rate must be in [0, 1], got {self.rate}")
        if self.max_tries < 1:
            raise ValueError(f"NSC max_tries must be >= 1, got {self.max_tries}")


def _quick_answer(a: str, b: str) -> float | None:
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    return None


def jaccard_similarity(a: str, b: str) -> float:
    """Character-multiset Jaccard index (``textdistance.jaccard.similarity``)."""
    quick = _quick_answer(a, b)
    if quick is not None:
        return quick
    ca, cb = Counter(a), Counter(b)
    return sum((ca & cb).values()) / sum((ca | cb).values())


def cosine_similarity(a: str, b: str) -> float:
    """Character-multiset Ochiai coefficient (``textdistance.cosine.similarity``)."""
    quick = _quick_answer(a, b)
    if quick is not None:
        return quick
    return sum((Counter(a) & Counter(b)).values()) / math.sqrt(len(a) * len(b))


def nsc_similarity(a: str, b: str) -> float:
    """The official ``evaluate_similarity``: the mean of the two (not "2 Jac + Cos" as the paper reads)."""
    return (jaccard_similarity(a, b) + cosine_similarity(a, b)) / 2


def convert_to_non_referent(
    image_id: int,
    expression: str,
    has_target: bool,
    pool: Mapping[int, Sequence[str]],
    rng: random.Random,
    config: NSCConfig = NSCConfig(),
) -> str | None:
    """The replacement expression if this sample is converted to a no-target sample, else None.

    ``pool`` maps each training image id to its raw expressions (the official ``train_dict.json``);
    ``rng`` supplies the draws in the official order: one ``random()`` for the rate, then per try one
    ``choice`` of image id and one ``choice`` of expression.
    """
    if not has_target or rng.random() > config.rate:
        return None
    image_ids = [i for i in pool if pool[i]]
    if not any(i != image_id for i in image_ids):
        return None
    tries = 0
    while tries < config.max_tries:
        other = rng.choice(image_ids)
        if other == image_id:  # redrawn without counting a try, as the official `continue`
            continue
        tries += 1
        candidate = rng.choice(pool[other])
        long_enough = len(candidate.split()) > config.min_text_length
        if long_enough and nsc_similarity(candidate, expression) < config.similarity_threshold:
            return candidate
    return None
