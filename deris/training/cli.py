"""``deris train`` and ``deris make-synthetic``: parsers (torch-free, so ``--help`` is instant) and runners.

Register with ``add_train(subparsers)`` and ``add_make_synthetic(subparsers)``; the exit codes and
error lines follow :mod:`deris.cli_support` (``run_main``).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from deris.cli_support import UsageError, add_command, add_force, add_preset, add_quiet

if TYPE_CHECKING:
    from deris.training.trainer import TrainConfig

_TRAIN_EXAMPLES = """\
  deris make-synthetic --out shapes --images 2000 --seed 0
  deris train --preset deris-tiny --data-root shapes --dataset grefcoco --split train \\
      --tokenizer beit3.spm --out runs/tiny --epochs 20 --batch-size 8
  deris train --out runs/tiny --resume                     # continue an interrupted run
  torchrun --nproc_per_node 4 -m deris.cli train --preset deris-b-grefcoco --data-root data \\
      --dataset grefcoco --split train --tokenizer beit3.spm --init DeRIS-B-grefcoco.pth --out runs/b"""


def _decay_epochs(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epoch numbers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"decay epochs are 1-based, got {text!r}")
    return values


def add_train(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "train",
        help="train DeRIS the official way (matching, losses, NSC, optimizer, schedule)",
        description="Train a preset on a referring-segmentation split in the official gRefCOCO/RefCOCO layout "
        "(or the refer toolkit's): Hungarian matching and the official losses on all four decoder rounds, NSC on "
        "gRefCOCO, Adam+AMSGrad with the official parameter groups, gradient clipping at 0.15 and the official "
        "multi-step schedule, Swin frozen (unless --train-swin). Writes OUT/last.pt (resumable; loads with deris.load_checkpoint), "
        "OUT/model.safetensors, OUT/config.json and OUT/train_log.jsonl. Several GPUs: launch with torchrun.",
        run=run_train,
        examples=_TRAIN_EXAMPLES,
    )
    add_preset(p, required=False, extra=" (required unless --resume)")
    p.add_argument("--data-root", type=Path, metavar="DIR", help="dataset root (the official data/seqtr_type layout, or refer's)")
    p.add_argument("--dataset", default="grefcoco", help="grefcoco (default), refcoco, refcocoplus or refcocog")
    p.add_argument("--split", default="train", help="training split (default: train)")
    p.add_argument("--val-split", default="val", help="split evaluated during training (default: val); 'none' to skip")
    p.add_argument("--format", dest="data_format", default="official", choices=("official", "refer"), help="dataset layout")
    p.add_argument("--tokenizer", type=Path, metavar="SPM", help="BEiT-3 sentencepiece model (beit3.spm); needed unless --resume")
    p.add_argument("--init", type=Path, metavar="CHECKPOINT", help="start from these weights (official DeRIS or deris format)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory (checkpoints and logs)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT/last.pt with its own settings")
    add_force(p)
    p.add_argument("--epochs", type=int, help="epochs (default: the official schedule, 6 for grefcoco, 20 otherwise)")
    p.add_argument("--warmup-epochs", type=int, help="warmup epochs (default: official, 0 or 1)")
    p.add_argument("--decay-epochs", type=_decay_epochs, metavar="E1,E2", help="1-based epochs where lr x 0.1 begins (official: 6; 15,19)")
    p.add_argument("--lr", type=float, default=1e-4, help="base learning rate (default 1e-4; BEiT-3 gets lr/2, Swin lr/10)")
    p.add_argument("--lr-beit3", type=float, metavar="LR", help="BEiT-3's learning rate (default: --lr / 2, official)")
    p.add_argument("--lr-swin", type=float, metavar="LR", help="Swin's learning rate when trained (default: --lr / 10, official)")
    p.add_argument("--train-swin", action="store_true",
                   help="train Swin too (for training from scratch; official: frozen, as it starts pretrained)")
    p.add_argument("--batch-size", type=int, help="samples per process (default: 1 for grefcoco, 16 otherwise, as official)")
    p.add_argument("--grad-clip", type=float, default=0.15, metavar="NORM",
                   help="clip the global gradient norm to NORM (default 0.15, official, made for fine-tuning pretrained "
                   "weights; trained from scratch the norm is 10-40: docs/training.md)")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="autocast (default off: fp32, official)")
    p.add_argument("--no-nsc", dest="nsc", action="store_false", help="disable non-referent sample conversion (gRefCOCO)")
    p.add_argument("--num-points", type=int, default=12544, help="points per mask for matching and mask losses (default 12544)")
    p.add_argument("--query-sa", choices=("per_sample", "official_batch"), help="query_SA mode (default: the preset's)")
    p.add_argument("--seed", type=int, default=6666, help="random seed (default 6666, official)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")
    p.add_argument("--save-every", type=int, help="write OUT/last.pt every N steps (default 1000)")
    p.add_argument("--eval-every", type=int, help="evaluate every N epochs, 0 = only at the end (default 1)")
    p.add_argument("--log-every", type=int, help="append losses to OUT/train_log.jsonl every N steps (default 50)")
    p.add_argument("--workers", type=int, help="data-loading processes per training process (default 2)")
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    add_quiet(p)
    return p


def _train_config(args: argparse.Namespace) -> TrainConfig:
    from deris.training.trainer import TrainConfig, default_schedule

    needed = (("--preset", args.preset), ("--data-root", args.data_root), ("--tokenizer", args.tokenizer))
    missing = [flag for flag, value in needed if value is None]
    if missing:
        raise UsageError(f"{', '.join(missing)} required (unless --resume)")
    base = default_schedule(args.dataset)
    epochs = args.epochs if args.epochs is not None else base.epochs
    decay = args.decay_epochs if args.decay_epochs is not None else base.decay_epochs
    warmup = args.warmup_epochs if args.warmup_epochs is not None else base.warmup_epochs
    return TrainConfig(
        preset=args.preset,
        data_root=str(args.data_root),
        tokenizer=str(args.tokenizer),
        dataset=args.dataset,
        split=args.split,
        val_split=None if args.val_split.lower() == "none" else args.val_split,
        data_format=args.data_format,
        init=str(args.init) if args.init else None,
        schedule=replace(base, epochs=epochs, decay_epochs=decay, warmup_epochs=warmup),
        lr=args.lr,
        lr_beit3=args.lr / 2 if args.lr_beit3 is None else args.lr_beit3,
        lr_pixel_decoder=args.lr,
        lr_swin=args.lr / 10 if args.lr_swin is None else args.lr_swin,
        train_swin=args.train_swin,
        batch_size=args.batch_size or (1 if args.dataset == "grefcoco" else 16),
        grad_clip=args.grad_clip,
        amp=args.amp,
        nsc=args.nsc,
        num_points=args.num_points,
        query_sa=args.query_sa,
        seed=args.seed,
    )


def run_train(args: argparse.Namespace) -> int:
    from deris.training.trainer import FINAL_MODEL, LAST_CHECKPOINT, TrainConfig, read_training_state, train

    last = args.out / LAST_CHECKPOINT
    if args.resume:
        if not last.is_file():
            raise UsageError(f"nothing to resume: {last} does not exist")
        cfg = TrainConfig.from_dict(read_training_state(last)["training"]["config"])
    else:
        if args.out.exists() and any(args.out.iterdir()) and not args.force:
            raise UsageError(f"output directory {args.out} is not empty; pass --resume to continue it, --force to start over")
        cfg = _train_config(args)
        # A fresh run must not leave the old run's results to be resumed or mistaken for its own.
        for name in (LAST_CHECKPOINT, FINAL_MODEL):
            (args.out / name).unlink(missing_ok=True)
    for name in TrainConfig.RESUMABLE_CHANGES:
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, value)
    result = train(cfg, args.out, resume=args.resume, quiet=args.quiet)
    if not result.main_process:
        return 0
    print(f"trained {result.steps} steps ({result.epochs_done} complete epochs); last losses: "
          + ", ".join(f"{k} {v:.4f}" for k, v in result.last_losses.items()))
    if result.evaluations:
        final = result.evaluations[-1]
        print("final evaluation on " + str(final["split"]) + ": "
              + ", ".join(f"{k} {v:.2f}" for k, v in final.items() if isinstance(v, float)))
    print(f"wrote {result.checkpoint} and {result.model}")
    return 0


def add_make_synthetic(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "make-synthetic",
        help="write a synthetic referring dataset (coloured shapes) in the official gRefCOCO layout",
        description="Render N scenes of coloured shapes (circle, square, triangle; red, green, blue, yellow; big, "
        "small) on textured backgrounds with occlusion, with single-, multi- and no-target expressions (about 15% "
        "no target), and write them as OUT/data/seqtr_type (annotations/grefs/instance.json with splits train, val, "
        "testA, testB; train_dict.json; images/mscoco/train2014/COCO_train2014_%012d.jpg). The same seed writes the "
        "same files.",
        run=run_make_synthetic,
        examples="  deris make-synthetic --out shapes --images 2000 --seed 0\n"
        "  deris eval ... --data-root shapes --dataset grefcoco --split val",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument("--images", type=int, required=True, metavar="N", help="number of images (at least 4: one per split)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_force(p)
    add_quiet(p)
    return p


def run_make_synthetic(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from deris.atomic import staged_directory
    from deris.scenes import split_sizes, write_dataset

    split_sizes(args.images)  # refuse a bad count before touching the output
    with staged_directory(args.out, args.force) as staging:
        with tqdm(total=args.images, disable=args.quiet, unit="image") as bar:
            summary = write_dataset(staging, args.images, args.seed, progress=bar.update)
    images, expressions = summary["images"], summary["expressions"]
    counts = ", ".join(f"{name} {images[name]} images / {expressions[name]} expressions" for name in images)
    kinds = summary["kinds"]
    total = sum(kinds.values())
    print(f"wrote {args.out}: {counts}; no target {100 * kinds.get('no-target', 0) / total:.1f}% of {total} expressions")
    return 0
