"""Image + expression -> mask: preprocessing, the model and the official post-processing in one object."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import deris
from deris.modeling.deris import DeRIS
from deris.postprocess import postprocess
from deris.prediction import Prediction, check_threshold
from deris.preprocess import PreparedImage, preprocess_image
from deris.text import TextEncoder

ImageInput = str | os.PathLike[str] | bytes | np.ndarray


class Predictor:
    """Holds a model, a tokenizer and thresholds.

    >>> predictor = Predictor.from_checkpoint("deris-b-grefcoco", "deris_b_grefcoco.pth", "beit3.spm")
    >>> result = predictor.predict("kitchen.jpg", "the cup left of the kettle")
    >>> result.mask.shape == (h0, w0), result.no_target, result.scores
    """

    def __init__(
        self,
        model: DeRIS,
        text_encoder: TextEncoder,
        score_threshold: float | None = None,
        mask_threshold: float | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        cfg = model.cfg
        if text_encoder.max_length != cfg.max_text_len:
            raise ValueError(
                f"the text encoder pads to {text_encoder.max_length} tokens, preset {cfg.name} uses {cfg.max_text_len}"
            )
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.eval().to(self.device)
        self.text_encoder = text_encoder
        self.score_threshold = check_threshold("score_threshold", cfg.score_threshold if score_threshold is None else score_threshold)
        self.mask_threshold = check_threshold("mask_threshold", cfg.mask_threshold if mask_threshold is None else mask_threshold)

    @classmethod
    def from_checkpoint(
        cls,
        preset: str,
        checkpoint: str | os.PathLike[str] | None,
        tokenizer: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        **kwargs: float,
    ) -> Predictor:
        """``checkpoint=None`` keeps random weights (smoke tests only: the masks are meaningless)."""
        model = deris.build_model(preset) if checkpoint is None else deris.from_checkpoint(preset, checkpoint)
        return cls(model, TextEncoder.from_spm(Path(tokenizer), model.cfg.max_text_len), device=device, **kwargs)

    def prepare(self, image: ImageInput) -> PreparedImage:
        return preprocess_image(image, self.model.cfg.image_size, self.model.cfg.mini_image_size)

    @torch.inference_mode()
    def predict_prepared(
        self, images: Sequence[PreparedImage], texts: Sequence[str | bytes], sweep: Sequence[float] = ()
    ) -> list[Prediction]:
        """Run already-preprocessed images with one expression each (same length lists); ``sweep``: also decide
        at these score thresholds (:func:`deris.postprocess.postprocess`)."""
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images and {len(texts)} texts; pass one text per image")
        if not images:
            return []
        token_ids, pad_mask = self.text_encoder.encode_batch(list(texts))
        dev = self.device
        out = self.model(
            torch.from_numpy(np.stack([p.img for p in images])).to(dev),
            torch.from_numpy(np.stack([p.img_mini for p in images])).to(dev),
            torch.from_numpy(token_ids).to(dev),
            torch.from_numpy(pad_mask).to(dev),
        )
        return postprocess(
            out["pred_masks_lowres"],
            out["pred_refer_logits"],
            out["pred_existence"],
            [p.original_size for p in images],
            self.score_threshold,
            self.mask_threshold,
            sweep,
        )

    def predict(self, image: ImageInput, text: str | bytes) -> Prediction:
        """One image (path, encoded bytes, or an RGB uint8 array) and one expression."""
        return self.predict_prepared([self.prepare(image)], [text])[0]

    def predict_batch(self, images: Sequence[ImageInput], texts: Sequence[str | bytes]) -> list[Prediction]:
        """Pairs of images and expressions, run as one batch (results are batch-invariant in
        the default per-sample mode)."""
        return self.predict_prepared([self.prepare(i) for i in images], texts)
