"""The demo model: preset ``deris-demo`` trained from scratch on the synthetic scenes, shipped in ``deris/assets``.

* :func:`train_tokenizer` trains the grammar tokenizer (``demo.spm``): a unigram sentencepiece model of
  every expression :mod:`deris.scenes` can write, with beit3.spm's piece layout (``<unk>``=0, ``<s>``=1,
  ``</s>``=2, no pad), so that :func:`deris.text.load_tokenizer` gives it the fairseq ids.
* :func:`train_demo` is the whole recipe (``deris demo --train DIR``): the tokenizer, the synthetic data
  (fixed seed) and ``deris train`` with the settings of :data:`TRAINING` (from scratch: every part trained,
  Swin included, with one learning rate).
* :data:`DEMO_WEIGHTS` and :data:`DEMO_TOKENIZER` name the shipped files with their sha256, checked by
  :func:`demo_paths` before anything is loaded; :func:`load_demo_predictor` builds a Predictor from them.
* ``deris demo --out DIR`` renders a few scenes, segments several expressions each (one without a target)
  and writes the overlays and a contact sheet.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deris.cli_support import EXIT_OK, UsageError, add_command, add_force, add_quiet

if TYPE_CHECKING:
    from deris.predictor import Predictor
    from deris.scenes import Scene
    from deris.training.trainer import TrainConfig, TrainResult

PRESET = "deris-demo"
ASSETS = Path(__file__).parent / "assets"


@dataclass(frozen=True)
class Asset:
    """A file shipped in ``deris/assets`` and its sha256."""

    name: str
    sha256: str

    @property
    def path(self) -> Path:
        return ASSETS / self.name


DEMO_WEIGHTS = Asset("deris-demo.safetensors", "5f41020fec01da498859cfb99eb3c4cd076a48c072cd88ee38d79ee4cc048624")
DEMO_TOKENIZER = Asset("demo.spm", "6b13329d6f6e864474ef5e2bfe8677c9c5feabfcfe6ff318fa557500ba0e03f0")


class DemoAssetError(ValueError):
    """A shipped demo file is missing or does not have its registered sha256."""


# --- the recipe ---------------------------------------------------------------------------------------

DATA_IMAGES = 2500
DATA_SEED = 0


@dataclass(frozen=True)
class DemoTraining:
    """The ``deris train`` settings of the demo model (from scratch, on CPU)."""

    epochs: int = 7
    decay_epochs: tuple[int, ...] = (7,)  # lr x 0.1 in the last epoch, as the official gRefCOCO schedule
    lr: float = 3e-4  # every group, Swin included (nothing is pretrained)
    batch_size: int = 8
    num_points: int = 48 * 48  # the mask logits' resolution at 192 px
    seed: int = 0
    workers: int = 1
    log_every: int = 20
    eval_every: int = 2  # epochs; and after the last one


TRAINING = DemoTraining()


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def train_tokenizer(out: str | Path) -> Path:
    """Train the grammar tokenizer into ``out`` (a ``.spm`` path): deterministic (single-threaded)."""
    from deris.scenes import grammar_expressions
    from deris.text import train_sentencepiece

    # The grammar's words and letters make 52 pieces; the trainer stops there.
    return train_sentencepiece(grammar_expressions(), out, vocab_size=64)


def training_config(data_root: Path, tokenizer: Path, settings: DemoTraining = TRAINING) -> TrainConfig:
    from deris.training.trainer import Schedule, TrainConfig

    return TrainConfig(
        preset=PRESET,
        data_root=str(data_root),
        tokenizer=str(tokenizer),
        dataset="grefcoco",
        split="train",
        val_split="val",
        schedule=Schedule(epochs=settings.epochs, decay_epochs=settings.decay_epochs),
        lr=settings.lr,
        lr_beit3=settings.lr,
        lr_pixel_decoder=settings.lr,
        lr_swin=settings.lr,
        train_swin=True,
        batch_size=settings.batch_size,
        num_points=settings.num_points,
        seed=settings.seed,
        workers=settings.workers,
        log_every=settings.log_every,
        eval_every=settings.eval_every,
    )


def export_weights(model_file: str | Path, out: str | Path) -> Path:
    """The trained weights as float16 safetensors in deris format (loading casts them back to float32)."""
    import deris

    model = deris.from_checkpoint(PRESET, model_file)
    return deris.save_checkpoint(model.half(), out)


def write_curve(log_file: str | Path, out: str | Path) -> Path:
    """The validation metrics of a ``train_log.jsonl`` against the step, as a PNG (needs matplotlib)."""
    import json

    from deris.atomic import atomic_write
    from deris.outputs import figure_png, new_figure

    figure = new_figure("the metric curve", 6, 4)
    records = [json.loads(line) for line in Path(log_file).read_text().splitlines() if line.strip()]
    evals = [r["eval"] for r in records if "eval" in r]
    if not evals:
        raise UsageError(f"{log_file} holds no evaluation")
    steps = [e["step"] for e in evals]
    ax = figure.subplots()
    for key in ("gIoU", "cIoU", "N-acc", "T-acc", "Pr@0.7"):
        if key in evals[0]:
            ax.plot(steps, [e[key] for e in evals], marker="o", label=key)
    ax.set_xlabel(f"optimizer step (batch {TRAINING.batch_size})")
    ax.set_ylabel("%")
    ax.set_title(f"{PRESET}: validation metrics during training")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    return atomic_write(out, figure_png(figure))


def train_demo(work_dir: str | Path, *, threads: int = 2, force: bool = False, quiet: bool = False) -> TrainResult:
    """The demo recipe in ``work_dir``: ``demo.spm``, ``shapes/`` (the synthetic data, seed 0), ``run/``
    (the ``deris train`` output), ``deris-demo.safetensors`` (the weights to ship, float16) and
    ``curve.png`` (the validation metrics; needs matplotlib). An existing ``shapes/`` is reused (the same seed
    writes the same files); an earlier ``run/`` is replaced only with ``force``."""
    import shutil

    import torch

    from deris.atomic import staged_directory
    from deris.scenes import write_dataset
    from deris.training.trainer import FINAL_MODEL, LOG_FILE, train

    work = Path(work_dir)
    run = work / "run"
    if run.is_dir() and any(run.iterdir()) and not force:
        raise UsageError(f"{run} holds an earlier run; pass --force to train again from scratch")
    shutil.rmtree(run, ignore_errors=True)  # nothing of an earlier run is left to be mistaken for this one's
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    tokenizer = train_tokenizer(work / DEMO_TOKENIZER.name)
    data = work / "shapes"
    if not data.exists():
        with staged_directory(data, False) as staging:
            write_dataset(staging, DATA_IMAGES, DATA_SEED)
    result = train(training_config(data, tokenizer), run, quiet=quiet)
    export_weights(run / FINAL_MODEL, work / DEMO_WEIGHTS.name)
    write_curve(run / LOG_FILE, work / "curve.png")
    return result


# --- the shipped files ----------------------------------------------------------------------------------


def verify_asset(asset: Asset, path: str | Path | None = None) -> Path:
    """``path`` (default: the shipped file) if its sha256 is the registered one; DemoAssetError otherwise."""
    path = asset.path if path is None else Path(path)
    if not path.is_file():
        raise DemoAssetError(f"demo file {asset.name} not found at {path}; reinstall deris (it ships in deris/assets)")
    actual = sha256_of(path)
    if actual != asset.sha256:
        raise DemoAssetError(
            f"{path} has sha256 {actual}, not the registered {asset.sha256} of {asset.name}: the file is corrupted "
            "or was replaced; reinstall deris (or rebuild it with `deris demo --train DIR` and update deris.demo)"
        )
    return path


def demo_paths() -> tuple[Path, Path]:
    """(weights, tokenizer) of the shipped demo model, each checked against its sha256."""
    return verify_asset(DEMO_WEIGHTS), verify_asset(DEMO_TOKENIZER)


def load_demo_predictor(device: str = "cpu", **thresholds: float) -> Predictor:
    """A :class:`deris.predictor.Predictor` for the shipped demo model (sha256-checked, float32)."""
    from deris.predictor import Predictor

    weights, tokenizer = demo_paths()
    return Predictor.from_checkpoint(PRESET, weights, tokenizer, device=device, **thresholds)


# --- deris demo -----------------------------------------------------------------------------------------

DEMO_SCENES = 4
DEMO_SEED = 2024
TILE_WIDTH = 320
CAPTION_SIZE = 12


def _absent_combination(scene: Scene) -> str:
    """An expression for a colour-shape combination the scene does not hold."""
    from deris.scenes import COLOURS, SHAPES

    present = {(s.colour, s.shape) for s in scene.shapes}
    colour, shape = next((c, s) for c in COLOURS for s in SHAPES if (c, s) not in present)
    return f"the {colour} {shape}"


def demo_expressions(scene: Scene, count: int = 4) -> list[str]:
    """Up to ``count`` of the scene's own expressions with a target, then one without."""
    with_target = [e.text for e in scene.expressions if e.targets][:count]
    no_target = next((e.text for e in scene.expressions if not e.targets), None)
    return [*with_target, no_target or _absent_combination(scene)]


def contact_sheet(rows: list[list[tuple[np.ndarray, str]]]) -> np.ndarray:
    """The highlighted masks as a grid, one row per scene: each (image, caption) scaled to one width
    and captioned after scaling, so every caption has the same size; rows top-aligned on white."""
    from PIL import Image

    from deris.outputs import with_caption

    def tile(image: np.ndarray, caption: str) -> Image.Image:
        scaled = Image.fromarray(image).resize((TILE_WIDTH, round(image.shape[0] * TILE_WIDTH / image.shape[1])))
        return Image.fromarray(with_caption(np.asarray(scaled), caption, CAPTION_SIZE))

    tiles = [[tile(image, caption) for image, caption in row] for row in rows]
    columns = max(len(row) for row in tiles)
    heights = [max(t.height for t in row) for row in tiles]
    sheet = Image.new("RGB", (columns * TILE_WIDTH, sum(heights)), (255, 255, 255))
    top = 0
    for row, height in zip(tiles, heights):
        for column, image in enumerate(row):
            sheet.paste(image, (column * TILE_WIDTH, top))
        top += height
    return np.asarray(sheet)


def run_demo(out: Path, *, device: str = "cpu", force: bool = False, scenes: int = DEMO_SCENES) -> Path:
    """Render ``scenes`` scenes, segment their expressions with the shipped model, write the overlays
    (:func:`deris.outputs.write_prediction_files`) and ``contact_sheet.png``; returns the sheet's path."""
    from deris.atomic import OutputError, atomic_write
    from deris.outputs import highlight, png_bytes, write_prediction_files
    from deris.scenes import make_scene

    sheet_path = out / "contact_sheet.png"
    if sheet_path.exists() and not force:
        raise OutputError(f"{sheet_path} exists; pass --force to replace it")
    predictor = load_demo_predictor(device)
    rng = np.random.default_rng(DEMO_SEED)
    rows = []
    for index in range(scenes):
        scene = make_scene(rng)
        texts = demo_expressions(scene)
        prepared = predictor.prepare(scene.image)
        predictions = predictor.predict_prepared([prepared] * len(texts), texts)
        name = f"scene{index}.png"
        atomic_write(out / name, png_bytes(scene.image))
        write_prediction_files(out, name, scene.image, texts, predictions, force=True)
        rows.append([(highlight(scene.image, p.mask), f'"{t}": ' + ("no target" if p.no_target else f"{int(p.mask.sum())} px"))
                     for t, p in zip(texts, predictions)])
    atomic_write(sheet_path, png_bytes(contact_sheet(rows)))
    return sheet_path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "demo",
        help="run the shipped demo model on synthetic scenes, or retrain it",
        description=f"--out: render {DEMO_SCENES} synthetic scenes (coloured shapes), segment several expressions each "
        "(one without a target) with the demo model shipped in deris/assets (preset deris-demo; sha256-checked), and "
        "write per scene the image, the masks, overlays and scores (as deris predict) plus OUT/contact_sheet.png. "
        "--train: the demo model's whole recipe from scratch on CPU (grammar tokenizer, synthetic data with seed 0, "
        "deris train with fixed settings and seed) into DIR; DIR/deris-demo.safetensors and DIR/demo.spm are the files "
        "to ship.",
        run=run_demo_command,
        examples="  deris demo --out demo_out\n  deris demo --train /tmp/demo",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", type=Path, metavar="DIR", help="write the demo's overlays and contact sheet here")
    what.add_argument("--train", type=Path, metavar="DIR", help="retrain the demo model into DIR (about 45 minutes on 2 idle cores)")
    p.add_argument("--threads", type=int, default=2, help="--train: torch threads (default 2; on a machine busy with "
                   "other work, 1 is faster: torch's threads wait on each other)")
    p.add_argument("--device", default="cpu", help="--out: torch device (default cpu)")
    add_force(p)
    add_quiet(p)
    return p


def run_demo_command(args: argparse.Namespace) -> int:
    if args.train is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        import time

        started = time.time()
        result = train_demo(args.train, threads=args.threads, force=args.force, quiet=args.quiet)
        print(f"trained {result.steps} steps in {(time.time() - started) / 60:.1f} min; wrote {args.train / DEMO_WEIGHTS.name}, "
              f"{args.train / DEMO_TOKENIZER.name} and {args.train / 'curve.png'}")
        return EXIT_OK
    sheet = run_demo(args.out, device=args.device, force=args.force)
    print(f"wrote {sheet} and the overlays in {args.out}")
    return EXIT_OK

