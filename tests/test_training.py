"""Matching and every loss term against hand-computed values; the trainer (overfit, resume, checkpoints)."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from official_files import fresh_tiny, write_official_file
from spm import train_sentencepiece

import deris
from deris import datasets
from deris.checkpoint import official_to_ours
from deris.cli_support import run_main
from deris.scenes import write_dataset
from deris.text import TextEncoder
from deris.training.cli import add_train
from deris.training.losses import (
    Criterion,
    LossWeights,
    PointSampling,
    existence_loss,
    mask_point_losses,
    refer_class_loss,
    uncertain_point_coords,
)
from deris.training.matcher import MatchCosts, dice_cost, hungarian_match, match_image, point_sample, sigmoid_ce_cost
from deris.training.nsc import NSCConfig
from deris.training.trainer import (
    FROZEN_PREFIX,
    LAST_CHECKPOINT,
    SCHEDULES,
    EpochSampler,
    Schedule,
    SplitView,
    TrainConfig,
    TrainingSet,
    build_optimizer,
    freeze_swin,
    read_training_state,
    train,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- point sampling


def test_point_sample_is_bilinear_with_zero_padding_at_pixel_centre_convention():
    grid = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # [1,1,2,2]
    coords = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [0.5, 0.25], [1.0, 1.0], [0.0, 0.0]]])
    out = point_sample(grid, coords)
    # pixel centres are (j + 0.5) / W; x is the column; beyond the outer centres values blend with 0
    assert out.shape == (1, 1, 7)
    assert out[0, 0].tolist() == pytest.approx([0.0, 1.0, 2.0, 1.5, 0.5, 0.75, 0.0])


# ---------------------------------------------------------------- matching


def _two_by_one_case():
    # Two queries, two targets, on a 1x2 map sampled exactly at the two pixel centres.
    mask_logits = torch.tensor([[[0.0, 2.0]], [[-1.0, 1.0]]])  # [N=2,1,2]
    targets = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])  # [T=2,1,2]
    points = torch.tensor([[0.25, 0.5], [0.75, 0.5]])
    refer_logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    return refer_logits, mask_logits, targets, points


def test_pairwise_costs_match_hand_values():
    _, mask_logits, targets, points = _two_by_one_case()
    pred = point_sample(mask_logits[:, None], points.expand(2, -1, -1)).squeeze(1)
    gt = point_sample(targets[:, None], points.expand(2, -1, -1)).squeeze(1)
    assert pred.tolist() == [[0.0, 2.0], [-1.0, 1.0]]
    ce = sigmoid_ce_cost(pred, gt)
    # BCE(x, 1) = softplus(-x), BCE(x, 0) = softplus(x), mean over the 2 points
    expected_ce = [
        [(softplus(0.0) + softplus(2.0)) / 2, (softplus(0.0) + softplus(-2.0)) / 2],
        [(softplus(1.0) + softplus(1.0)) / 2, (softplus(1.0) + softplus(-1.0)) / 2],
    ]
    assert ce.tolist() == [pytest.approx(row) for row in expected_ce]
    dice = dice_cost(pred, gt)
    p0, p1 = [0.5, sigmoid(2.0)], [sigmoid(-1.0), sigmoid(1.0)]
    expected_dice = [
        [1 - (2 * p0[0] + 1) / (sum(p0) + 1 + 1), 1 - (2 * sum(p0) + 1) / (sum(p0) + 2 + 1)],
        [1 - (2 * p1[0] + 1) / (sum(p1) + 1 + 1), 1 - (2 * sum(p1) + 1) / (sum(p1) + 2 + 1)],
    ]
    assert dice.tolist() == [pytest.approx(row) for row in expected_dice]


def test_match_image_minimises_the_official_cost_by_hand():
    refer_logits, mask_logits, targets, points = _two_by_one_case()
    rows, cols = match_image(refer_logits, mask_logits, targets, points)
    # Hand cost C = 2 * (-p_referred) + 5 * CE + 5 * Dice for both permutations.
    p_ref = [sigmoid(1.0), 0.5]
    ce = [[(softplus(0) + softplus(2)) / 2, (softplus(0) + softplus(-2)) / 2], [softplus(1), (softplus(1) + softplus(-1)) / 2]]
    s0, s1 = 0.5 + sigmoid(2.0), sigmoid(-1.0) + sigmoid(1.0)
    dice = [
        [1 - 2 / (s0 + 2), 1 - (2 * s0 + 1) / (s0 + 3)],
        [1 - (2 * sigmoid(-1.0) + 1) / (s1 + 2), 1 - (2 * s1 + 1) / (s1 + 3)],
    ]
    cost = [[-2 * p_ref[q] + 5 * ce[q][t] + 5 * dice[q][t] for t in range(2)] for q in range(2)]
    identity, swapped = cost[0][0] + cost[1][1], cost[0][1] + cost[1][0]
    assert identity != pytest.approx(swapped)
    expected = [0, 1] if identity < swapped else [1, 0]
    assert rows.tolist() == [0, 1] and cols.tolist() == expected


def test_class_cost_decides_when_masks_are_uninformative():
    # Zero logits sample to 0 everywhere (also at the zero-padded border): mask costs tie, so the
    # query most likely "referred" wins; with more queries than targets the others stay unmatched.
    refer_logits = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [1.0, 0.0]]])
    masks = torch.zeros(1, 3, 4, 4)
    (rows, cols), = hungarian_match(refer_logits, masks, [torch.ones(1, 4, 4)], num_points=16)
    assert rows.tolist() == [1] and cols.tolist() == [0]
    (rows, cols), = hungarian_match(refer_logits, masks, [torch.zeros(0, 4, 4)], num_points=16)
    assert rows.numel() == 0 and cols.numel() == 0


def test_match_costs_weights_are_official():
    assert MatchCosts() == MatchCosts(cls=2.0, mask=5.0, dice=5.0)
    assert PointSampling() == PointSampling(num_points=12544, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert LossWeights() == LossWeights(cls=2.0, mask=5.0, dice=5.0, aux=0.2, existence=1.0, empty_weight=(1.0, 0.1))


# ---------------------------------------------------------------- loss terms


def test_refer_class_loss_is_weighted_mean_ce_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])
    loss = refer_class_loss(logits, [(torch.tensor([1]), torch.tensor([0]))], torch.tensor([1.0, 0.1]))
    # targets: query 1 referred (weight 1), queries 0 and 2 not referred (weight 0.1)
    nll = [math.log(2.0), softplus(-1.0), softplus(-2.0)]
    expected = (0.1 * nll[0] + 1.0 * nll[1] + 0.1 * nll[2]) / (0.1 + 1.0 + 0.1)
    assert loss.item() == pytest.approx(expected)


def test_mask_point_losses_by_hand():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    bce, dice = mask_point_losses(logits, labels, num_masks=4.0)
    expected_bce = ((math.log(2) + softplus(2.0)) / 2 + (softplus(-1.0) + softplus(1.0)) / 2) / 4
    p = [[0.5, sigmoid(2.0)], [sigmoid(1.0), sigmoid(-1.0)]]
    d0 = 1 - (2 * 0.5 + 1) / (sum(p[0]) + 1 + 1)
    d1 = 1 - (2 * sum(p[1]) + 1) / (sum(p[1]) + 2 + 1)
    assert bce.item() == pytest.approx(expected_bce)
    assert dice.item() == pytest.approx((d0 + d1) / 4)


def test_existence_loss_by_hand_and_clamped_like_the_official_bce():
    loss = existence_loss(torch.tensor([[0.0], [2.0]]), torch.tensor([True, False]))
    assert loss.item() == pytest.approx((math.log(2) + softplus(2.0)) / 2)
    # sigmoid(200) is 1.0 in float32: log(1 - 1) is clamped at -100, as F.binary_cross_entropy does
    assert existence_loss(torch.tensor([[200.0]]), torch.tensor([False])).item() == pytest.approx(100.0)


def test_importance_sampling_keeps_the_most_uncertain_candidates():
    # Left half uncertain (logit 0), right half confident (logit 20); 8 points: 6 importance + 2 random.
    logits = torch.full((1, 1, 8, 8), 20.0)
    logits[..., :4] = 0.0
    g = torch.Generator().manual_seed(0)
    points = uncertain_point_coords(logits, num_points=8, oversample_ratio=3, importance_sample_ratio=0.75, generator=g)
    assert points.shape == (1, 8, 2)
    # 14 of the 24 candidates fall on the flat zero region (x <= 3.5 / 8): the 6 importance points are among them
    g = torch.Generator().manual_seed(0)
    candidates = torch.rand(1, 24, 2, generator=g)
    assert int((candidates[0, :, 0] <= 3.5 / 8).sum()) == 14
    assert (points[0, :6, 0] <= 3.5 / 8).all()
    assert point_sample(logits, points[:, :6]).abs().max().item() == 0.0
    assert all(any(torch.equal(p, c) for c in candidates[0]) for p in points[0, :6])


def test_criterion_by_hand_on_uninformative_masks_with_and_without_targets():
    """Zero mask logits sample to 0 at every point (BCE = log 2 whatever the label) and empty target
    masks sample to 0 (Dice = 1 - 1 / (P/2 + 1)); the totals then follow by hand for 4 rounds."""
    points = 16
    n = 3
    refer = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [1.0, 0.0]], [[0.5, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    masks = torch.zeros(2, n, 8, 8, requires_grad=True)
    existence = torch.tensor([[1.0], [-1.0]])
    targets = [torch.zeros(1, 8, 8), torch.zeros(0, 8, 8)]  # image 0: one target; image 1: no target
    rounds = [(masks, refer)] * 4
    crit = Criterion(sampling=PointSampling(num_points=points), generator=torch.Generator().manual_seed(0))
    out = crit(rounds, existence, targets)

    # class: image 0 matches query 1 (highest p_referred); image 1 has no target
    nll_referred = softplus(-3.0)  # query 1 of image 0 -> class 0
    nll_not = [math.log(2.0), softplus(1.0), softplus(0.5), softplus(-1.0), math.log(2.0)]  # the 5 others -> class 1
    cls = (1.0 * nll_referred + 0.1 * sum(nll_not)) / (1.0 + 0.1 * 5)
    bce = math.log(2.0)  # one matched mask, num_masks = 1
    dice = 1 - 1 / (0.5 * points + 1)
    exist = (softplus(-1.0) + softplus(-1.0)) / 2  # targets 1 then 0
    per_round = 2 * cls + 5 * bce + 5 * dice
    assert out.num_masks == 1.0
    assert out.terms["loss_class"].item() == pytest.approx(cls)
    assert out.terms["loss_class_2"].item() == pytest.approx(cls)
    assert out.terms["loss_mask_0"].item() == pytest.approx(bce)
    assert out.terms["loss_dice_1"].item() == pytest.approx(dice)
    assert out.terms["loss_label_nt"].item() == pytest.approx(exist)
    names = {f"loss_{k}{s}" for k in ("class", "mask", "dice") for s in ("", "_0", "_1", "_2")}
    assert set(out.terms) == names | {"loss_label_nt"}
    assert out.weighted["loss_class"].item() == pytest.approx(2 * cls * (1 + 3 * 0.2))
    assert out.total.item() == pytest.approx(per_round * (1 + 3 * 0.2) + exist)
    out.total.backward()
    assert masks.grad is not None and masks.grad[1].abs().sum() == 0  # no-target image: no mask gradient

    # a batch without any target: only the class and existence terms, num_masks clamped to 1
    only_empty = crit([(masks[1:], refer[1:])] * 4, existence[1:], targets[1:])
    cls_empty = (softplus(0.5) + softplus(-1.0) + math.log(2.0)) / 3  # equal weights 0.1 cancel
    assert only_empty.num_masks == 1.0
    assert only_empty.terms["loss_mask"].item() == 0.0 and only_empty.terms["loss_dice_0"].item() == 0.0
    assert only_empty.total.item() == pytest.approx(2 * cls_empty * 1.6 + softplus(-1.0))


# ---------------------------------------------------------------- optimizer, schedule, data


def test_official_schedules_by_epoch():
    assert [SCHEDULES["grefcoco"].factor(e) for e in range(6)] == [1, 1, 1, 1, 1, pytest.approx(0.1)]
    refcoco = [SCHEDULES["refcoco"].factor(e) for e in range(20)]
    assert refcoco[0] == 0.5 and refcoco[1:14] == [1.0] * 13
    assert refcoco[14:18] == [pytest.approx(0.1)] * 4 and refcoco[18:] == [pytest.approx(0.01)] * 2
    assert Schedule(epochs=4, warmup_epochs=3).factor(1) == pytest.approx(2 / 4)


def test_optimizer_is_official_adam_with_parameter_groups():
    model = deris.build_model("deris-tiny")
    freeze_swin(model)
    cfg = TrainConfig(preset="deris-tiny", data_root="", tokenizer="")
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.Adam)
    assert opt.defaults["amsgrad"] is True and opt.defaults["betas"] == (0.9, 0.98)
    assert opt.defaults["eps"] == 1e-9 and opt.defaults["weight_decay"] == 0.0
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(lr_of)  # each parameter in one group
    for name, p in names.items():
        if name.startswith("perception.swin."):
            assert not p.requires_grad and id(p) not in lr_of
        elif name.startswith("cognition.beit3."):
            assert lr_of[id(p)] == 5e-5
        else:
            assert lr_of[id(p)] == 1e-4, name
    assert [g["lr"] for g in opt.param_groups] == [5e-5, 1e-5, 1e-4, 1e-4]
    assert opt.param_groups[1]["params"] == []  # Swin frozen: its group is empty, as official


def test_epoch_sampler_shards_pads_and_resumes():
    full = [p for _, p in EpochSampler(10, epoch=2, seed=0, rank=0, world=1, batch_size=3)]
    assert sorted(full) == list(range(10))
    assert full == [p for _, p in EpochSampler(10, epoch=2, seed=0, rank=0, world=1, batch_size=3)]
    assert full != [p for _, p in EpochSampler(10, epoch=3, seed=0, rank=0, world=1, batch_size=3)]
    shards = [[p for _, p in EpochSampler(10, 2, 0, rank, 4, 1)] for rank in range(4)]
    assert [len(x) for x in shards] == [3, 3, 3, 3]  # padded by repetition to 12, as DistributedSampler
    assert set(sum(shards, [])) == set(range(10))
    assert [p for _, p in EpochSampler(10, 2, 0, 0, 1, 3, start_batch=2)] == full[6:]
    assert all(e == 2 for e, _ in EpochSampler(10, 2, 0, 0, 1, 3))


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """8 synthetic images: 5 for training (18 expressions), 1 each for val, testA, testB."""
    root = tmp_path_factory.mktemp("shapes")
    write_dataset(root, 8, seed=0)
    return root


def test_training_set_targets_and_nsc(shapes, spm_path):
    view = SplitView(datasets.load_split(shapes, "grefcoco", "train"))
    cfg = deris.get_config("deris-tiny")
    encoder = TextEncoder.from_spm(spm_path, cfg.max_text_len)
    plain = TrainingSet(view, encoder, cfg, None, seed=0)
    for position in range(len(view)):
        sample = view.split[position]
        item = plain[(0, position)]
        masks = item["masks"]
        assert masks.shape[1:] == (128, 128) and masks.dtype == torch.bool
        assert masks.shape[0] == len(view.instance_masks(position)) == len(sample.ann_ids)
        if masks.shape[0]:  # one target per referred object; together the (resized) GT
            union = datasets.resize_mask_nearest(sample.gt_mask, (128, 128))
            assert np.array_equal(masks.any(0).numpy(), union)
        assert torch.equal(item["token_ids"], torch.from_numpy(encoder.encode(sample.expression)[0]))
    assert max(len(view.instance_masks(p)) for p in range(len(view))) >= 2  # multi-target samples exist

    always = TrainingSet(view, encoder, cfg, NSCConfig(rate=1.0), seed=0)
    converted = 0
    for position in range(len(view)):
        item = always[(0, position)]
        if view.has_target(position) and item["masks"].shape[0] == 0:
            converted += 1
            ids = item["token_ids"]
            assert not torch.equal(ids, torch.from_numpy(encoder.encode(view.expression(position))[0]))
            own = [e for p, e in enumerate(view.split) if e.image_id == view.image_id(position)]
            assert all(not torch.equal(ids, torch.from_numpy(encoder.encode(o.expression)[0])) for o in own)
        assert torch.equal(item["masks"], always[(0, position)]["masks"])  # same (epoch, position), same draw
    assert converted >= 0.8 * sum(view.has_target(p) for p in range(len(view)))


# ---------------------------------------------------------------- the loop


@pytest.fixture
def one_thread():
    """One intra-op thread: on the small shared CI machines several threads per process oversubscribe the
    cores and make these loops several times slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(shapes: Path, spm_path: Path, **overrides) -> TrainConfig:
    values = dict(
        preset="deris-tiny", data_root=str(shapes), tokenizer=str(spm_path), schedule=Schedule(epochs=2),
        batch_size=4, workers=0, val_split=None, num_points=1024, save_every=3,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_overfits_a_handful_of_samples_in_under_a_minute(tmp_path, spm_path, one_thread):
    root = tmp_path / "four"
    write_dataset(root, 4, seed=1)  # one training image with 4 expressions
    cfg = _config(root, spm_path, schedule=Schedule(epochs=40), batch_size=8, lr=5e-4, lr_beit3=2.5e-4,
                  lr_pixel_decoder=5e-4, num_points=12544, save_every=1000)
    losses: list[float] = []
    started = time.time()
    result = train(cfg, tmp_path / "run", quiet=True, on_step=lambda s: losses.append(s.losses["loss"]))
    elapsed = time.time() - started
    assert result.steps == 40 and len(losses) == 40
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
    assert elapsed < 60, f"overfitting took {elapsed:.0f} s"


def test_resume_continues_from_the_same_step_with_the_same_loss(tmp_path, shapes, spm_path, one_thread):
    cfg = _config(shapes, spm_path, max_steps=6)
    reference: list[float] = []
    train(cfg, tmp_path / "a", quiet=True, on_step=lambda s: reference.append(s.losses["loss"]))
    assert len(reference) == 6

    def interrupt_at(step: int, error: type[BaseException]):
        def on_step(s):
            if s.step == step:
                raise error("stop")
        return on_step

    # Ctrl-C after step 4: the run saves step 4 and re-raises; resuming replays steps 5 and 6 exactly.
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", quiet=True, on_step=interrupt_at(4, KeyboardInterrupt))
    state = read_training_state(tmp_path / "b" / LAST_CHECKPOINT)["training"]
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 0, 4)
    resumed: list[tuple[int, float]] = []
    train(cfg, tmp_path / "b", resume=True, quiet=True, on_step=lambda s: resumed.append((s.step, s.losses["loss"])))
    assert resumed == [(5, reference[4]), (6, reference[5])]

    # A crash after step 5 saves nothing: the periodic checkpoint of step 3 is where the run resumes.
    with pytest.raises(RuntimeError):
        train(cfg, tmp_path / "c", quiet=True, on_step=interrupt_at(5, RuntimeError))
    assert read_training_state(tmp_path / "c" / LAST_CHECKPOINT)["training"]["step"] == 3
    resumed = []
    train(cfg, tmp_path / "c", resume=True, quiet=True, on_step=lambda s: resumed.append((s.step, s.losses["loss"])))
    assert resumed == [(4, reference[3]), (5, reference[4]), (6, reference[5])]

    with pytest.raises(ValueError, match="batch_size"):
        train(_config(shapes, spm_path, max_steps=6, batch_size=2), tmp_path / "c", resume=True, quiet=True)

    # Both outputs load with deris.load_checkpoint and hold the same final weights.
    last, final = deris.build_model("deris-tiny"), deris.build_model("deris-tiny")
    deris.load_checkpoint(last, tmp_path / "c" / LAST_CHECKPOINT)
    deris.load_checkpoint(final, tmp_path / "c" / "model.safetensors")
    reference_model = deris.build_model("deris-tiny")
    deris.load_checkpoint(reference_model, tmp_path / "a" / "model.safetensors")
    for (name, a), b, c in zip(last.state_dict().items(), final.state_dict().values(), reference_model.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c), name


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="deris")
    add_train(parser.add_subparsers(dest="command", required=True))
    return run_main("deris", parser, list(argv))


def test_train_cli_evaluates_resumes_and_refuses_bad_usage(tmp_path, shapes, spm_path, capsys, one_thread):
    out = tmp_path / "run"
    common = ["--preset", "deris-tiny", "--data-root", str(shapes), "--tokenizer", str(spm_path), "--batch-size", "4",
              "--num-points", "512", "--workers", "0", "--quiet"]
    assert _cli("train", "--out", str(out), *common, "--max-steps", "2") == 0
    printed = capsys.readouterr().out
    assert "trained 2 steps" in printed and "final evaluation on val: gIoU" in printed
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["eval"]["step"] == 2 and "cIoU" in log[-1]["eval"]
    assert json.loads((out / "config.json").read_text())["schedule"] == {
        "epochs": 6, "warmup_epochs": 0, "decay_epochs": [6], "decay_ratio": 0.1}

    assert _cli("train", "--out", str(out), *common) == 2
    assert "is not empty" in capsys.readouterr().err
    assert _cli("train", "--out", str(out), "--resume", "--max-steps", "3", "--quiet") == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert _cli("train", "--out", str(tmp_path / "none"), "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert _cli("train", "--out", str(tmp_path / "x"), "--preset", "deris-tiny") == 2
    err = capsys.readouterr().err
    assert err.startswith("deris train: error:") and "--data-root, --tokenizer required" in err
    assert _cli("train", "--out", str(tmp_path / "y"), *common, "--amp", "fp16", "--device", "cpu") == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def _torchrun(*argv: str) -> dict[str, Any]:
    """``subprocess`` arguments for ``torchrun --standalone --nproc_per_node 2 -m deris.cli train ...`` on the CPU
    (gloo), as a user runs it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "deris.cli", "train", *argv]
    return {"args": command, "text": True, "env": {**os.environ, "OMP_NUM_THREADS": "1"}}


def _torchrun_train(*argv: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(**_torchrun(*argv), capture_output=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_torchrun_trains_in_two_processes_writes_once_and_resumes_exactly(tmp_path, shapes, spm_path, capsys):
    common = ["--preset", "deris-tiny", "--data-root", str(shapes), "--tokenizer", str(spm_path), "--batch-size", "2",
              "--num-points", "512", "--workers", "0", "--log-every", "1", "--save-every", "2", "--quiet"]
    # 18 training expressions, 2 processes x 2 samples a step: 5 steps an epoch, so step 6 starts epoch 2.
    whole = _torchrun_train("--out", str(tmp_path / "whole"), *common, "--max-steps", "6")
    assert "trained 6 steps" in whole.stdout and "final evaluation on val: gIoU" in whole.stdout
    records = [json.loads(line) for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" not in r] == [1, 2, 3, 4, 5, 6]  # one process writes the log
    assert [r["eval"]["step"] for r in records if "eval" in r] == [5, 6]  # after epoch 1, and at the end
    state = read_training_state(tmp_path / "whole" / LAST_CHECKPOINT)["training"]
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (6, 1, 1)
    assert len(state["rng"]) == 2  # each process's random state, for an exact resume

    _torchrun_train("--out", str(tmp_path / "split"), *common, "--max-steps", "3")
    _torchrun_train("--out", str(tmp_path / "split"), "--resume", "--max-steps", "6", "--quiet")
    resumed = [json.loads(line) for line in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]

    def losses(log: list[dict]) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in log if "eval" not in r]

    # The split run's evaluation at step 3 does not change what follows it.
    assert losses(resumed) == losses(records)
    # Ctrl-C: the terminal signals torchrun, which passes it on to its processes; they agree on a step boundary,
    # save it and stop, and the run resumes from there exactly.
    log = tmp_path / "stopped" / "train_log.jsonl"
    shown = [flag for flag in common if flag != "--quiet"]  # the interruption message is what is checked
    with subprocess.Popen(**_torchrun("--out", str(tmp_path / "stopped"), *shown), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as run:
        deadline = time.time() + 300
        while not (log.is_file() and log.read_text().count("\n") >= 2) and run.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        output, _ = run.communicate(timeout=300)
    stopped_at = read_training_state(tmp_path / "stopped" / LAST_CHECKPOINT)["training"]["step"]
    assert f"interrupted: saved step {stopped_at} " in output and 2 <= stopped_at < 6, output[-3000:]
    assert "Unable to shutdown" not in output, output[-3000:]  # torchrun had to kill a process that did not exit
    _torchrun_train("--out", str(tmp_path / "stopped"), "--resume", "--max-steps", "6", "--quiet")
    assert losses([json.loads(line) for line in log.read_text().splitlines()]) == losses(records)

    # One process cannot take over the two's epoch without skipping and repeating samples: refused.
    assert _cli("train", "--out", str(tmp_path / "split"), "--resume", "--max-steps", "7") == 2
    assert "was saved by 2 training process(es) and this run has 1" in capsys.readouterr().err
    a = deris.from_checkpoint("deris-tiny", tmp_path / "whole" / "model.safetensors").state_dict()
    b = deris.from_checkpoint("deris-tiny", tmp_path / "split" / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_fine_tunes_from_an_official_training_file(tmp_path, shapes, spm_path, capsys, one_thread):
    official = tmp_path / "latest.pth"
    start = {official_to_ours(k): v for k, v in write_official_file(official, fresh_tiny(1)).items()}
    out = tmp_path / "tuned"
    assert _cli("train", "--out", str(out), "--preset", "deris-tiny", "--data-root", str(shapes), "--tokenizer",
                str(spm_path), "--init", str(official), "--batch-size", "2", "--num-points", "512", "--workers", "0",
                "--val-split", "none", "--max-steps", "1") == 0
    printed = capsys.readouterr().out
    assert f"initialised from {official}: official checkpoint" in printed and "saved after epoch 12" in printed
    tuned = deris.from_checkpoint("deris-tiny", out / "model.safetensors").state_dict()
    assert tuned.keys() == start.keys()
    for key, value in start.items():
        if key.startswith(FROZEN_PREFIX):
            assert torch.equal(tuned[key], value), key  # Swin frozen, as official
        else:
            # One Adam step moves a weight by at most its learning rate (1e-4, BEiT-3 5e-5): the run started
            # from the official weights, not from a fresh initialisation.
            assert (tuned[key] - value).abs().max() <= 1e-4 * (1 + 1e-3), key
    assert sum(not torch.equal(tuned[k], v) for k, v in start.items()) > len(start) // 2


def test_bf16_autocast_trains_on_the_cpu(tmp_path, shapes, spm_path, one_thread):
    losses: dict[str, list[float]] = {"off": [], "bf16": []}
    for amp, record in losses.items():
        cfg = _config(shapes, spm_path, max_steps=2, amp=amp, device="cpu")
        train(cfg, tmp_path / amp, quiet=True, on_step=lambda s, record=record: record.append(s.losses["loss"]))
    # Autocast is really on (bf16 rounds the forward), yet the step's loss stays near the float32 one.
    assert losses["bf16"][0] != losses["off"][0]
    assert losses["bf16"][0] == pytest.approx(losses["off"][0], rel=0.01)
    # The weights themselves stay float32 (autocast rounds activations only), as the file shows.
    from safetensors import safe_open

    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as saved:
        assert {saved.get_tensor(k).dtype for k in saved.keys()} == {torch.float32}


def test_train_flags_set_the_run_and_defaults_follow_the_dataset():
    from deris.training.cli import _train_config

    parser = argparse.ArgumentParser(prog="deris")
    add_train(parser.add_subparsers(dest="command", required=True))
    required = ["train", "--out", "o", "--preset", "deris-tiny", "--data-root", "d", "--tokenizer", "t.spm"]
    official = _train_config(parser.parse_args([*required, "--dataset", "refcoco"]))
    assert official.schedule == SCHEDULES["refcoco"] and official.batch_size == 16 and official.nsc
    assert (official.lr, official.lr_beit3, official.lr_pixel_decoder, official.lr_swin) == (1e-4, 5e-5, 1e-4, 1e-5)
    assert (official.grad_clip, official.seed, official.num_points, official.amp) == (0.15, 6666, 12544, "off")
    assert (official.val_split, official.init, official.train_swin) == ("val", None, False)

    tuned = _train_config(parser.parse_args([
        *required, "--epochs", "3", "--warmup-epochs", "1", "--decay-epochs", "2,3", "--no-nsc", "--lr", "4e-4",
        "--lr-swin", "1e-3", "--train-swin", "--batch-size", "8", "--grad-clip", "1", "--val-split", "none",
        "--init", "w.pth", "--seed", "3", "--num-points", "2304",
    ]))
    assert tuned.schedule == Schedule(epochs=3, warmup_epochs=1, decay_epochs=(2, 3), decay_ratio=0.1)
    assert (tuned.lr, tuned.lr_beit3, tuned.lr_pixel_decoder, tuned.lr_swin) == (4e-4, 2e-4, 4e-4, 1e-3)
    assert (tuned.nsc, tuned.train_swin, tuned.batch_size, tuned.grad_clip) == (False, True, 8, 1.0)
    assert (tuned.val_split, tuned.init, tuned.seed, tuned.num_points) == (None, "w.pth", 3, 2304)
    with pytest.raises(SystemExit):
        parser.parse_args([*required, "--decay-epochs", "0,2"])  # 1-based, as official
