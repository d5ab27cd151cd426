"""Official DeRIS checkpoints <-> this project's modules.

Official checkpoints (``Dmmm1997/DeRIS``, mmcv format: a dict holding ``state_dict``, keys
possibly prefixed ``module.``) are mapped key by key to this project's names. Loading is strict:
every missing, unexpected or mis-shaped key is reported by name in one :class:`CheckpointError`.
Parameters that are dead at inference (docs/model.md, "Checkpoints") are accepted and dropped;
they are listed in :data:`DEAD_AT_INFERENCE`. Swin's ``relative_position_index`` buffers are a
pure function of the window size: they are checked against ours, not loaded.

The official training loop (``tools/train.py`` -> ``deris/utils/checkpoint.py::save_checkpoint``)
also stores the optimizer and scheduler state, ``lr``, ``epoch`` and that epoch's metrics (numpy
scalars among them), sometimes ``amp`` or ``ema_state_dict``. Such files are unpickled with
``weights_only=True`` plus an explicit allowlist of exactly the extra types they contain
(:data:`OFFICIAL_SAFE_GLOBALS`); a file naming any other global is refused, never unpickled.

This project's own format is the model's ``state_dict`` saved as safetensors (with the preset
in the metadata) or as a torch file ``{"deris_format": 1, "preset": ..., "state_dict": ...}``.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.core.multiarray import scalar as numpy_scalar  # type: ignore[attr-defined]  # absent from numpy's stubs
from torch import nn

from deris.atomic import atomic_file

FORMAT_VERSION = 1
OFFICIAL_ROOTS = ("understanding_branch.", "perception_branch.", "head.")

# Official keys that no inference output depends on: accepted, then dropped.
DEAD_AT_INFERENCE: tuple[tuple[str, str], ...] = (
    (r"^head\.criterion\.empty_weight$", "loss-only class weights"),
    (r"^perception_branch\.nt_embed\.", "perception-side existence head, never called"),
    (r"^perception_branch\.perception_query_embed\.", "unused query table"),
    (r"^perception_branch\.predictor\.box_embed\.", "box head, never trained (loss weight 0)"),
    (r"^perception_branch\.predictor\.cls_embed\.", "perception class head, output unused"),
    (r"^perception_branch\.predictor\.SEG_proj\.", "MLP never called"),
    (r"^perception_branch\.predictor\.Q2TCA\.\d+\.cross_attn\.mapmlp\.", "only used with a cross-attention mask, never given"),
    (r"^understanding_branch\.logit_embed\.", "cognition class head, computed and discarded"),
    (r"^understanding_branch\.vis_enc\.beit3\.vision_embed\.mask_token$", "BEiT-3 pretraining mask token"),
)
DERIVED = re.compile(r"\.relative_position_index$")

# (official prefix, our prefix, rewrites applied in order to the rest of the key)
KEY_GROUPS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "understanding_branch.vis_enc.beit3.",
        "cognition.beit3.",
        (
            (r"^vision_embed\.proj\.", "patch_embed."),
            (r"^vision_embed\.cls_token$", "cls_token"),
            (r"^encoder\.embed_positions\.A\.", "pos_embed.vision."),
            (r"^encoder\.embed_positions\.B\.", "pos_embed.text."),
            (r"^encoder\.layer_norm\.", "norm."),
            (r"^encoder\.layers\.", "layers."),
            (r"\.self_attn_layer_norm\.", ".attn_norm."),
            (r"\.self_attn\.inner_attn_ln\.", ".attn.inner_norm."),
            (r"\.self_attn\.", ".attn."),
            (r"\.final_layer_norm\.", ".ffn_norm."),
            (r"\.ffn_layernorm\.", ".norm."),
            (r"\.A\.", ".vision."),
            (r"\.B\.", ".text."),
        ),
    ),
    ("understanding_branch.vis_embed.", "cognition.image_proj.", ()),
    ("understanding_branch.text_embed.", "cognition.text_proj.", ()),
    ("understanding_branch.perception_embed.", "cognition.query_proj.", ()),
    ("understanding_branch.init_query.", "cognition.init_query.", ()),
    (
        "understanding_branch.roialigner.TextCorrelation.",
        "existence.",
        (
            (r"^post_norm_layer\.", "norm."),
            (r"\.attentions\.0\.attn\.", ".self_attn."),
            (r"\.attentions\.1\.attn\.", ".cross_attn."),
            (r"\.norms\.0\.", ".self_norm."),
            (r"\.norms\.1\.", ".cross_norm."),
            (r"\.norms\.2\.", ".ffn_norm."),
            (r"\.ffns\.0\.layers\.0\.0\.", ".linear1."),
            (r"\.ffns\.0\.layers\.1\.", ".linear2."),
        ),
    ),
    ("understanding_branch.nt_embed.", "existence.head.", ()),
    ("perception_branch.hier_vision_encoder.", "perception.swin.", ()),
    (
        "perception_branch.pixel_decoder.",
        "perception.pixel_decoder.",
        (
            (r"^transformer\.level_embed$", "level_embed"),
            (r"^transformer\.encoder\.layers\.", "encoder."),
            (r"^adapter_1\.", "lateral."),
            (r"^layer_1\.", "fpn_output."),
        ),
    ),
    (
        "perception_branch.predictor.",
        "decoder.",
        (
            (r"^transformer_cross_attention_layers\.(\d+)\.multihead_attn\.", r"layers.\1.cross_attn.attn."),
            (r"^transformer_cross_attention_layers\.(\d+)\.norm\.", r"layers.\1.cross_attn.norm."),
            (r"^transformer_self_attention_layers\.(\d+)\.self_attn\.", r"layers.\1.self_attn.attn."),
            (r"^transformer_self_attention_layers\.(\d+)\.norm\.", r"layers.\1.self_attn.norm."),
            (r"^transformer_ffn_layers\.(\d+)\.", r"layers.\1.ffn."),
            (r"^channel_proj_conv\.", "fusion."),
            (r"^SEG_cls\.", "refer_head."),
            (r"^query_SA\.(\d+)\.self_attn\.", r"loopback.\1.query_sa.attn."),
            (r"^query_SA\.(\d+)\.norm\.", r"loopback.\1.query_sa.norm."),
            # Q2TCA's post-LN order is self-attn -> norm2, cross-attn -> norm1, FFN -> norm3.
            (r"^Q2TCA\.(\d+)\.norm2\.", r"loopback.\1.text_attn.self_norm."),
            (r"^Q2TCA\.(\d+)\.norm1\.", r"loopback.\1.text_attn.cross_norm."),
            (r"^Q2TCA\.(\d+)\.norm3\.", r"loopback.\1.text_attn.ffn_norm."),
            (r"^Q2TCA\.(\d+)\.", r"loopback.\1.text_attn."),
            (r"^refer_proj\.(\d+)\.", r"loopback.\1.refer_proj."),
        ),
    ),
)


# What official training files pickle beyond torch's weights-only defaults (tensors, containers,
# numbers, OrderedDict for apex's ``amp`` state, Counter): the metrics of the saved epoch that the
# official evaluators return as numpy float64 scalars (gres_evaluate's cIoU is a sum of numpy ints
# * 100.0 / ..., refzom_evaluate's mIoU/oIoU/macc come from np.mean). The official environment
# (numpy 1.24) writes such a scalar as numpy.core.multiarray.scalar(numpy.dtype("f8", ...), bytes).
OFFICIAL_SAFE_GLOBALS: tuple[Any, ...] = (
    numpy_scalar,  # rebuilds the scalar from its dtype and raw bytes
    np.dtype,  # called to rebuild that dtype
    np.dtypes.Float64DType,  # the rebuilt dtype's class (numpy >= 1.25): its pickled state is set on it
)
OFFICIAL_CONTENTS = "tensors, optimizer/scheduler state, numbers, numpy scalars"

# Entries of an official training file other than the weights, and why they are not loaded.
NOT_LOADED_REASONS = {
    "ema_state_dict": "EMA weights; the official test script reads them but loads state_dict",
    "optimizer": "training state",
    "scheduler": "training state",
    "amp": "apex loss-scaler state, training only",
    "meta": "run metadata",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded strictly; the message names every offending key."""


@dataclass
class CheckpointInfo:
    """What a checkpoint held besides the weights, and which entry the weights came from."""

    weights: str | None = None  # the entry loaded ("state_dict"); None for a bare state dict
    preset: str | None = None  # recorded by this project's format
    epoch: int | None = None  # as the official loop stores it: 0-based
    lr: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # the saved epoch's evaluation results
    not_loaded: dict[str, str] = field(default_factory=dict)  # entry -> why

    def describe(self) -> list[str]:
        lines = [f"weights loaded: {self.weights or 'a bare state dict'}"]
        if self.epoch is not None:
            # The official logs and epoch_N.pth file names count epochs from 1.
            lines.append(f"saved after epoch {self.epoch + 1}" + (f", lr {self.lr:g}" if self.lr is not None else ""))
        if self.metrics:
            lines.append("metrics: " + ", ".join(f"{k} {v:.2f}" for k, v in self.metrics.items()))
        lines.extend(f"not loaded: {k} ({why})" for k, why in self.not_loaded.items())
        return lines


@dataclass
class ConversionReport:
    """What the converter did with an official state dict, and what the file held besides it."""

    mapped: dict[str, str] = field(default_factory=dict)  # official -> ours
    dropped: dict[str, str] = field(default_factory=dict)  # official -> reason
    derived_checked: list[str] = field(default_factory=list)
    derived_mismatched: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    source: CheckpointInfo = field(default_factory=CheckpointInfo)

    def summary(self) -> str:
        counts = (
            f"{len(self.mapped)} tensors mapped, {len(self.dropped)} dead-at-inference tensors dropped, "
            f"{len(self.derived_checked)} derived index buffers checked"
        )
        return "\n  ".join([counts, *self.source.describe()])


def dead_reason(key: str) -> str | None:
    for pattern, reason in DEAD_AT_INFERENCE:
        if re.search(pattern, key):
            return reason
    return None


def official_to_ours(key: str) -> str | None:
    """Our name for an official key, or None if no rule covers it."""
    for official_prefix, our_prefix, rewrites in KEY_GROUPS:
        if key.startswith(official_prefix):
            rest = key[len(official_prefix) :]
            for pattern, repl in rewrites:
                rest = re.sub(pattern, repl, rest)
            return our_prefix + rest
    return None


def is_official(state_dict: Mapping[str, object]) -> bool:
    return any(k.startswith(OFFICIAL_ROOTS) for k in state_dict)


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def convert_official(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map an official state dict to ours; derived buffers are checked against ``model``'s."""
    report = ConversionReport()
    ours: dict[str, torch.Tensor] = {}
    buffers = dict(model.named_buffers())
    for key, tensor in state_dict.items():
        reason = dead_reason(key)
        if reason is not None:
            report.dropped[key] = reason
            continue
        name = official_to_ours(key)
        if name is None:
            report.unmapped.append(key)
            continue
        if DERIVED.search(key):
            expected = buffers.get(name)
            if expected is None or expected.shape != tensor.shape or not torch.equal(expected.cpu(), tensor.cpu()):
                report.derived_mismatched.append(key)
            report.derived_checked.append(key)
            continue
        report.mapped[key] = name
        ours[name] = tensor
    return ours, report


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, report: ConversionReport | None = None
) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped key (and, for
    official checkpoints, every index buffer that differs from this preset's construction)."""
    expected = model.state_dict()
    back = {v: k for k, v in (report.mapped if report else {}).items()}

    def label(name: str) -> str:
        return f"{name} (official {back[name]})" if name in back else name

    missing = sorted(set(expected) - set(state_dict))
    unexpected = [label(k) for k in sorted(set(state_dict) - set(expected))] + sorted(report.unmapped if report else [])
    shapes = [
        f"{label(k)}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    mismatched = report.derived_mismatched if report else []
    shapes += [f"{k}: differs from the Swin index for this preset's window size" for k in mismatched]
    if not (missing or unexpected or shapes):
        return
    preset = getattr(getattr(model, "cfg", None), "name", "this model")
    lines = [
        f"checkpoint does not match preset {preset!r}: {len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(shapes)} mis-shaped keys"
    ]
    if shapes:
        lines.append("first shape mismatches (a checkpoint of another preset?): " + "; ".join(shapes[:3]))
    for title, items in (("missing", [label(k) for k in missing]), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            lines.append(f"{title} ({len(items)}):")
            lines.extend(f"  {item}" for item in items)
    raise CheckpointError("\n".join(lines))


def _as_number(value: object) -> float | None:
    """A metric-like scalar (python or numpy number, one-element tensor) as a float, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.number)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    return None


def unpack_checkpoint(obj: object, origin: str) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Split an unpickled checkpoint into (state dict, what else it held). ``origin`` names it in errors."""
    info = CheckpointInfo()
    state: object = obj
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        info.weights = "state_dict"
        state = obj["state_dict"]
        for key, value in obj.items():
            number = _as_number(value)
            if key in ("state_dict", "deris_format"):
                continue
            if key == "preset":
                info.preset = str(value)
            elif key == "epoch" and number is not None:
                info.epoch = int(number)
            elif key == "lr" and number is not None:
                info.lr = number
            elif key in NOT_LOADED_REASONS:
                info.not_loaded[key] = NOT_LOADED_REASONS[key]
            elif number is not None:
                info.metrics[key] = number
            else:
                info.not_loaded[key] = "not used at inference"
    elif isinstance(obj, Mapping) and "ema_state_dict" in obj:
        raise CheckpointError(
            f"{origin} holds ema_state_dict but no state_dict: official DeRIS tools load the weights from state_dict"
        )
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{origin} does not hold a state dict of tensors")
    return dict(state), info


def _refused_names(path: Path, error: Exception) -> list[str]:
    """What the weights-only unpickler (with the current allowlist) refuses in ``path``."""
    try:
        # A static scan of the pickle: names every disallowed global, executes nothing.
        scanned = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip file (legacy torch format, or no checkpoint at all): nothing to scan
        scanned = []
    if scanned:
        return sorted(scanned)
    # Otherwise torch's refusal names one: a global, or the type of an object it will not build
    # (e.g. a numpy int64 scalar, whose reconstructor is allowed but whose dtype class is not).
    return [g or t for g, t in re.findall(r"GLOBAL (\S+)|but got <class '([^']+)'>", str(error))]


def _load_torch_file(path: Path) -> object:
    # Add only what is not allowlisted already: leaving the context removes what it added, and
    # must not remove a caller's own add_safe_globals entries.
    extra = [g for g in OFFICIAL_SAFE_GLOBALS if g not in torch.serialization.get_safe_globals()]
    with torch.serialization.safe_globals(extra):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            refused = _refused_names(path, exc) if isinstance(exc, pickle.UnpicklingError) else []
            if refused:
                one = len(refused) == 1
                # Raised without torch's message, whose advice is to unpickle the file unrestricted.
                raise CheckpointError(
                    f"{path} holds {', '.join(refused)}, which {'is' if one else 'are'} not among the types official "
                    f"DeRIS checkpoints contain ({OFFICIAL_CONTENTS}); refusing to unpickle {'it' if one else 'them'}, "
                    f"since unpickling runs the code a file names. If you trust this file and its source, extract the "
                    f"weights yourself (torch.save(checkpoint['state_dict'], 'weights.pth')) and load that file instead."
                ) from None
            raise CheckpointError(
                f"cannot read {path} as a torch checkpoint (expected a .pth/.pt file holding a state dict, "
                f"an official DeRIS checkpoint, or a .safetensors file): {exc}"
            ) from exc


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read a checkpoint file -> (state dict, what else it held). Accepts safetensors, this project's
    torch format, an official DeRIS training file (a dict with ``state_dict``) or a bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file is empty: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                meta = dict(f.metadata() or {})
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {exc}") from exc
        return state, CheckpointInfo(preset=meta.get("preset"))
    return unpack_checkpoint(_load_torch_file(path), str(path))


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike[str] | Mapping[str, Any]) -> ConversionReport | None:
    """Load an official DeRIS checkpoint or one in this project's format into ``model``, strictly.

    ``checkpoint`` is a file or an already unpickled checkpoint (a state dict, or a dict holding one
    under ``state_dict``). Returns the conversion report for official checkpoints, None for this
    project's format.
    """
    if isinstance(checkpoint, Mapping):
        state_dict, info = unpack_checkpoint(checkpoint, "the checkpoint mapping")
    else:
        state_dict, info = read_checkpoint(checkpoint)
    state_dict = strip_module_prefix(state_dict)
    preset = getattr(getattr(model, "cfg", None), "name", None)
    if info.preset and preset and info.preset != preset:
        raise CheckpointError(f"checkpoint was saved for preset {info.preset!r}, model is {preset!r}")
    report = None
    if is_official(state_dict):
        state_dict, report = convert_official(state_dict, model)
        report.source = info
        check_state_dict(state_dict, model, report)
    else:
        check_state_dict(state_dict, model)
    model.load_state_dict(state_dict, strict=True)
    return report


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save ``model`` in this project's format (``.safetensors``, else a torch file), atomically."""
    path = Path(path)
    preset = str(getattr(getattr(model, "cfg", None), "name", ""))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_file(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, tmp, metadata={"format": "deris", "format_version": str(FORMAT_VERSION), "preset": preset})
        else:
            torch.save({"deris_format": FORMAT_VERSION, "preset": preset, "state_dict": state}, tmp)
    return path
