"""Files as the official DeRIS training loop writes them (tools/train.py -> save_checkpoint), built from a
deris-tiny model under the official key names, for the checkpoint and fine-tuning tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from golden import golden_dir
from synthetic_weights import load_manifest

import deris
from deris.checkpoint import official_to_ours


def official_keyed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights under the official names (deris-tiny's keys are a subset of DeRIS-B's)."""
    manifest = load_manifest(golden_dir() / "manifest_DERIS-B-refcoco.json")
    official = {official_to_ours(e["key"]): e["key"] for e in manifest["state_dict"]}
    return {official[k]: v.clone() for k, v in model.state_dict().items()}


def epoch_metrics(dataset: str) -> dict[str, Any]:
    """A saved epoch's metrics as tools/train.py collects them, with the types the official evaluators
    return (deris/evaluations/*.py, deris/apis/test.py::accuracy)."""
    rng = np.random.default_rng(0)
    pred, gt = rng.random((2, 4, 8, 8)) > 0.5
    inter = [np.sum(np.logical_and(p, g)) for p, g in zip(pred, gt)]  # numpy int64, as computeIoU gives
    union = [np.sum(np.logical_or(p, g)) for p, g in zip(pred, gt)]
    if dataset == "GRefCOCO":
        ciou = sum(inter) * 100.0 / sum(union)  # gres_evaluate: numpy float64
        assert type(ciou) is np.float64
        return {"F1score": 3 / 4 * 100, "Nacc_rec": 50.0, "gIoU": 61.5, "cIoU": ciou,
                "best_F1score": 70.0, "best_Nacc_rec": 0.0, "best_gIoU": 0.0, "best_cIoU": ciou}
    if dataset == "RefZOM":
        miou = np.mean(np.array([i * 1.0 / u for i, u in zip(inter, union)])) * 100.0  # refzom_evaluate
        return {"mIoU": miou, "oIoU": sum(inter) * 100.0 / sum(union), "macc": np.mean(np.array([1, 0])) * 100.0,
                "best_mIoU": miou, "best_oIoU": 0.0, "best_macc": 0.0}
    # MixedSeg (the refcoco configs): DetACC stays a tensor, the mask metrics are python floats.
    d_acc = (torch.tensor([0.7, 0.2]) >= 0.5).float().mean() * 100.0
    return {"mIoU": 71.25, "oIoU": 70.5, "d_acc": d_acc, "best_d_acc": 0.0, "best_mIoU": 0.0, "best_oIoU": 0.0}


def ddp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as DistributedDataParallel's state_dict() gives them."""
    return {"module." + k: v for k, v in state.items()}


def write_official_file(path: Path, model: torch.nn.Module, dataset: str = "GRefCOCO", **extra: Any) -> dict[str, torch.Tensor]:
    """Train ``model`` one step and save it as tools/train.py -> save_checkpoint does; ``extra`` entries
    (ema_state_dict, amp, ...) go in too. Returns the saved official-keyed weights."""
    cognition = [p for n, p in model.named_parameters() if n.startswith("cognition.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("cognition.")]
    optimizer = torch.optim.Adam(
        [{"params": cognition, "lr": 5e-5}, {"params": rest, "lr": 1e-4}], lr=1e-4, betas=(0.9, 0.98), eps=1e-9,
        weight_decay=0, amsgrad=True,
    )
    # The official MultiStepLRWarmUp is a LambdaLR over a closure like this one.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda epoch: 0.1 if epoch >= 15 else 1.0)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    scheduler.step()
    weights = official_keyed(model)
    checkpoint: dict[str, Any] = {"epoch": 11, **epoch_metrics(dataset), **extra}
    checkpoint.update(
        {
            "state_dict": ddp(weights),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "lr": optimizer.param_groups[0]["lr"],
        }
    )
    torch.save(checkpoint, path)
    return weights


def fresh_tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return deris.build_model("deris-tiny")
