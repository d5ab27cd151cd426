"""Text preprocessing: clean_string, the BEiT-3 XLM-R tokenizer ids and the token sequence layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The tokenizer must build from a local file only; make any hub access fail loudly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import sentencepiece  # noqa: E402
from golden import case_params, require_case  # noqa: E402
from spm import CORPUS, train_sentencepiece  # noqa: E402

from deris.text import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    TextEncoder,
    TextError,
    TokenizerError,
    build_token_sequence,
    clean_string,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def processor(spm_path: Path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(spm_path))


@pytest.fixture(scope="module")
def encoder(spm_path: Path) -> TextEncoder:
    return TextEncoder.from_spm(spm_path, max_length=20)


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("The Man on the LEFT", "the man on the left"),
        ("man's hat, (left)!", "mans hat left"),
        ('a "big" dog?', "a big dog"),
        ("x.y,z'a!b?c\"d(e)f*g#h:i;j", "xyzabcdefghij"),
        ("black-and-white", "black and white"),
        ("left/right", "left right"),
        ("  two  spaces ", "  two  spaces "),  # whitespace is left to the tokenizer
        ("50% & more_stuff [x] {y}", "50% & more_stuff [x] {y}"),
        ("CAFÉ", "café"),
        ("...!?", ""),
    ],
)
def test_clean_string(raw: str, cleaned: str) -> None:
    assert clean_string(raw) == cleaned


def test_tokenizer_uses_fairseq_ids(spm_path: Path, processor: sentencepiece.SentencePieceProcessor) -> None:
    tokenizer = load_tokenizer(spm_path)
    num_pieces = processor.get_piece_size()
    assert num_pieces > 100
    assert len(tokenizer) == num_pieces + 2
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        BOS_ID,
        PAD_ID,
        EOS_ID,
        UNK_ID,
    )
    assert tokenizer.mask_token_id == num_pieces + 1
    for piece_id in range(3, num_pieces):
        assert tokenizer.convert_tokens_to_ids(processor.id_to_piece(piece_id)) == piece_id + 1


@pytest.mark.parametrize(
    "text",
    [
        *CORPUS[::97],
        "the man on the left",
        "Zebra, behind the fence!",
        "quirky unseen wörds 😀",
        "a\ttab  and\nnewline",
    ],
)
def test_ids_are_sentencepiece_ids_plus_one(
    encoder: TextEncoder, processor: sentencepiece.SentencePieceProcessor, text: str
) -> None:
    cleaned = clean_string(text)
    # sentencepiece's unknown id 0 is the fairseq <unk> (3), every other piece is shifted by one.
    expected = [UNK_ID if piece_id == 0 else piece_id + 1 for piece_id in processor.encode(cleaned)]
    assert encoder.piece_ids(text) == expected
    assert encoder.tokenizer.encode(cleaned, add_special_tokens=False) == expected


def test_unknown_characters_map_to_unk(encoder: TextEncoder) -> None:
    assert UNK_ID in encoder.piece_ids("the dog ü")


def test_encode_layout(encoder: TextEncoder) -> None:
    pieces = encoder.piece_ids("The man, on the left.")
    ids, mask = encoder.encode("The man, on the left.")
    n = len(pieces) + 2
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.shape == mask.shape == (20,)
    assert ids.tolist() == [BOS_ID, *pieces, EOS_ID] + [PAD_ID] * (20 - n)
    assert mask.tolist() == [0] * n + [1] * (20 - n)


def test_encode_accepts_utf8_bytes(encoder: TextEncoder) -> None:
    for got, want in zip(encoder.encode(b"red car"), encoder.encode("red car")):
        np.testing.assert_array_equal(got, want)


def test_truncation(encoder: TextEncoder) -> None:
    text = " ".join(["the red car on the left"] * 10)
    pieces = encoder.piece_ids(text)
    assert len(pieces) > 18
    ids, mask = encoder.encode(text)
    assert ids.tolist() == [BOS_ID, *pieces[:18], EOS_ID]
    assert mask.tolist() == [0] * 20
    assert encoder.dropped(text) == len(pieces) - 18 and encoder.dropped("red car") == 0


def test_encode_batch(encoder: TextEncoder) -> None:
    texts = ["red car", "the tall man standing on the right", "dog"]
    ids, mask = encoder.encode_batch(texts)
    assert ids.shape == mask.shape == (3, 20)
    for row, text in enumerate(texts):
        single_ids, single_mask = encoder.encode(text)
        np.testing.assert_array_equal(ids[row], single_ids)
        np.testing.assert_array_equal(mask[row], single_mask)
    with pytest.raises(TextError, match="sequence of texts"):
        encoder.encode_batch("red car")
    with pytest.raises(TextError, match="no texts"):
        encoder.encode_batch([])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "text is empty: ''"),
        ("   \n", "text is empty"),
        ("?!...", r"no tokens after cleaning.*'\?!\.\.\.'"),
        (None, "must be a str.*NoneType"),
        (42, "must be a str.*int"),
        (b"\xff\xfe bad", "not valid UTF-8"),
    ],
)
def test_bad_text_rejected(encoder: TextEncoder, text: object, message: str) -> None:
    with pytest.raises(TextError, match=message):
        encoder.encode(text)  # type: ignore[arg-type]


def test_sequence_builder_edge_cases() -> None:
    with pytest.raises(TextError, match="no tokens"):
        build_token_sequence([], 20)
    with pytest.raises(ValueError, match="at least 3"):
        build_token_sequence([5], 2)
    ids, mask = build_token_sequence([7, 8, 9], 4)
    assert ids.tolist() == [BOS_ID, 7, 8, EOS_ID] and mask.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("npz_path", case_params())
def test_golden_token_layout(npz_path: Path | None) -> None:
    npz_path = require_case(npz_path)
    meta = json.loads(npz_path.with_suffix(".json").read_text())
    golden = np.load(npz_path)
    ref_ids, ref_mask = golden["in_ref_expr_inds"], golden["in_text_attention_mask"]
    max_length = ref_ids.shape[1]
    assert meta["special_ids"] == {"bos": BOS_ID, "pad": PAD_ID, "eos": EOS_ID}
    for row, length in enumerate(meta["text_lengths_incl_bos_eos"]):
        expected_mask = np.array([0] * length + [1] * (max_length - length), dtype=np.int64)
        np.testing.assert_array_equal(ref_mask[row], expected_mask)
        inner = ref_ids[row, 1 : length - 1].tolist()
        ids, mask = build_token_sequence(inner, max_length)
        np.testing.assert_array_equal(ids, ref_ids[row])
        np.testing.assert_array_equal(mask, ref_mask[row])
        assert ids.dtype == ref_ids.dtype and mask.dtype == ref_mask.dtype


def test_missing_spm_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "beit3.spm"
    with pytest.raises(TokenizerError, match=r"not found.*nowhere.*beit3\.spm"):
        load_tokenizer(missing)


@pytest.mark.parametrize("content", [b"", b"definitely not a sentencepiece model" * 10])
def test_corrupt_spm_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "beit3.spm"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match=r"is not a sentencepiece model.*beit3\.spm"):
        load_tokenizer(path)


def test_spm_without_fairseq_layout(tmp_path: Path) -> None:
    # A model without <s>/</s> at ids 1, 2 cannot give the official ids.
    prefix = tmp_path / "plain"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS[:200]),
        model_prefix=str(prefix),
        vocab_size=60,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    with pytest.raises(TokenizerError, match="without the <unk>, <s>, </s> pieces"):
        load_tokenizer(prefix.with_suffix(".model"))


def test_encoder_rejects_short_max_length(spm_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 3"):
        TextEncoder.from_spm(spm_path, max_length=2)
