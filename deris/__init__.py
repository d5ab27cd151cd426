"""deris: the DeRIS referring-segmentation model, faithful to the official code, and its deployment tools."""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from deris.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from deris.config import PRESETS, DerisConfig, get_config
from deris.modeling.deris import DeRIS

__version__ = "0.1.0"


def build_model(preset: str, **overrides: Any) -> DeRIS:
    """A randomly initialised DeRIS for ``preset`` in eval mode; ``overrides`` change config
    fields, e.g. ``query_sa="official_batch"`` or ``score_threshold=0.9``."""
    return DeRIS(get_config(preset, **overrides)).eval()


def from_checkpoint(
    preset: str, checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor], **overrides: Any
) -> DeRIS:
    """Build ``preset`` and load an official or deris-format checkpoint into it, strictly."""
    model = build_model(preset, **overrides)
    load_checkpoint(model, checkpoint)
    return model


__all__ = [
    "PRESETS",
    "CheckpointError",
    "DeRIS",
    "DerisConfig",
    "build_model",
    "from_checkpoint",
    "get_config",
    "load_checkpoint",
    "save_checkpoint",
]
