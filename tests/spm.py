"""Train a small sentencepiece model for tests (the real beit3.spm cannot be downloaded in tests)."""

from __future__ import annotations

import itertools
from pathlib import Path

from deris import text

_SUBJECTS = [
    "man", "woman", "person", "guy", "girl", "boy", "child", "player", "skier", "surfer",
    "dog", "cat", "horse", "elephant", "giraffe", "zebra", "sheep", "cow", "bird", "bear",
    "car", "truck", "bus", "train", "bike", "motorcycle", "boat", "plane", "chair", "couch",
    "table", "bed", "bench", "umbrella", "kite", "laptop", "phone", "vase", "clock", "pizza",
]
_ATTRIBUTES = [
    "red", "blue", "green", "white", "black", "yellow", "brown", "gray", "orange", "pink",
    "small", "large", "tall", "short", "old", "young", "striped", "spotted", "wooden", "empty",
]
_PLACES = [
    "on the left", "on the right", "in the middle", "in front", "in the back", "at the top",
    "at the bottom", "near the window", "next to the door", "behind the fence", "under the tree",
    "closest to us", "farthest away", "partially hidden", "sitting down", "standing up",
    "holding a bag", "wearing a hat", "with glasses", "looking at the camera",
]

# Referring expressions in RefCOCO style, in a fixed order so that training is deterministic.
CORPUS = [
    f"{attribute} {subject} {place}"
    for subject, attribute, place in itertools.islice(
        zip(itertools.cycle(_SUBJECTS), itertools.cycle(_ATTRIBUTES), itertools.cycle(_PLACES)), 400
    )
] + [" ".join(pair) for pair in itertools.product(_ATTRIBUTES, _SUBJECTS)]


def train_sentencepiece(out_dir: str | Path) -> Path:
    """A unigram sentencepiece model of the corpus above with beit3.spm's special layout (``<unk>``=0,
    ``<s>``=1, ``</s>``=2, no pad piece; about 200 pieces) at ``out_dir/beit3.spm``."""
    return text.train_sentencepiece(CORPUS, Path(out_dir) / "beit3.spm", vocab_size=200)
