"""``deris``: predict with a checkpoint, convert official checkpoints, serve and query a Triton server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from deris.config import PRESETS

Command = Callable[[argparse.Namespace], int]


def add_predict(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "predict",
        help="segment what one or more expressions refer to in an image",
        description="Run DeRIS on one image and one or more expressions. Writes, per expression, a binary "
        "mask PNG and an overlay PNG, plus one JSON with per-query scores and the decision.",
    )
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model preset")
    p.add_argument("--checkpoint", type=Path, help="official DeRIS checkpoint (.pth) or a deris-format file")
    p.add_argument("--random-weights", action="store_true", help="run without a checkpoint (smoke test; masks are meaningless)")
    p.add_argument("--tokenizer", type=Path, required=True, help="BEiT-3 sentencepiece model (beit3.spm)")
    p.add_argument("--image", type=Path, required=True, help="input image (JPEG, PNG, ...)")
    p.add_argument("--text", action="append", required=True, help="referring expression; repeat for several")
    p.add_argument("--score-threshold", type=float, help="override the preset's score threshold, in (0, 1)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.set_defaults(run=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    import cv2

    from deris.outputs import write_prediction_files
    from deris.predictor import Predictor
    from deris.preprocess import load_image

    if args.checkpoint is None and not args.random_weights:
        print("error: --checkpoint is required (or pass --random-weights for a smoke test)", file=sys.stderr)
        return 2
    if args.checkpoint is not None and args.random_weights:
        print("error: pass either --checkpoint or --random-weights, not both", file=sys.stderr)
        return 2
    if args.random_weights:
        print("warning: running with random weights: the masks are meaningless", file=sys.stderr)
    predictor = Predictor.from_checkpoint(
        args.preset, args.checkpoint, args.tokenizer, device=args.device, score_threshold=args.score_threshold
    )
    # Decode once: the original serves both the model inputs and the overlay.
    image_rgb = cv2.cvtColor(load_image(args.image), cv2.COLOR_BGR2RGB)
    prepared = predictor.prepare(image_rgb)
    predictions = predictor.predict_prepared([prepared] * len(args.text), args.text)
    files = write_prediction_files(args.out, args.image.name, image_rgb, args.text, predictions)
    for text, pred in zip(args.text, predictions):
        decision = "no target" if pred.no_target else f"queries {pred.selected}, {int(pred.mask.sum())} pixels"
        print(f"{text!r}: {decision} (max score {pred.scores.max():.3f}, threshold {pred.score_threshold})")
    print(f"wrote {len(files)} files to {args.out}")
    return 0


def add_convert(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "convert",
        help="convert an official DeRIS checkpoint to this project's format",
        description="Load an official checkpoint strictly into a preset (every missing, unexpected or "
        "mis-shaped key is reported) and save it as .safetensors (or a torch .pt file).",
    )
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--checkpoint", type=Path, required=True, help="official checkpoint (.pth)")
    p.add_argument("--out", type=Path, required=True, help="output file: .safetensors, or .pt/.pth for torch format")
    p.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    import deris

    model = deris.build_model(args.preset)
    report = deris.load_checkpoint(model, args.checkpoint)
    path = deris.save_checkpoint(model, args.out)
    params = sum(p.numel() for p in model.parameters())
    if report is not None:
        print(f"official checkpoint: {report.summary()}")
        for key, reason in sorted(report.dropped.items()):
            print(f"  dropped {key}: {reason}")
    else:
        print("checkpoint was already in deris format")
    print(f"{args.preset}: {params / 1e6:.1f} M parameters -> {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deris",
        description="DeRIS referring image segmentation: predict, convert checkpoints, serve, query a server.",
    )
    from deris.client import add_client
    from deris.serve import add_serve

    sub = parser.add_subparsers(dest="command", required=True)
    add_predict(sub)
    add_convert(sub)
    add_serve(sub)
    add_client(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from deris.checkpoint import CheckpointError
    from deris.preprocess import ImageError
    from deris.text import TextError, TokenizerError

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (CheckpointError, ImageError, TextError, TokenizerError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
