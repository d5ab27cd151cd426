"""The DeRIS training loop, configured as the official ``tools/train.py`` + ``deris/apis/train.py``.

Official settings (configs ``DERIS-{B,L}-{grefcoco,refcoco}.py``, ``configs/_base_/misc.py``):

* ``torch.optim.Adam(amsgrad=True, betas=(0.9, 0.98), eps=1e-9, weight_decay=0)`` over five parameter
  groups matched on name substrings: ``vis_enc`` (BEiT-3, lr / 2 = 5e-5), ``lan_enc`` (empty),
  ``hier_vision_encoder`` (Swin, lr / 10, empty since Swin is frozen), ``pixel_decoder`` (lr = 1e-4)
  and everything else (lr = 1e-4). Here: ``cognition.beit3.``, ``perception.swin.``,
  ``perception.pixel_decoder.``, the rest (there is no language encoder).
* the global gradient norm clipped at 0.15 (``grad_norm_clip``) over all parameters;
* ``MultiStepLRWarmUp`` stepped once per epoch: factor (e + 1) / (warmup + 1) during warmup, then
  ``decay_ratio`` per decay step s with e + 1 >= s. gRefCOCO: 6 epochs, no warmup, decay at [6]
  (factor 0.1 in the last epoch); RefCOCO: 20 epochs, warmup 1, decay at [15, 19];
* Swin frozen (``requires_grad=False``) but in train mode like the rest of the model; seed 6666,
  cuDNN deterministic; fp32 (``use_fp16=False``); batch 1 per GPU for gRefCOCO, 16 for RefCOCO;
  evaluation on the val split after every epoch; NSC on gRefCOCO training samples only.
* the loss: :class:`deris.training.losses.Criterion` on all four rounds.

Additions: bf16/fp16 autocast on GPU (fp16 with a gradient scaler, unscaled before clipping),
checkpoints every ``save_every`` steps, at the end and on Ctrl-C (atomic, ``last.pt``), exact
resumption (optimizer, step, position in the epoch and the random generators), a progress bar, and
DistributedDataParallel under ``torchrun`` (``find_unused_parameters=True`` as official: a process
whose batch has no target gives the mask head no gradient).

Data come from :mod:`deris.datasets` (the official layout or the refer toolkit's); each target is one
referred object, its mask nearest-resized to the model's input size (mmdet ``BitmapMasks.resize``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from deris import datasets
from deris.atomic import atomic_file
from deris.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from deris.cli_support import CheckFailed, UsageError
from deris.config import DerisConfig, get_config
from deris.evaluation import GresMetrics, RisMetrics
from deris.modeling.deris import DeRIS
from deris.postprocess import decide, upsample_masks
from deris.preprocess import preprocess_image
from deris.text import TextEncoder, load_tokenizer
from deris.training.losses import Criterion, PointSampling
from deris.training.nsc import NSCConfig, convert_to_non_referent

LAST_CHECKPOINT = "last.pt"
FINAL_MODEL = "model.safetensors"
LOG_FILE = "train_log.jsonl"
AMP_MODES = ("off", "bf16", "fp16")

# (name prefix, TrainConfig field holding its learning rate); every other parameter uses ``lr``.
PARAMETER_GROUPS = (
    ("cognition.beit3.", "lr_beit3"),
    ("perception.swin.", "lr_swin"),
    ("perception.pixel_decoder.", "lr_pixel_decoder"),
)
FROZEN_PREFIX = "perception.swin."


@dataclass(frozen=True)
class Schedule:
    """``MultiStepLRWarmUp``: epochs, warmup epochs, decay epochs (1-based, as official) and ratio."""

    epochs: int
    warmup_epochs: int = 0
    decay_epochs: tuple[int, ...] = ()
    decay_ratio: float = 0.1

    def factor(self, epoch: int) -> float:
        """The learning-rate factor of 0-based ``epoch``."""
        if epoch <= self.warmup_epochs - 1:
            return (epoch + 1) / (self.warmup_epochs + 1)
        factor = 1.0
        for step in self.decay_epochs:
            if epoch + 1 < step:
                break
            factor *= self.decay_ratio
        return factor


# The official schedules; gRefCOCO trains with the first, RefCOCO/+/g (mixed) with the second.
SCHEDULES = {
    "grefcoco": Schedule(epochs=6, warmup_epochs=0, decay_epochs=(6,), decay_ratio=0.1),
    "refcoco": Schedule(epochs=20, warmup_epochs=1, decay_epochs=(15, 19), decay_ratio=0.1),
}


def default_schedule(dataset: str) -> Schedule:
    return SCHEDULES["grefcoco" if dataset == "grefcoco" else "refcoco"]


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint)."""

    preset: str
    data_root: str
    tokenizer: str
    dataset: str = "grefcoco"
    split: str = "train"
    val_split: str | None = "val"
    data_format: str = "official"
    init: str | None = None
    schedule: Schedule = field(default_factory=lambda: SCHEDULES["grefcoco"])
    lr: float = 1e-4
    lr_beit3: float = 5e-5
    lr_pixel_decoder: float = 1e-4
    lr_swin: float = 1e-5
    # Official: Swin is pretrained and frozen. Training from scratch (the demo model) trains it too.
    train_swin: bool = False
    batch_size: int = 1
    grad_clip: float = 0.15
    amp: str = "off"
    nsc: bool = True
    num_points: int = PointSampling().num_points
    query_sa: str | None = None
    seed: int = 6666
    # How the run is carried out; these may change when a run is resumed.
    max_steps: int | None = None
    save_every: int = 1000
    eval_every: int = 1
    log_every: int = 50
    workers: int = 2
    device: str | None = None

    RESUMABLE_CHANGES = ("max_steps", "save_every", "eval_every", "log_every", "workers", "device")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["schedule"]["decay_epochs"] = list(self.schedule.decay_epochs)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        values = dict(data)
        schedule = dict(values.pop("schedule"))
        schedule["decay_epochs"] = tuple(schedule["decay_epochs"])
        return cls(schedule=Schedule(**schedule), **values)

    def validate(self) -> None:
        if self.amp not in AMP_MODES:
            raise UsageError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        for name in ("batch_size", "save_every", "log_every", "num_points"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_every < 0 or self.workers < 0:
            raise UsageError("eval_every and workers must not be negative")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.schedule.epochs < 1:
            raise UsageError(f"the schedule needs at least one epoch, got {self.schedule.epochs}")
        if self.grad_clip <= 0:
            raise UsageError(f"grad_clip must be positive, got {self.grad_clip}")


@dataclass(frozen=True)
class StepLog:
    """What one optimizer step reports (averaged over processes): losses, learning rate, position."""

    step: int
    epoch: int
    losses: dict[str, float]
    lr: float


@dataclass
class TrainResult:
    steps: int
    epochs_done: int  # complete epochs
    last_losses: dict[str, float]
    evaluations: list[dict[str, Any]]
    checkpoint: Path
    model: Path
    main_process: bool  # rank 0 (the one that wrote the files)


# --- parameters ---------------------------------------------------------------------------------------


def freeze_swin(model: nn.Module) -> None:
    """Freeze the Swin backbone, as ``freeze_hier_backbone=True`` (it stays in train mode)."""
    for name, parameter in model.named_parameters():
        if name.startswith(FROZEN_PREFIX):
            parameter.requires_grad_(False)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam + AMSGrad with the official parameter groups (frozen parameters are left out)."""
    groups: list[dict[str, Any]] = [{"params": [], "lr": getattr(cfg, key), "name": prefix} for prefix, key in PARAMETER_GROUPS]
    rest: dict[str, Any] = {"params": [], "lr": cfg.lr, "name": "rest"}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        group = next((g for g, (prefix, _) in zip(groups, PARAMETER_GROUPS) if name.startswith(prefix)), rest)
        group["params"].append(parameter)
    for group in [*groups, rest]:
        group["initial_lr"] = group["lr"]
    return torch.optim.Adam([*groups, rest], betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0, amsgrad=True)


def set_epoch_lr(optimizer: torch.optim.Optimizer, schedule: Schedule, epoch: int) -> float:
    """Apply the epoch's schedule factor to every group's initial lr; returns the "rest" group's lr."""
    factor = schedule.factor(epoch)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return float(optimizer.param_groups[-1]["lr"])


# --- data ---------------------------------------------------------------------------------------------


class SplitView:
    """The trainer's view of a :class:`deris.datasets.RefDataset`: per-sample metadata without decoding
    masks (for NSC's pool) and the referred objects' masks one by one (the official training targets).

    ``deris.datasets`` exposes only the union mask of a sample, so the per-object masks are decoded
    from its entries here (the only place that reaches into that module's internals).
    """

    def __init__(self, split: datasets.RefDataset) -> None:
        self.split = split
        self._entries = split._entries

    def __len__(self) -> int:
        return len(self._entries)

    def image_id(self, position: int) -> int:
        return self._entries[position].image_id

    def expression(self, position: int) -> str:
        return self._entries[position].expression

    def image_path(self, position: int) -> Path:
        return self._entries[position].image_path

    def has_target(self, position: int) -> bool:
        return bool(self._entries[position].segmentations)

    def instance_masks(self, position: int) -> list[np.ndarray]:
        """bool [H, W] per referred object, at the original image size; [] for no target."""
        entry = self._entries[position]
        height, width = datasets._mask_size(entry)
        return [datasets._decode_segmentation(s, height, width, entry.where) for s in entry.segmentations]

    def expression_pool(self) -> dict[int, list[str]]:
        """Every image's raw expressions: NSC's pool (the official ``train_dict.json``)."""
        pool: dict[int, list[str]] = {}
        for entry in self._entries:
            pool.setdefault(entry.image_id, []).append(entry.expression)
        return pool


class TrainingSet(Dataset[dict[str, Any]]):
    """Indexed by (epoch, position): NSC draws from a generator seeded by (seed, epoch, position), so a
    sample's conversion does not depend on worker count, order or resumption."""

    def __init__(
        self, view: SplitView, encoder: TextEncoder, cfg: DerisConfig, nsc: NSCConfig | None, seed: int
    ) -> None:
        self.view = view
        self.encoder = encoder
        self.image_size = cfg.image_size
        self.mini_size = cfg.mini_image_size
        self.nsc = nsc
        self.seed = seed
        self.pool = view.expression_pool() if nsc is not None else {}

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, position = key
        expression = self.view.expression(position)
        has_target = self.view.has_target(position)
        converted = None
        if self.nsc is not None and has_target:
            rng = random.Random(f"nsc:{self.seed}:{epoch}:{position}")
            converted = convert_to_non_referent(self.view.image_id(position), expression, True, self.pool, rng, self.nsc)
        size = (self.image_size, self.image_size)
        masks = [] if converted is not None else self.view.instance_masks(position)
        resized = [datasets.resize_mask_nearest(m, size) for m in masks]
        prepared = preprocess_image(self.view.image_path(position), self.image_size, self.mini_size)
        token_ids, pad_mask = self.encoder.encode(converted if converted is not None else expression)
        return {
            "img": torch.from_numpy(prepared.img),
            "img_mini": torch.from_numpy(prepared.img_mini),
            "token_ids": torch.from_numpy(token_ids),
            "pad_mask": torch.from_numpy(pad_mask),
            "masks": torch.from_numpy(np.stack(resized)) if resized else torch.zeros(0, *size, dtype=torch.bool),
        }


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: torch.stack([b[k] for b in batch]) for k in ("img", "img_mini", "token_ids", "pad_mask")}
    out["masks"] = [b["masks"] for b in batch]
    return out


class EpochSampler(Sampler[tuple[int, int]]):
    """One epoch's shuffled positions for this process, as ``DistributedSampler`` (permutation seeded by
    seed + epoch, padded by repetition to a multiple of the world size), from batch ``start_batch`` on."""

    def __init__(self, size: int, epoch: int, seed: int, rank: int, world: int, batch_size: int, start_batch: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(size, generator=generator).tolist()
        total = math.ceil(size / world) * world
        order = (order * math.ceil(total / size))[:total]
        self.epoch = epoch
        self.positions = order[rank:total:world][start_batch * batch_size :]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter((self.epoch, p) for p in self.positions)

    def __len__(self) -> int:
        return len(self.positions)


def batches_per_epoch(size: int, world: int, batch_size: int) -> int:
    return math.ceil(math.ceil(size / world) / batch_size)


# --- evaluation ---------------------------------------------------------------------------------------


class EvalSet(Dataset[dict[str, Any]]):
    def __init__(self, split: datasets.RefDataset, encoder: TextEncoder, cfg: DerisConfig) -> None:
        self.split = split
        self.encoder = encoder
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, position: int) -> dict[str, Any]:
        sample = self.split[position]
        size = self.cfg.image_size
        prepared = preprocess_image(sample.image_path, size, self.cfg.mini_image_size)
        token_ids, pad_mask = self.encoder.encode(sample.expression)
        return {
            "img": torch.from_numpy(prepared.img),
            "img_mini": torch.from_numpy(prepared.img_mini),
            "token_ids": torch.from_numpy(token_ids),
            "pad_mask": torch.from_numpy(pad_mask),
            "gt": datasets.official_gt_mask(sample, (size, size)),
            "no_target": sample.no_target,
        }


def _eval_collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: torch.stack([b[k] for b in batch]) for k in ("img", "img_mini", "token_ids", "pad_mask")}
    out["gt"] = [b["gt"] for b in batch]
    out["no_target"] = [b["no_target"] for b in batch]
    return out


@torch.no_grad()
def evaluate(
    model: DeRIS,
    split: datasets.RefDataset,
    encoder: TextEncoder,
    device: torch.device,
    *,
    batch_size: int = 8,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """The official metrics of ``model`` on ``split`` at the model's input size (gRefCOCO: gIoU, cIoU,
    N-acc, T-acc, Pr@t; RefCOCO: mIoU, oIoU, Pr@t). Under torch.distributed each process scores its
    shard and the sums are merged, so every process returns the same numbers."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    shard = split.shard(rank, world) if world > 1 else split
    metrics: GresMetrics | RisMetrics = GresMetrics() if split.has_no_target else RisMetrics()
    was_training = model.training
    model.eval()
    # Evaluation draws nothing random, but a loader seeds its iterator from the global RNG unless given a
    # generator of its own: without one an evaluation would change the training run that follows it (and a
    # run stopped and evaluated at --max-steps would not resume as the uninterrupted run goes on).
    loader = DataLoader(
        EvalSet(shard, encoder, model.cfg), batch_size=batch_size, num_workers=workers, collate_fn=_eval_collate,
        generator=torch.Generator(),
    )
    for batch in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(*(batch[k].to(device) for k in ("img", "img_mini", "token_ids", "pad_mask")))
        _, selected, masks = decide(out["pred_masks_lowres"].float(), out["pred_refer_logits"].float(), model.cfg.score_threshold)
        for b, gt in enumerate(batch["gt"]):
            pred = masks[b].cpu().numpy()
            if isinstance(metrics, GresMetrics):
                metrics.update(pred, gt, pred_no_target=not bool(selected[b].any()), gt_no_target=bool(batch["no_target"][b]))
            else:
                metrics.update(pred, gt)
    model.train(was_training)
    if world > 1:
        states: list[Any] = [None] * world
        dist.all_gather_object(states, metrics.to_state())
        merged = type(metrics).from_state(states[0])
        for state in states[1:]:
            merged = merged.merge(type(metrics).from_state(state))  # type: ignore[arg-type]
        metrics = merged
    return metrics.compute()


# --- checkpoints --------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_training_state(path: Path) -> dict[str, Any]:
    """The training state of a ``last.pt`` (loadable with ``weights_only``; the weights are under ``state_dict``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable files
        raise UsageError(f"cannot read the training checkpoint {path}: {exc}") from exc
    if not isinstance(obj, dict) or "training" not in obj or "state_dict" not in obj:
        raise UsageError(f"{path} is not a deris training checkpoint (no training state)")
    return obj


# --- the loop -----------------------------------------------------------------------------------------


class _StopFlag:
    """Ctrl-C asks the loop to stop at the next step boundary (a second Ctrl-C interrupts at once)."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: object) -> None:
            self.requested = True
            signal.signal(signal.SIGINT, previous)

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _process_group() -> Iterator[tuple[int, int, int]]:
    """(rank, world size, local rank); under torchrun the process group is set up for the block (unless the
    caller already did) and torn down after it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1, 0
        return
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    except BaseException as error:
        # A traceback keeps the block's locals alive, a DDP model among them: freed after the process group is
        # destroyed, its reducer can wait for the other processes forever (Ctrl-C under torchrun hung a process
        # until torchrun killed it). Free them first, along the whole exception chain; the tracebacks keep
        # their lines.
        chained: BaseException | None = error
        while chained is not None:
            traceback.clear_frames(chained.__traceback__)
            chained = chained.__cause__ or chained.__context__
        raise
    finally:
        if owned:
            dist.destroy_process_group()


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device is not None:
        device = torch.device(cfg.device)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device} requested but CUDA is not available")
        torch.cuda.set_device(device)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device (bf16 also runs on CPU)")
    return device


def _reduce_step(values: dict[str, torch.Tensor], stop_requested: bool) -> tuple[dict[str, float], bool]:
    """The step's losses averaged over processes, and whether any process asked to stop (so that all
    stop at the same step)."""
    device = next(iter(values.values())).device
    stacked = torch.stack([*(v.detach().float() for v in values.values()), torch.tensor(float(stop_requested), device=device)])
    world = 1
    if dist.is_initialized():
        dist.all_reduce(stacked)
        world = dist.get_world_size()
    numbers = stacked.tolist()
    return {k: v / world for k, v in zip(values, numbers)}, numbers[-1] > 0


def _load_split(cfg: TrainConfig, split: str) -> datasets.RefDataset:
    return datasets.load_split(cfg.data_root, cfg.dataset, split, cfg.data_format)


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    on_step: Callable[[StepLog], None] | None = None,
) -> TrainResult:
    """Train (or, with ``resume``, continue training) into ``out_dir``.

    Writes ``last.pt`` (weights + training state, every ``save_every`` steps, at the end and on Ctrl-C),
    ``model.safetensors`` (the final weights), ``config.json`` and ``train_log.jsonl``. ``on_step`` is
    called after every optimizer step (on every process). Raises KeyboardInterrupt after saving when
    interrupted, CheckFailed when the loss is not finite, UsageError for bad settings or data.
    """
    cfg.validate()
    with _process_group() as (rank, world, local_rank):
        return _train(cfg, Path(out_dir), resume, quiet, on_step, rank, world, local_rank)


def _train(
    cfg: TrainConfig,
    out_dir: Path,
    resume: bool,
    quiet: bool,
    on_step: Callable[[StepLog], None] | None,
    rank: int,
    world: int,
    local_rank: int,
) -> TrainResult:
    device = _device(cfg, local_rank)
    state: dict[str, Any] | None = None
    if resume:
        state = read_training_state(out_dir / LAST_CHECKPOINT)
        saved = TrainConfig.from_dict(state["training"]["config"])
        fixed = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in TrainConfig.RESUMABLE_CHANGES]
        changed = [name for name in fixed if getattr(saved, name) != getattr(cfg, name)]
        if changed:
            raise UsageError(f"cannot resume with different settings for: {', '.join(changed)} (they are fixed for a run)")
        saved_world = len(state["training"]["rng"])  # one random state per process
        if saved_world != world:
            # Each process takes every world-th sample of an epoch's order: another count would deal the rest of
            # the interrupted epoch differently, skipping some samples and repeating others.
            last = out_dir / LAST_CHECKPOINT
            how = "in one process (without torchrun)" if saved_world == 1 else f"under torchrun --nproc_per_node {saved_world}"
            raise UsageError(
                f"{last} was saved by {saved_world} training process(es) and this run has {world}; resume it {how}, "
                f"or start a new run from its weights with --init {last} (the optimizer state starts afresh)"
            )

    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False

    model_cfg = get_config(cfg.preset, **({"query_sa": cfg.query_sa} if cfg.query_sa else {}))
    model = DeRIS(model_cfg)
    if cfg.init and state is None:
        report = load_checkpoint(model, cfg.init)
        if rank == 0 and not quiet:
            found = f"official checkpoint, {report.summary()}" if report is not None else "deris checkpoint"
            print(f"initialised from {cfg.init}: {found}", flush=True)
    if state is not None:
        load_checkpoint(model, state["state_dict"])
    if not cfg.train_swin:
        freeze_swin(model)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    ddp: nn.Module = model
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )

    encoder = TextEncoder(load_tokenizer(cfg.tokenizer), model_cfg.max_text_len)
    view = SplitView(_load_split(cfg, cfg.split))
    if len(view) == 0:
        raise UsageError(f"split {cfg.split!r} of {cfg.data_root} has no samples")
    val_split = _load_split(cfg, cfg.val_split) if cfg.val_split else None
    nsc = NSCConfig() if cfg.nsc and cfg.dataset == "grefcoco" else None
    train_set = TrainingSet(view, encoder, model_cfg, nsc, cfg.seed)
    per_epoch = batches_per_epoch(len(view), world, cfg.batch_size)
    total_steps = per_epoch * cfg.schedule.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    criterion = Criterion(sampling=PointSampling(num_points=cfg.num_points))

    step, epoch, batch_in_epoch = 0, 0, 0
    evaluations: list[dict[str, Any]] = []
    if state is not None:
        training = state["training"]
        optimizer.load_state_dict(training["optimizer"])
        scaler.load_state_dict(training["scaler"])
        step, epoch, batch_in_epoch = training["step"], training["epoch"], training["batch_in_epoch"]
        evaluations = list(training["evaluations"])
        rng = training["rng"]
        _set_rng_state(rng[rank])
    elif rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (out_dir / LOG_FILE).write_text("")

    def log(record: dict[str, Any]) -> None:
        if rank == 0:
            with open(out_dir / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(rng_now: dict[str, Any]) -> Path:
        states: list[Any] = [rng_now]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, rng_now)
        path = out_dir / LAST_CHECKPOINT
        if rank == 0:
            checkpoint = {
                "deris_format": FORMAT_VERSION,
                "preset": model_cfg.name,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "training": {
                    "config": cfg.to_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "step": step,
                    "epoch": epoch,
                    "batch_in_epoch": batch_in_epoch,
                    "evaluations": evaluations,
                    "rng": states,
                },
            }
            with atomic_file(path) as tmp:
                torch.save(checkpoint, tmp)
        return path

    def run_eval() -> None:
        if val_split is None:
            return
        result = evaluate(model, val_split, encoder, device, workers=cfg.workers, amp_dtype=amp_dtype)
        record = {"step": step, "epoch": epoch, "split": cfg.val_split, **result}
        evaluations.append(record)
        log({"eval": record})
        if rank == 0 and not quiet:
            summary = ", ".join(f"{k} {v:.2f}" for k, v in result.items())
            print(f"step {step} (epoch {epoch + 1}) {cfg.val_split}: {summary}", flush=True)

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=quiet or rank != 0, unit="step", dynamic_ncols=True)
    stop = _StopFlag()
    last_losses: dict[str, float] = {}
    # Where an interruption leaves the run: between steps (save the current state), inside a step
    # before the update (the model is untouched: save the state from the step's start, which replays
    # it), or inside the update (not savable: the last periodic checkpoint stands).
    in_step = updating = stopping = False
    step_rng = _rng_state()
    loader_generator = torch.Generator().manual_seed(cfg.seed)  # keeps iterator creation off the global RNG
    started = time.time()
    try:
        with stop.installed():
            while epoch < cfg.schedule.epochs and step < total_steps:
                lr = set_epoch_lr(optimizer, cfg.schedule, epoch)
                sampler = EpochSampler(len(view), epoch, cfg.seed, rank, world, cfg.batch_size, batch_in_epoch)
                loader = DataLoader(
                    train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                    collate_fn=collate, generator=loader_generator,
                )
                for batch in loader:
                    step_rng, in_step = _rng_state(), True
                    optimizer.zero_grad(set_to_none=True)
                    inputs = [batch[k].to(device) for k in ("img", "img_mini", "token_ids", "pad_mask")]
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        out = ddp(*inputs, return_rounds=True)
                    *aux, _ = out["rounds"]
                    rounds = [(upsample_masks(r["mask_logits_lowres"]), r["refer_logits"]) for r in aux]
                    rounds.append((out["pred_masks"], out["pred_refer_logits"]))
                    losses = criterion(rounds, out["pred_existence"], [m.to(device) for m in batch["masks"]])
                    if not torch.isfinite(losses.total):
                        raise CheckFailed(f"the loss is not finite at step {step + 1}: {losses.total.item()}")
                    scaler.scale(losses.total).backward()
                    scaler.unscale_(optimizer)  # clip the true gradients (a no-op without fp16)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    updating = True
                    scaler.step(optimizer)
                    scaler.update()
                    step, batch_in_epoch = step + 1, batch_in_epoch + 1
                    updating = in_step = False
                    last_losses, stopping = _reduce_step(
                        {"loss": losses.total, **losses.weighted}, stop.requested
                    )
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{last_losses['loss']:.3f}", cls=f"{last_losses['loss_class']:.3f}",
                        mask=f"{last_losses['loss_mask']:.3f}", nt=f"{last_losses['loss_label_nt']:.3f}",
                        lr=f"{lr:.2e}", epoch=epoch + 1,
                    )
                    if step % cfg.log_every == 0:
                        log({"step": step, "epoch": epoch, "lr": lr, "elapsed_s": round(time.time() - started, 1), **last_losses})
                    if on_step is not None:
                        on_step(StepLog(step, epoch, last_losses, lr))
                    if step % cfg.save_every == 0:
                        save(_rng_state())
                    if stopping:
                        raise KeyboardInterrupt
                    if step >= total_steps:
                        break
                if batch_in_epoch >= per_epoch:
                    if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
                        run_eval()
                    epoch, batch_in_epoch = epoch + 1, 0
        if not evaluations or evaluations[-1]["step"] != step:
            run_eval()
        checkpoint = save(_rng_state())
        final = out_dir / FINAL_MODEL
        if rank == 0:
            save_checkpoint(model, final)
    except KeyboardInterrupt:
        # With several processes only a stop agreed at a step boundary can be saved (saving is collective).
        if not updating and (world == 1 or stopping):
            save(step_rng if in_step else _rng_state())
            if rank == 0 and not quiet:
                print(f"interrupted: saved step {step} to {out_dir / LAST_CHECKPOINT}; continue with --resume", flush=True)
        raise
    finally:
        bar.close()
    return TrainResult(step, epoch, last_losses, evaluations, checkpoint, final, rank == 0)
