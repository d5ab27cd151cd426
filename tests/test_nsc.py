"""NSC: the character-multiset similarity against hand-worked values, and the conversion's filters."""

from __future__ import annotations

import math
import random

import pytest

from deris.training.nsc import NSCConfig, convert_to_non_referent, cosine_similarity, jaccard_similarity, nsc_similarity


@pytest.mark.parametrize(
    "a, b, jaccard, cosine",
    [
        # {a:1, b:1} vs {a:1, b:2}: min-sum 2, max-sum 3, lengths 2 and 3
        ("ab", "abb", 2 / 3, 2 / math.sqrt(6)),
        # case counts: R != r; shared e, d
        ("Red", "red", 2 / 4, 2 / 3),
        # spaces are characters: {a, ' ', b} vs {a, b}
        ("a b", "ab", 2 / 3, 2 / math.sqrt(6)),
        # punctuation too, and repeated letters as a multiset: {l:2, e:1, f:1, t:1, !:1} vs {l:1, e:1, f:1, t:1}
        ("left!l", "left", 4 / 6, 4 / math.sqrt(24)),
        # nothing shared
        ("abc", "xyz", 0.0, 0.0),
        # textdistance's quick answers: identical -> 1, one side empty -> 0
        ("same", "same", 1.0, 1.0),
        ("", "", 1.0, 1.0),
        ("", "red", 0.0, 0.0),
    ],
)
def test_similarities_by_hand(a, b, jaccard, cosine):
    assert jaccard_similarity(a, b) == pytest.approx(jaccard)
    assert cosine_similarity(a, b) == pytest.approx(cosine)
    assert nsc_similarity(a, b) == pytest.approx((jaccard + cosine) / 2)
    assert nsc_similarity(b, a) == pytest.approx(nsc_similarity(a, b))


def test_similarity_is_the_mean_not_two_jaccard_plus_cosine():
    # "ab" vs "abb": (2/3 + 0.8165) / 2 = 0.7416; the paper's "2 Jac + Cos" would give 2.15
    assert nsc_similarity("ab", "abb") == pytest.approx(0.74158, abs=1e-5)


def test_a_real_pair_of_expressions_by_hand():
    # "red circle" {r:2, e:2, d:1, ' ':1, c:2, i:1, l:1} (10 chars) vs "blue square"
    # {b:1, l:1, u:2, e:2, ' ':1, s:1, q:1, a:1, r:1} (11 chars): shared min-counts r1 e2 ' '1 l1 = 5,
    # union max-counts 16 -> Jaccard 5/16, cosine 5/sqrt(110), mean 0.3946 (< 0.6: accepted)
    expected = (5 / 16 + 5 / math.sqrt(110)) / 2
    assert nsc_similarity("red circle", "blue square") == pytest.approx(expected)
    assert expected < 0.6


class ScriptedRandom(random.Random):
    """random() and choice() return scripted values, in order, and record every choice made."""

    def __init__(self, randoms: list[float], choices: list[object]) -> None:
        super().__init__(0)
        self.randoms = list(randoms)
        self.choices = list(choices)
        self.calls = 0

    def random(self) -> float:
        return self.randoms.pop(0)

    def choice(self, seq):  # type: ignore[no-untyped-def]
        self.calls += 1
        value = self.choices.pop(0)
        assert value in seq
        return value


POOL = {1: ["the red circle"], 2: ["big blue square", "x"], 3: ["the red circles"]}


def test_samples_without_target_are_never_converted_and_draw_nothing():
    rng = ScriptedRandom([], [])
    assert convert_to_non_referent(1, "the red circle", False, POOL, rng) is None
    assert rng.calls == 0


def test_rate_is_random_le_rate():
    assert convert_to_non_referent(1, "the red circle", True, POOL, ScriptedRandom([0.1501], [])) is None
    rng = ScriptedRandom([0.15], [2, "big blue square"])
    assert convert_to_non_referent(1, "the red circle", True, POOL, rng) == "big blue square"


def test_own_image_is_redrawn_without_counting_a_try():
    cfg = NSCConfig(max_tries=1)
    rng = ScriptedRandom([0.0], [1, 1, 2, "big blue square"])
    assert convert_to_non_referent(1, "the red circle", True, POOL, rng, cfg) == "big blue square"


def test_similar_and_too_short_expressions_are_rejected():
    # "the red circles" is too similar (>= 0.6) to "the red circle"; "x" has 1 word, not > min_text_length=1
    assert nsc_similarity("the red circles", "the red circle") >= 0.6
    cfg = NSCConfig(min_text_length=1)
    rng = ScriptedRandom([0.0], [3, "the red circles", 2, "x", 2, "big blue square"])
    assert convert_to_non_referent(1, "the red circle", True, POOL, rng, cfg) == "big blue square"


def test_gives_up_after_51_tries():
    pool = {1: ["the red circle"], 3: ["the red circles"]}
    rng = ScriptedRandom([0.0], [3, "the red circles"] * 60)
    assert convert_to_non_referent(1, "the red circle", True, pool, rng) is None
    assert rng.calls == 2 * 51


def test_a_pool_with_only_the_own_image_gives_up_at_once():
    assert convert_to_non_referent(1, "the red circle", True, {1: ["a b"]}, ScriptedRandom([0.0], [])) is None


def test_config_is_official_and_validated():
    assert NSCConfig() == NSCConfig(rate=0.15, max_tries=51, similarity_threshold=0.6, min_text_length=0)
    with pytest.raises(ValueError):
        NSCConfig(rate=1.5)
