"""The DeRIS model: cognition (BEiT-3) + perception (Swin + pixel decoder) + loopback decoder + existence head."""

from __future__ import annotations

import torch
from torch import nn

from deris.config import DerisConfig
from deris.modeling.cognition import CognitionEncoder
from deris.modeling.decoder import LoopbackDecoder
from deris.modeling.existence import ExistenceHead
from deris.modeling.pixel_decoder import PixelDecoder
from deris.modeling.swin import SwinTransformer
from deris.postprocess import upsample_masks


class PerceptionEncoder(nn.Module):
    def __init__(self, cfg: DerisConfig) -> None:
        super().__init__()
        self.swin = SwinTransformer(cfg.swin)
        self.pixel_decoder = PixelDecoder(cfg)

    def forward(self, img: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """img [B,3,H,W] (H, W multiples of 32) -> ([maps at strides 32, 16, 8], mask features [B,C,H/4,W/4])."""
        h, w = img.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"the perception branch takes images whose sides are multiples of 32, got {h}x{w}")
        return self.pixel_decoder(self.swin(img))


class DeRIS(nn.Module):
    def __init__(self, cfg: DerisConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.cognition = CognitionEncoder(cfg)
        self.perception = PerceptionEncoder(cfg)
        self.decoder = LoopbackDecoder(cfg)
        self.existence = ExistenceHead(cfg)

    @property
    def query_sa(self) -> str:
        return self.decoder.query_sa_mode

    def forward(
        self,
        img: torch.Tensor,
        img_mini: torch.Tensor,
        token_ids: torch.Tensor,
        text_pad_mask: torch.Tensor,
        return_rounds: bool = False,
    ) -> dict[str, torch.Tensor | list[dict[str, torch.Tensor]]]:
        """Exactly the official inputs: img [B,3,H,W] and img_mini [B,3,224,224] normalised, token_ids
        [B,L] int64, text_pad_mask [B,L] (1 = padding).

        Returns ``pred_masks`` [B,N,H,W] (logits), ``pred_masks_lowres`` [B,N,H/4,W/4],
        ``pred_refer_logits`` [B,N,2], ``pred_existence`` [B,1] (logit), ``query_feat`` [B,N,C],
        and with ``return_rounds`` the per-round intermediates under ``rounds``.
        """
        if token_ids.shape != text_pad_mask.shape:
            raise ValueError(f"token_ids {tuple(token_ids.shape)} and text_pad_mask {tuple(text_pad_mask.shape)} differ in shape")
        if img.shape[0] != img_mini.shape[0] or img.shape[0] != token_ids.shape[0]:
            raise ValueError(
                f"batch sizes differ: img {img.shape[0]}, img_mini {img_mini.shape[0]}, token_ids {token_ids.shape[0]}"
            )
        img_feat, text_feat = self.cognition(img_mini, token_ids, text_pad_mask)
        multi_scale, mask_features = self.perception(img)
        query = self.cognition.initial_queries().unsqueeze(0).expand(img.shape[0], -1, -1)
        rounds: list[dict[str, torch.Tensor]] | None = [] if return_rounds else None
        query, mask_logits, refer_logits = self.decoder(
            multi_scale, mask_features, img_feat, text_feat, text_pad_mask, query, rounds
        )
        existence, _ = self.existence(query, text_feat, text_pad_mask)
        out: dict[str, torch.Tensor | list[dict[str, torch.Tensor]]] = {
            "pred_masks": upsample_masks(mask_logits),
            "pred_masks_lowres": mask_logits,
            "pred_refer_logits": refer_logits,
            "pred_existence": existence,
            "query_feat": query,
        }
        if rounds is not None:
            out["rounds"] = rounds
        return out
