"""Build a preset, optionally with a checkpoint: the two entry points ``deris.build_model`` and
``deris.from_checkpoint``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from deris.checkpoint import load_checkpoint
from deris.config import get_config
from deris.modeling.deris import DeRIS


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
