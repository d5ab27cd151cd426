"""deris.evaluation against hand-computed values (the official formulas, module docstring) and itself:
streaming equals one pass, merged shards equal the whole, states survive JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from deris.evaluation import (
    GRES_KEYS,
    RIS_KEYS,
    GresMetrics,
    RisMetrics,
    mask_counts,
    metrics_from_state,
)


def masks(shape: tuple[int, int], pred: list[tuple[int, int]], gt: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Two boolean masks with the listed (row, col) pixels set."""
    p, g = np.zeros(shape, bool), np.zeros(shape, bool)
    for r, c in pred:
        p[r, c] = True
    for r, c in gt:
        g[r, c] = True
    return p, g


def counts_mask(intersection: int, pred_only: int, gt_only: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Masks on a 1 x size strip with the given |P & G|, |P - G| and |G - P|."""
    p, g = np.zeros((1, size), bool), np.zeros((1, size), bool)
    p[0, :intersection] = g[0, :intersection] = True
    p[0, intersection : intersection + pred_only] = True
    g[0, intersection + pred_only : intersection + pred_only + gt_only] = True
    return p, g


# ---------------------------------------------------------------------------------------------- RIS


def test_ris_hand_computed() -> None:
    m = RisMetrics()
    # I=2, U=6 (pred 4 px, gt 4 px, 2 shared): IoU 1/3
    s1 = m.update(*masks((4, 4), [(0, 0), (0, 1), (1, 0), (1, 1)], [(0, 1), (1, 1), (2, 1), (3, 1)]))
    assert (s1.intersection, s1.union) == (2, 6) and s1.iou == pytest.approx(1 / 3)
    # perfect: I=U=3
    s2 = m.update(*masks((4, 4), [(0, 0), (1, 1), (2, 2)], [(0, 0), (1, 1), (2, 2)]))
    assert (s2.intersection, s2.union, s2.iou) == (3, 3, 1.0)
    # a target predicted empty: I=0, U=|G|=5, IoU 0
    s3 = m.update(*counts_mask(0, 0, 5))
    assert (s3.intersection, s3.union, s3.iou) == (0, 5, 0.0)
    # both empty: U=0 -> IoU 0 (official: IoU = I/U only if U >= 1)
    s4 = m.update(np.zeros((3, 3), bool), np.zeros((3, 3), bool))
    assert (s4.intersection, s4.union, s4.iou) == (0, 0, 0.0)

    result = m.compute()
    assert tuple(result) == RIS_KEYS == ("mIoU", "oIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9")
    assert result["mIoU"] == pytest.approx(100 * (1 / 3 + 1) / 4)
    assert result["oIoU"] == pytest.approx(100 * 5 / 14)
    for key in RIS_KEYS[2:]:
        assert result[key] == pytest.approx(25.0)
    assert s1.to_dict() == {"intersection": 2, "union": 6, "iou": pytest.approx(1 / 3)}


def test_ris_thresholds_are_inclusive() -> None:
    m = RisMetrics()
    assert m.update(*counts_mask(1, 1, 0)).iou == 0.5  # exactly 0.5
    assert m.update(*counts_mask(7, 2, 1)).iou == 0.7  # exactly 0.7
    assert m.update(*counts_mask(9, 0, 1)).iou == 0.9  # exactly 0.9
    r = m.compute()
    assert r["Pr@0.5"] == pytest.approx(100.0)
    assert r["Pr@0.6"] == pytest.approx(200 / 3) and r["Pr@0.7"] == pytest.approx(200 / 3)
    assert r["Pr@0.8"] == pytest.approx(100 / 3) and r["Pr@0.9"] == pytest.approx(100 / 3)


def test_ris_zero_unions_and_empty() -> None:
    assert RisMetrics().compute() == dict.fromkeys(RIS_KEYS, 0.0)
    m = RisMetrics()
    for _ in range(3):
        m.update(np.zeros((2, 2), bool), np.zeros((2, 2), bool))
    assert m.compute() == dict.fromkeys(RIS_KEYS, 0.0)  # sum(U) = 0: oIoU 0 instead of a division error


def ris_one_pass(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """The RefCOCO formulas over the whole list at once (vectorised)."""
    p = np.stack([a for a, _ in pairs]).reshape(len(pairs), -1)
    g = np.stack([b for _, b in pairs]).reshape(len(pairs), -1)
    i = (p & g).sum(1).astype(float)
    u = p.sum(1) + g.sum(1) - i
    iou = np.where(u >= 1, i / np.maximum(u, 1), 0.0)
    out = {"mIoU": 100 * iou.mean(), "oIoU": 100 * i.mean() / u.mean()}
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        out[f"Pr@{t}"] = 100 * (iou >= t).mean()
    return out


def random_pairs(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        g = rng.random((12, 12)) < rng.uniform(0.0, 0.6)
        noise = rng.random((12, 12)) < rng.uniform(0.0, 0.3)
        pairs.append((g ^ noise, g))
    return pairs


def test_ris_streaming_equals_one_pass_and_shards_merge() -> None:
    pairs = random_pairs(60, seed=0)
    whole = RisMetrics()
    for p, g in pairs:
        whole.update(p, g)
    assert whole.compute() == pytest.approx(ris_one_pass(pairs))

    shards = [RisMetrics(), RisMetrics(), RisMetrics()]
    for k, (p, g) in enumerate(pairs):
        shards[k % 3].update(p, g)
    before = shards[0].to_state()
    merged = shards[0].merge(shards[1]).merge(shards[2])
    assert shards[0].to_state() == before  # merge leaves its inputs alone
    assert merged.count == whole.count == 60
    assert merged.compute() == pytest.approx(whole.compute(), rel=1e-12)

    restored = metrics_from_state(json.loads(json.dumps(merged.to_state())))
    assert isinstance(restored, RisMetrics)
    assert restored.compute() == merged.compute()

    rebuilt = RisMetrics()  # per-sample records (I, U) are enough to score again
    for p, g in pairs:
        rebuilt.update_from_counts(*mask_counts(p, g))
    assert rebuilt.to_state() == whole.to_state()


# --------------------------------------------------------------------------------------------- GRES


def gres_hand_samples() -> list[tuple[np.ndarray, np.ndarray, bool, bool]]:
    """(pred, gt, pred_no_target, gt_no_target) for every case of gres_evaluate."""
    return [
        (*counts_mask(3, 1, 1), False, False),  # a: TN, I=3 U=5 IoU 0.6
        (*counts_mask(4, 0, 0), False, False),  # b: TN, perfect, IoU 1
        (*counts_mask(0, 0, 6), True, False),  # c: FP, empty prediction: I=0 U=6
        (*counts_mask(2, 2, 2), True, False),  # d: FP with a leftover mask: I forced to 0, U = |P|G| = 6
        (*counts_mask(0, 0, 0), True, True),  # e: TP: IoU 1, adds nothing
        (*counts_mask(0, 3, 0), False, True),  # f: FN: a no-target sample given a mask, U = |P| = 3
        (*counts_mask(0, 0, 5), False, False),  # g: TN with an empty mask: I=0 U=5 IoU 0
    ]


def test_gres_hand_computed() -> None:
    m = GresMetrics()
    scores = [m.update(*sample) for sample in gres_hand_samples()]
    assert [s.outcome for s in scores] == ["TN", "TN", "FP", "FP", "TP", "FN", "TN"]
    assert [(s.intersection, s.union) for s in scores] == [(3, 5), (4, 4), (0, 6), (0, 6), (0, 0), (0, 3), (0, 5)]
    assert [s.iou for s in scores] == pytest.approx([0.6, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    assert scores[3].to_dict() == {
        "intersection": 0,
        "union": 6,
        "iou": 0.0,
        "gt_no_target": False,
        "pred_no_target": True,
        "outcome": "FP",
    }

    result = m.compute()
    assert tuple(result) == GRES_KEYS == ("gIoU", "cIoU", "N-acc", "T-acc", "Pr@0.7", "Pr@0.8", "Pr@0.9")
    assert result["gIoU"] == pytest.approx(100 * 2.6 / 7)
    assert result["cIoU"] == pytest.approx(100 * 7 / 29)
    assert result["N-acc"] == pytest.approx(50.0)  # TP=1, FN=1
    assert result["T-acc"] == pytest.approx(60.0)  # TN=3, FP=2
    for key in ("Pr@0.7", "Pr@0.8", "Pr@0.9"):
        assert result[key] == pytest.approx(20.0)  # only b of the 5 target samples


def test_gres_split_without_no_target_samples() -> None:
    m = GresMetrics()
    for sample in gres_hand_samples()[:3]:  # a, b, c: TN, TN, FP
        m.update(*sample)
    r = m.compute()
    assert r["N-acc"] == 0.0 and r["T-acc"] == 0.0  # official: both 0 when no sample is no-target
    assert r["gIoU"] == pytest.approx(100 * 1.6 / 3)
    assert r["cIoU"] == pytest.approx(100 * 7 / 15)
    assert r["Pr@0.7"] == pytest.approx(100 / 3)


def test_gres_split_of_only_no_target_samples() -> None:
    m = GresMetrics()
    for sample in gres_hand_samples()[4:6]:  # e: TP, f: FN
        m.update(*sample)
    r = m.compute()
    assert r == {"gIoU": 50.0, "cIoU": 0.0, "N-acc": 50.0, "T-acc": 0.0, "Pr@0.7": 0.0, "Pr@0.8": 0.0, "Pr@0.9": 0.0}


def test_gres_zero_unions() -> None:
    m = GresMetrics()
    m.update(*gres_hand_samples()[4])  # TP only: sum(U) = 0
    assert m.compute() == {"gIoU": 100.0, "cIoU": 0.0, "N-acc": 100.0, "T-acc": 0.0, "Pr@0.7": 0.0, "Pr@0.8": 0.0, "Pr@0.9": 0.0}
    m = GresMetrics()
    s = m.update(np.zeros((2, 2), bool), np.zeros((2, 2), bool), False, False)  # a target sample with U = 0
    assert (s.outcome, s.intersection, s.union, s.iou) == ("TN", 0, 0, 0.0)
    assert m.compute()["gIoU"] == 0.0 and m.compute()["cIoU"] == 0.0
    assert GresMetrics().compute() == dict.fromkeys(GRES_KEYS, 0.0)


def gres_one_pass(samples: list[tuple[np.ndarray, np.ndarray, bool, bool]]) -> dict[str, float]:
    """gres_evaluate restated over a list (not streamed)."""
    ious, i_sum, u_sum, target_ious = [], 0, 0, []
    nt = {"TP": 0, "FN": 0, "FP": 0, "TN": 0}
    for p, g, pred_nt, gt_nt in samples:
        i, u = int((p & g).sum()), int((p | g).sum())
        if gt_nt:
            nt["TP" if pred_nt else "FN"] += 1
            ious.append(1.0 if pred_nt else 0.0)
            u_sum += 0 if pred_nt else u
        else:
            nt["FP" if pred_nt else "TN"] += 1
            i = 0 if pred_nt else i
            iou = i / u if u else 0.0
            ious.append(iou)
            target_ious.append(iou)
            i_sum += i
            u_sum += u
    empty = nt["TP"] + nt["FN"]
    out = {
        "gIoU": 100 * sum(ious) / len(ious),
        "cIoU": 100 * i_sum / u_sum,
        "N-acc": 100 * nt["TP"] / empty if empty else 0.0,
        "T-acc": 100 * nt["TN"] / (nt["TN"] + nt["FP"]) if empty else 0.0,
    }
    for t in (0.7, 0.8, 0.9):
        out[f"Pr@{t}"] = 100 * sum(v >= t for v in target_ious) / len(target_ious)
    return out


def test_gres_streaming_equals_one_pass_and_shards_merge() -> None:
    rng = np.random.default_rng(1)
    samples = []
    for p, g in random_pairs(80, seed=2):
        gt_nt = bool(rng.random() < 0.3)
        pred_nt = bool(rng.random() < 0.3)
        samples.append((np.zeros_like(p) if pred_nt else p, np.zeros_like(g) if gt_nt else g, pred_nt, gt_nt))
    whole = GresMetrics()
    for sample in samples:
        whole.update(*sample)
    assert whole.compute() == pytest.approx(gres_one_pass(samples))

    shards = [GresMetrics() for _ in range(4)]
    for k, sample in enumerate(samples):
        shards[(k * 7) % 4].update(*sample)
    merged = shards[0].merge(shards[1]).merge(shards[2].merge(shards[3]))
    assert merged.compute() == pytest.approx(whole.compute(), rel=1e-12)
    assert merged.outcomes == whole.outcomes and merged.count == 80

    restored = metrics_from_state(json.loads(json.dumps(merged.to_state())))
    assert isinstance(restored, GresMetrics) and restored.compute() == merged.compute()

    rebuilt = GresMetrics()
    for p, g, pred_nt, gt_nt in samples:
        rebuilt.update_from_counts(*mask_counts(p, g), pred_nt, gt_nt)
    assert rebuilt.to_state() == whole.to_state()


# ------------------------------------------------------------------------------------------- inputs


def test_input_checks() -> None:
    m = RisMetrics()
    with pytest.raises(ValueError, match="differ in shape"):
        m.update(np.zeros((3, 3), bool), np.zeros((3, 4), bool))
    with pytest.raises(ValueError, match="2-D"):
        m.update(np.zeros((1, 3, 3), bool), np.zeros((1, 3, 3), bool))
    with pytest.raises(TypeError, match="threshold it first"):
        m.update(np.full((2, 2), 0.7), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="outside"):
        m.update(np.full((2, 2), 2, np.uint8), np.zeros((2, 2), bool))
    assert m.update(np.ones((2, 2), np.uint8), np.ones((2, 2), bool)).iou == 1.0  # 0/1 integers are fine
    with pytest.raises(ValueError, match="intersection <= union"):
        m.update_from_counts(5, 3)
    with pytest.raises(TypeError, match="pred_no_target must be a bool"):
        GresMetrics().update(np.zeros((2, 2), bool), np.zeros((2, 2), bool), 1, False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="merge"):
        RisMetrics().merge(GresMetrics())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        GresMetrics.from_state(RisMetrics().to_state())
    with pytest.raises(ValueError, match="accepted"):
        metrics_from_state({"kind": "other"})


def test_imports_numpy_only() -> None:
    code = "import sys, deris.evaluation; bad = {'torch', 'pycocotools', 'cv2'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
