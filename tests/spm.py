"""Train a small sentencepiece model for tests (the real beit3.spm cannot be downloaded in tests)."""

from __future__ import annotations

import itertools
from pathlib import Path

import sentencepiece

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
    """Train a unigram sentencepiece model with beit3.spm's special layout; return ``out_dir/beit3.spm``.

    Layout as XLM-R / BEiT-3: ``<unk>``=0, ``<s>``=1, ``</s>``=2, no pad piece. About 200 pieces
    (``hard_vocab_limit=False`` lets the trainer stop earlier on this small corpus). Single-threaded,
    so the model is the same on every run.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / "beit3"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(prefix),
        model_type="unigram",
        vocab_size=200,
        hard_vocab_limit=False,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    model = prefix.with_suffix(".model")
    spm_path = out_dir / "beit3.spm"
    model.replace(spm_path)
    prefix.with_suffix(".vocab").unlink()
    return spm_path
