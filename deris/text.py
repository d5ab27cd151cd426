"""Text input path: clean a referring expression and turn it into BEiT-3 token ids and a padding mask.

As the official pipeline (docs/model.md, "Inputs"), checked against the source of the official loaders
``LoadImageAnnotationsFromFile_TO`` / ``LoadImageAnnotationsFromFileGRES_TO`` (``_load_expression_tokenize_beit3``,
read from the public code index):

* ``clean_string``: ``re.sub(r"[.,'!?\\"()*#:;]", "", text.lower())`` then ``-`` and ``/`` become spaces;
  whitespace is not collapsed there (the tokenizer splits on whitespace anyway).
* ``tokens = tokenizer.tokenize(expression); ids = tokenizer.convert_tokens_to_ids(tokens)`` with
  ``XLMRobertaTokenizer("pretrain_weights/beit3.spm")`` (transformers 4, sentencepiece-backed). We make the
  same two calls; with transformers 5 they give the same ids as ``encode(..., add_special_tokens=False)``.
  As there, special-token strings typed in the text (``<s>``, ``<mask>``...) are matched as special tokens.
* an empty token list is an error; ids are truncated to L-2, framed as ``[0] + ids + [2]`` and right-padded
  with 1; the padding mask is 0 for the real tokens (bos/eos included) and 1 for padding.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import sentencepiece
from transformers import XLMRobertaTokenizer

from deris.atomic import atomic_write

# fairseq / XLM-R ids used by BEiT-3; every other sentencepiece piece id p maps to p + 1.
BOS_ID = 0
PAD_ID = 1
EOS_ID = 2
UNK_ID = 3

_DELETED_CHARS = re.compile(r"[.,'!?\"()*#:;]")
_EXPECTED_MODEL = "the BEiT-3 sentencepiece model beit3.spm (from the BEiT-3 release) is expected"


class TextError(ValueError):
    """A text input that cannot be encoded; the message says why and shows the text."""


class TokenizerError(ValueError):
    """The tokenizer model file is missing or is not a usable BEiT-3 sentencepiece model."""


def clean_string(text: str) -> str:
    """Official ``clean_string``: lowercase, delete ``. , ' ! ? " ( ) * # : ;``, turn ``-`` and ``/`` into spaces."""
    return _DELETED_CHARS.sub("", text.lower()).replace("-", " ").replace("/", " ")


def load_tokenizer(spm_path: str | Path) -> XLMRobertaTokenizer:
    """Build the BEiT-3 XLM-R tokenizer from a ``beit3.spm`` sentencepiece model, offline.

    The result gives fairseq ids: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, and sentencepiece
    id + 1 for every normal piece (``len(tokenizer)`` = pieces + 2, the last id being ``<mask>``).
    Raises TokenizerError if the file is missing, is not a sentencepiece model, or does not have the
    ``<unk>, <s>, </s>`` layout at sentencepiece ids 0..2 that the fairseq mapping assumes.
    """
    path = Path(spm_path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer model not found: {path}; {_EXPECTED_MODEL}")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (RuntimeError, OSError) as exc:
        raise TokenizerError(f"{path} is not a sentencepiece model ({exc}); {_EXPECTED_MODEL}") from exc
    num_pieces = processor.get_piece_size()
    # The XLM-R conversion replaces sentencepiece ids 0..2 by the four fairseq specials; any normal
    # piece there would be lost and the official ids could not be reproduced.
    if num_pieces < 4 or processor.unk_id() != 0 or not all(processor.is_control(i) for i in (1, 2)):
        raise TokenizerError(
            f"{path} is a sentencepiece model without the <unk>, <s>, </s> pieces at ids 0, 1, 2 "
            f"(unk_id={processor.unk_id()}, {num_pieces} pieces); {_EXPECTED_MODEL}"
        )

    # transformers 5 ignores XLMRobertaTokenizer(vocab_file=...) (it silently builds a 5-token vocab);
    # from_pretrained on a folder holding the model as "sentencepiece.bpe.model" converts it properly,
    # normalizer (precompiled charsmap) included. local_files_only keeps it offline.
    with tempfile.TemporaryDirectory(prefix="deris_spm_") as folder:
        shutil.copyfile(path, Path(folder) / "sentencepiece.bpe.model")
        try:
            tokenizer = XLMRobertaTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # conversion errors come from protobuf, sentencepiece or tokenizers
            raise TokenizerError(f"could not build the XLM-R tokenizer from {path}: {exc}") from exc

    specials = (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    first_piece_id = tokenizer.convert_tokens_to_ids(processor.id_to_piece(3))
    if len(tokenizer) != num_pieces + 2 or specials != (BOS_ID, PAD_ID, EOS_ID, UNK_ID) or first_piece_id != 4:
        raise TokenizerError(
            f"the tokenizer built from {path} does not use the fairseq ids (vocabulary {len(tokenizer)} for "
            f"{num_pieces} pieces, bos/pad/eos/unk {specials}, first piece {first_piece_id}); "
            "check that transformers is the pinned version (docs/deployment.md, \"The pinned stack\")"
        )
    return tokenizer


def build_token_sequence(piece_ids: Sequence[int], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame tokenizer ids as the model input: ``[0] + ids[:L-2] + [2] + [1]*pad`` and its padding mask.

    Returns ``(token_ids, pad_mask)``, both int64 [L]; ``pad_mask`` is 0 for the real tokens
    (bos and eos included) and 1 for padding. Raises TextError for an empty id list.
    """
    if max_length < 3:
        raise ValueError(f"max_length must be at least 3 (bos, one token, eos), got {max_length}")
    if len(piece_ids) == 0:
        raise TextError("the text has no tokens; at least one is needed")
    tokens = [BOS_ID, *piece_ids[: max_length - 2], EOS_ID]
    num_pad = max_length - len(tokens)
    token_ids = np.array(tokens + [PAD_ID] * num_pad, dtype=np.int64)
    pad_mask = np.array([0] * len(tokens) + [1] * num_pad, dtype=np.int64)
    return token_ids, pad_mask


def train_sentencepiece(corpus: Iterable[str], out: str | Path, vocab_size: int) -> Path:
    """Train a unigram sentencepiece model on ``corpus`` with beit3.spm's piece layout (``<unk>``=0,
    ``<s>``=1, ``</s>``=2, no pad piece) into ``out``; single-threaded, so the same bytes on every run.

    ``vocab_size`` is an upper bound (``hard_vocab_limit=False``): a small corpus stops earlier.
    """
    from sentencepiece import sentencepiece_model_pb2

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="deris_spm_") as folder:
        prefix = Path(folder) / out.stem
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_prefix=str(prefix), model_type="unigram", vocab_size=vocab_size,
            hard_vocab_limit=False, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=1, minloglevel=2,
        )
        model = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]  # generated protobuf code, no stubs
        model.ParseFromString(prefix.with_suffix(".model").read_bytes())
    # The model records its training prefix; the temporary folder's name would change the bytes.
    model.trainer_spec.model_prefix = out.stem
    return atomic_write(out, model.SerializeToString())


class TextEncoder:
    """Encodes referring expressions into fixed-length token ids and padding masks.

    ``max_length`` is the model's ``max_token`` L (20 for the RefCOCO configs, 50 for gRefCOCO).
    """

    def __init__(self, tokenizer: XLMRobertaTokenizer, max_length: int) -> None:
        if max_length < 3:
            raise ValueError(f"max_length must be at least 3 (bos, one token, eos), got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_spm(cls, spm_path: str | Path, max_length: int) -> TextEncoder:
        """Load the tokenizer from ``beit3.spm`` (see ``load_tokenizer``)."""
        return cls(load_tokenizer(spm_path), max_length)

    def piece_ids(self, text: str | bytes) -> list[int]:
        """Cleaned and tokenized ids of ``text`` without bos/eos and before truncation.

        ``text`` is a str or UTF-8 bytes. Raises TextError for other types, invalid UTF-8, and for
        text that is empty or has no tokens after cleaning.
        """
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TextError(f"text bytes are not valid UTF-8 ({exc}); send UTF-8 encoded text") from exc
        if not isinstance(text, str):
            raise TextError(f"text must be a str (or UTF-8 bytes), got {type(text).__name__}")
        if not text.strip():
            raise TextError(f"text is empty: {text!r}; a referring expression is needed")
        # A list of tokens gives a list of ids.
        ids = cast(list[int], self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(clean_string(text))))
        if not ids:
            raise TextError(f"text has no tokens after cleaning (punctuation is removed): {text!r}")
        return ids

    def dropped(self, text: str | bytes) -> int:
        """How many of ``text``'s tokens the truncation to L - 2 drops (0 when it fits)."""
        return max(0, len(self.piece_ids(text)) - (self.max_length - 2))

    def encode(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray]:
        """Encode one expression: ``(token_ids, pad_mask)``, int64 [L] each; over-long text is truncated."""
        return build_token_sequence(self.piece_ids(text), self.max_length)

    def encode_batch(self, texts: Sequence[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Encode several expressions: ``(token_ids, pad_mask)``, int64 [B,L] each."""
        if isinstance(texts, (str, bytes)):
            raise TextError("encode_batch takes a sequence of texts; use encode for a single text")
        if len(texts) == 0:
            raise TextError("encode_batch got no texts")
        encoded = [self.encode(text) for text in texts]
        return np.stack([ids for ids, _ in encoded]), np.stack([mask for _, mask in encoded])
