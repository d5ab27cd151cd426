"""DeRIS configurations: plain dataclasses and named presets.

Every number of the official presets comes from the official configs as documented in
the official configs and state_dicts (docs/model.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

QuerySAMode = Literal["per_sample", "official_batch"]
QUERY_SA_MODES: tuple[str, ...] = ("per_sample", "official_batch")


@dataclass(frozen=True)
class BEiT3Config:
    """BEiT-3 multiway encoder of the cognition branch (torchscale 0.3.0 as DeRIS configures it)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    vocab_size: int = 64010
    img_size: int = 224
    patch_size: int = 16
    max_text_positions: int = 1024
    # Training only (stochastic depth, linear over the layers). The official large models train
    # without it: their builder receives the misspelled keyword `rop_path_rate`.
    drop_path_rate: float = 0.1


@dataclass(frozen=True)
class SwinConfig:
    """Swin backbone of the perception branch (the detectron2 "D2Swin" variant)."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    # Training only: stochastic depth stays on in train mode although the weights are frozen (official).
    drop_path_rate: float = 0.3

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of res2..res5."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


@dataclass(frozen=True)
class PixelDecoderConfig:
    """Mask2Former MSDeformAttn pixel decoder (6 deformable encoder layers over res3..res5)."""

    num_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 1024
    num_groups: int = 32


@dataclass(frozen=True)
class DecoderConfig:
    """Masked-attention query decoder with the four loopback rounds."""

    num_layers: int = 3
    num_heads: int = 8
    ffn_dim: int = 2048
    text_attn_ffn_dim: int = 2048
    aligner_layers: int = 3
    aligner_ffn_dim: int = 512
    aligner_dropout: float = 0.1  # training only


@dataclass(frozen=True)
class DerisConfig:
    name: str
    beit3: BEiT3Config
    swin: SwinConfig
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    hidden_dim: int = 256
    num_queries: int = 20
    max_text_len: int = 50
    image_size: int = 384
    score_threshold: float = 0.7
    mask_threshold: float = 0.5
    # "per_sample": batch-invariant serving semantics (= official at batch size 1).
    # "official_batch": the official query_SA that attends across the batch axis.
    query_sa: QuerySAMode = "per_sample"

    @property
    def mini_image_size(self) -> int:
        return self.beit3.img_size

    def replace(self, **overrides: Any) -> DerisConfig:
        """A copy with some fields changed, validated."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            accepted = ", ".join(f.name for f in dataclasses.fields(self))
            raise ValueError(f"unknown config field(s) {unknown}; accepted: {accepted}")
        cfg = dataclasses.replace(self, **overrides)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError for any combination the model cannot build or run."""
        from deris.prediction import check_threshold

        if self.query_sa not in QUERY_SA_MODES:
            raise ValueError(f"query_sa must be one of {QUERY_SA_MODES}, got {self.query_sa!r}")
        if self.image_size <= 0 or self.image_size % 32:
            raise ValueError(f"image_size must be a positive multiple of 32, got {self.image_size}")
        for name in ("score_threshold", "mask_threshold"):
            check_threshold(name, getattr(self, name))
        if self.max_text_len < 3:
            raise ValueError(f"max_text_len must be >= 3 (bos, one token, eos), got {self.max_text_len}")
        if self.max_text_len + 2 > self.beit3.max_text_positions:
            raise ValueError(f"max_text_len {self.max_text_len} exceeds BEiT-3's {self.beit3.max_text_positions - 2} text positions")
        positive = {
            "num_queries": self.num_queries,
            "hidden_dim": self.hidden_dim,
            "decoder.num_layers": self.decoder.num_layers,
            "pixel_decoder.num_layers": self.pixel_decoder.num_layers,
            "pixel_decoder.num_points": self.pixel_decoder.num_points,
            "decoder.aligner_layers": self.decoder.aligner_layers,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        # The pixel decoder reads res2..res5: exactly four Swin stages.
        if len(self.swin.depths) != 4 or len(self.swin.num_heads) != 4:
            raise ValueError(f"swin needs 4 stages (res2..res5), got depths {self.swin.depths} and heads {self.swin.num_heads}")
        divisible = [
            ("beit3.embed_dim", self.beit3.embed_dim, "beit3.num_heads", self.beit3.num_heads),
            ("hidden_dim", self.hidden_dim, "decoder.num_heads", self.decoder.num_heads),
            ("hidden_dim", self.hidden_dim, "pixel_decoder.num_heads", self.pixel_decoder.num_heads),
            ("hidden_dim", self.hidden_dim, "pixel_decoder.num_groups", self.pixel_decoder.num_groups),
            # the 2-D sine encoding splits the channels between y and x
            ("hidden_dim", self.hidden_dim, "2", 2),
            ("beit3.img_size", self.beit3.img_size, "beit3.patch_size", self.beit3.patch_size),
        ]
        divisible += [
            (f"swin stage {i} width", width, f"swin.num_heads[{i}]", heads)
            for i, (width, heads) in enumerate(zip(self.swin.channels, self.swin.num_heads))
        ]
        rates = {"beit3.drop_path_rate": self.beit3.drop_path_rate, "swin.drop_path_rate": self.swin.drop_path_rate,
                 "decoder.aligner_dropout": self.decoder.aligner_dropout}
        for name, rate in rates.items():
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        for name, value, by_name, by in divisible:
            if by < 1 or value % by:
                raise ValueError(f"{name} ({value}) must be divisible by {by_name} ({by})")


BEIT3_BASE = BEiT3Config(embed_dim=768, depth=12, num_heads=12, ffn_dim=3072)
BEIT3_LARGE = BEiT3Config(embed_dim=1024, depth=24, num_heads=16, ffn_dim=4096, drop_path_rate=0.0)
SWIN_S = SwinConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7)
SWIN_B_384 = SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12)

# Score thresholds are the official configs' values. Note: the official tools/test.py overrides
# them with its CLI default 0.7, which is how the README's RefCOCO numbers were evaluated.
PRESETS: dict[str, DerisConfig] = {
    "deris-b-grefcoco": DerisConfig(
        "deris-b-grefcoco", BEIT3_BASE, SWIN_S, num_queries=20, max_text_len=50, score_threshold=0.7
    ),
    "deris-b-refcoco": DerisConfig(
        "deris-b-refcoco", BEIT3_BASE, SWIN_S, num_queries=10, max_text_len=20, score_threshold=0.9
    ),
    "deris-l-grefcoco": DerisConfig(
        "deris-l-grefcoco", BEIT3_LARGE, SWIN_B_384, num_queries=20, max_text_len=50, score_threshold=0.9
    ),
    "deris-l-refcoco": DerisConfig(
        "deris-l-refcoco", BEIT3_LARGE, SWIN_B_384, num_queries=10, max_text_len=20, score_threshold=0.9
    ),
    # Same architecture at toy widths and depths, for fast tests; every code path is exercised
    # (Swin padding at every stage with window 7, shifted windows, 3 levels, 4 loopback rounds).
    "deris-tiny": DerisConfig(
        "deris-tiny",
        BEiT3Config(embed_dim=64, depth=2, num_heads=2, ffn_dim=128),
        SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7),
        PixelDecoderConfig(num_layers=2, num_heads=4, num_points=2, ffn_dim=128, num_groups=8),
        DecoderConfig(ffn_dim=128, text_attn_ffn_dim=128, aligner_layers=2, aligner_ffn_dim=64),
        hidden_dim=64,
        num_queries=5,
        max_text_len=16,
        image_size=128,
        score_threshold=0.5,
    ),
    # The demo model shipped in deris/assets (deris.demo): the same architecture at small widths, trained
    # from scratch on CPU on the synthetic scenes (deris.scenes) with a grammar tokenizer of 54 ids
    # (52 pieces + 2) and at most 9 tokens an expression. 192 px keeps the 1/4-resolution mask
    # features at 48 x 48; window 6 tiles Swin's 48/24/12/6 grids without padding.
    "deris-demo": DerisConfig(
        "deris-demo",
        BEiT3Config(embed_dim=128, depth=3, num_heads=4, ffn_dim=256, vocab_size=54, img_size=128,
                    max_text_positions=16, drop_path_rate=0.0),
        SwinConfig(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=6, drop_path_rate=0.0),
        PixelDecoderConfig(num_layers=2, num_heads=4, num_points=4, ffn_dim=256, num_groups=8),
        DecoderConfig(num_heads=4, ffn_dim=256, text_attn_ffn_dim=256, aligner_layers=2, aligner_ffn_dim=128),
        hidden_dim=64,
        num_queries=8,
        max_text_len=12,
        image_size=192,
        score_threshold=0.8,  # the best gIoU on the training data's val split (README, "Demo model")
    ),
}

# The official config names used by the golden files and the official repository.
OFFICIAL_NAMES = {
    "DERIS-B-grefcoco": "deris-b-grefcoco",
    "DERIS-B-refcoco": "deris-b-refcoco",
    "DERIS-L-grefcoco": "deris-l-grefcoco",
    "DERIS-L-refcoco": "deris-l-refcoco",
}


def get_config(preset: str, **overrides: Any) -> DerisConfig:
    """The named preset, with optional field overrides (e.g. ``query_sa="official_batch"``)."""
    key = OFFICIAL_NAMES.get(preset, preset)
    if key not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available presets: {', '.join(PRESETS)}")
    cfg = PRESETS[key]
    return cfg.replace(**overrides) if overrides else cfg
