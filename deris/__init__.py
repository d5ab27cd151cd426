"""deris: the DeRIS referring-segmentation model, faithful to the official code, and its deployment tools.

Importing ``deris`` is cheap and needs neither torch nor the model: the names below are loaded on
first use (PEP 562), so the Triton client and the server's pre/post-processing models, which only
need ``deris.prediction``, ``deris.preprocess`` or ``deris.text``, never pull in torch or Triton.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "PRESETS": "deris.config",
    "DerisConfig": "deris.config",
    "get_config": "deris.config",
    "CheckpointError": "deris.checkpoint",
    "load_checkpoint": "deris.checkpoint",
    "save_checkpoint": "deris.checkpoint",
    "DeRIS": "deris.modeling.deris",
    "build_model": "deris.model_zoo",
    "from_checkpoint": "deris.model_zoo",
}

if TYPE_CHECKING:
    from deris.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from deris.config import PRESETS, DerisConfig, get_config
    from deris.model_zoo import build_model, from_checkpoint
    from deris.modeling.deris import DeRIS


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deris' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


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
