"""``deris``: predict with a checkpoint, convert official checkpoints, serve and query a Triton server.

Every subcommand follows :mod:`deris.cli_support` (flags, errors, exit codes). Heavy modules are
imported inside the commands: ``deris --help`` and ``deris client`` never import torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from deris.cli_support import (
    EXIT_OK,
    UsageError,
    add_command,
    add_force,
    add_preset,
    add_quiet,
    resolve_model,
    resolve_tokenizer,
    run_main,
)

PROG = "deris"


def register_predict(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "predict", run=run_predict,
        help="segment what one or more expressions refer to in an image",
        description="Run DeRIS on one image and one or more expressions. Writes, per expression i, a binary mask "
        "<image>.t<i>.mask.png (0/255, the original size) and an overlay <image>.t<i>.overlay.png (the image dimmed "
        "outside the mask, the mask's edge outlined), plus one <image>.json with per-query scores, the selected "
        "queries and the no-target decision. Without --preset, --checkpoint and --tokenizer it runs the built-in "
        "demo model (coloured shapes: try `deris demo`).",
        examples="  deris predict --image shapes.png --text 'the red circle' --out out/     # the built-in demo model\n"
        "  deris predict --preset deris-b-grefcoco --checkpoint DeRIS-B-grefcoco.pth --tokenizer beit3.spm \\\n"
        "      --image kitchen.jpg --text 'the cup left of the kettle' --text 'the dog' --out out/",
    )
    add_preset(p, required=False, extra=" (default: the built-in demo model)")
    p.add_argument("--checkpoint", type=Path, help="official DeRIS checkpoint (.pth) or a deris-format file")
    p.add_argument("--random-weights", action="store_true", help="run --preset without a checkpoint (smoke test; masks are meaningless)")
    p.add_argument("--tokenizer", type=Path, help="BEiT-3 sentencepiece model (beit3.spm); needed with --preset")
    p.add_argument("--image", type=Path, required=True, help="input image (JPEG, PNG, ...)")
    p.add_argument("--text", action="append", required=True, help="referring expression; repeat for several")
    p.add_argument("--score-threshold", type=float, help="override the preset's score threshold, in (0, 1)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_force(p)
    add_quiet(p)


def run_predict(args: argparse.Namespace) -> int:
    preset, checkpoint = resolve_model(args.preset, args.checkpoint, args.random_weights, args.tokenizer)
    tokenizer = resolve_tokenizer(preset, args.tokenizer)
    import cv2

    from deris.outputs import print_predictions, quoted, write_prediction_files
    from deris.predictor import Predictor
    from deris.preprocess import load_image

    predictor = Predictor.from_checkpoint(preset, checkpoint, tokenizer, device=args.device, score_threshold=args.score_threshold)
    # Decode once: the original serves both the model inputs and the overlay.
    image_rgb = cv2.cvtColor(load_image(args.image), cv2.COLOR_BGR2RGB)
    for text in args.text:
        # The model reads a fixed number of tokens (as the official code, which truncates silently).
        if dropped := predictor.text_encoder.dropped(text):
            length = predictor.text_encoder.max_length
            print(f"warning: {quoted(text)} is {dropped} tokens too long for {preset} (max_text_len {length}, bos and eos "
                  f"included): the model reads only its first {length - 2} tokens", file=sys.stderr)
    prepared = predictor.prepare(image_rgb)
    predictions = predictor.predict_prepared([prepared] * len(args.text), args.text)
    files = write_prediction_files(args.out, args.image.name, image_rgb, args.text, predictions, force=args.force)
    print_predictions(args.text, predictions, files, args.out)
    return EXIT_OK


def register_convert(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "convert", run=run_convert,
        help="convert an official DeRIS checkpoint to this project's format",
        description="Load an official checkpoint strictly into a preset (every missing, unexpected or mis-shaped key "
        "is reported; nothing is unpickled beyond what official checkpoints contain) and save it as .safetensors "
        "(or a torch .pt file).",
        examples="  deris convert --preset deris-l-refcoco --checkpoint DeRIS-L-refcoco.pth --out deris-l-refcoco.safetensors",
    )
    add_preset(p)
    p.add_argument("--checkpoint", type=Path, required=True, help="official checkpoint (.pth)")
    p.add_argument("--out", type=Path, required=True, help="output file: .safetensors, or .pt/.pth for torch format")
    add_force(p)
    add_quiet(p)


def run_convert(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        raise UsageError(f"{args.out} already exists; pass --force to replace it")
    import deris

    model = deris.build_model(args.preset)
    report = deris.load_checkpoint(model, args.checkpoint)
    path = deris.save_checkpoint(model, args.out)
    params = sum(p.numel() for p in model.parameters())
    if report is not None:
        print(f"official checkpoint: {report.summary()}")
        if not args.quiet:
            for key, reason in sorted(report.dropped.items()):
                print(f"  dropped {key}: {reason}")
    else:
        print("checkpoint was already in deris format")
    print(f"{args.preset}: {params / 1e6:.1f} M parameters -> {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from deris.demo import register as register_demo
    from deris.eval import register as register_eval
    from deris.training.cli import add_make_synthetic, add_train
    from deris.triton_repo.client import register as register_client
    from deris.triton_repo.server import register as register_serve

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="DeRIS referring image segmentation: segment, evaluate, train, serve, and convert official "
        "checkpoints. Without a checkpoint, predict, eval and demo run the built-in demo model, offline: start "
        "with `deris demo --out demo_out`. See `deris COMMAND --help`; exports are `deris-export`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In the order a newcomer meets them: see it work, segment, score, train, serve, convert.
    register_demo(sub)
    register_predict(sub)
    register_eval(sub)
    add_make_synthetic(sub)
    add_train(sub)
    register_serve(sub)
    register_client(sub)
    register_convert(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
