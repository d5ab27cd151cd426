"""Deterministic synthetic weights keyed by official state_dict names (``shared/golden/WEIGHTS_RULE.md``).

The golden cases were produced by the official code with these weights, so a converter and model
that reproduce the golden outputs from them map every official tensor to the right place.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

# Keys whose value is the model's own (integer index buffers and a loss-only constant).
KEEP_MODEL_VALUE_SUFFIXES = ("relative_position_index", "empty_weight")
UNIT_SCALE_SUFFIXES = ("init_query.weight", "query_embed.weight")


def synthetic_tensor(key: str, shape: Iterable[int], salt: str = "") -> torch.Tensor:
    """The rule's float32 tensor for ``key`` with ``shape``."""
    shape = tuple(int(s) for s in shape)
    generator = torch.Generator().manual_seed(zlib.crc32((salt + key).encode("utf-8")))
    z = torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(shape) == 1:
        return 1.0 + 0.1 * z if key.endswith(".weight") else 0.02 * z
    if key.endswith(UNIT_SCALE_SUFFIXES):
        return z
    return z / math.sqrt(math.prod(shape[1:]))


def checksum(tensor: torch.Tensor) -> dict[str, Any]:
    """The manifest's fingerprint: float64 sum, sum of |x| and the first three values."""
    flat = tensor.detach().to(torch.float64).reshape(-1)
    return {"sum": float(flat.sum()), "abs_sum": float(flat.abs().sum()), "first": [float(v) for v in flat[:3]]}


def load_manifest(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def official_state_dict(manifest: dict[str, Any], salt: str = "", model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Every key of an official manifest filled by the rule. Index buffers come from ``model``
    (our own construction; the converter checks them) or are left out when no model is given."""
    from deris.checkpoint import official_to_ours

    buffers = dict(model.named_buffers()) if model is not None else {}
    out: dict[str, torch.Tensor] = {}
    for entry in manifest["state_dict"]:
        key, shape = entry["key"], entry["shape"]
        if key.endswith("empty_weight"):
            out[key] = torch.tensor(entry["model_value"], dtype=torch.float32)
        elif key.endswith(KEEP_MODEL_VALUE_SUFFIXES) or not entry["dtype"].startswith("float"):
            ours = official_to_ours(key)
            if ours in buffers:
                out[key] = buffers[ours].clone()
        else:
            out[key] = synthetic_tensor(key, shape, salt)
    return out
