"""One convention for every command of ``deris`` and ``deris-export``.

* Exit codes (listed in every ``--help``): 0 ok; 1 a verification or parity check failed; 2 bad
  input or usage; 130 interrupted.
* Errors are one line on stderr: ``<prog> <command>: error: <message>`` (argparse's own usage
  errors have the same form and code 2).
* The same flag for the same thing: ``--preset`` (a preset name, or an official config name such
  as ``DERIS-B-grefcoco``, in any case), ``--checkpoint``, ``--tokenizer``, ``--onnx`` (an ONNX
  export directory), ``--engines``, ``--out``, ``--force`` (replace an existing output),
  ``--quiet`` (no progress display).
* CPU memory: run as programs, the commands keep freed memory in the process for reuse
  (``deris.cpu_memory``), unless the environment holds glibc malloc settings of the user's own;
  ``main([...])`` called from Python code leaves the caller's allocator alone.

Torch-free: ``--help`` and argument errors never wait for torch to import.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from deris.cpu_memory import keep_freed_memory

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

EXIT_CODES = """exit codes:
  0    success
  1    a verification or parity check failed (the table above the message says which)
  2    bad input or usage (the message says what was wrong and what is accepted)
  130  interrupted (Ctrl-C); no partial output is left behind"""

Run = Callable[[argparse.Namespace], int]


class UsageError(ValueError):
    """Bad input or usage: exit code 2."""


class CheckFailed(RuntimeError):
    """A verification or parity check failed: exit code 1."""


class ToolError(RuntimeError):
    """A tool or service the command needs is missing or failed (TensorRT, a tritonserver, a server
    to talk to): exit code 2, with a message that says what to install or start."""


def add_command(subparsers: argparse._SubParsersAction, name: str, *, help: str, description: str,
                run: Run, examples: str = "") -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` ends with examples and the exit codes."""
    epilog = (f"examples:\n{examples.rstrip()}\n\n" if examples else "") + EXIT_CODES
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(run=run)
    return parser


def preset_name(text: str) -> str:
    """argparse type: a preset or official config name, in any letter case -> the preset name."""
    from deris.config import OFFICIAL_NAMES, PRESETS

    by_lower = {name.lower(): name for name in PRESETS} | {k.lower(): v for k, v in OFFICIAL_NAMES.items()}
    name = by_lower.get(text.strip().lower())
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown preset {text!r}; accepted: {', '.join(PRESETS)} (or {', '.join(OFFICIAL_NAMES)})")
    return name


def add_preset(parser: argparse.ArgumentParser, *, required: bool = True, extra: str = "") -> None:
    from deris.config import PRESETS

    parser.add_argument("--preset", type=preset_name, required=required, metavar="NAME",
                        help=f"model preset: {', '.join(PRESETS)}; official names (DERIS-B-grefcoco ...) work too{extra}")


def add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="replace existing output")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress display; only results and errors are printed")


def add_onnx(parser: argparse.ArgumentParser, *, required: bool, help: str = "ONNX export directory (from `deris-export onnx`)") -> None:
    parser.add_argument("--onnx", type=Path, required=required, metavar="DIR", help=help)


DEMO_NOTE = (
    "using the built-in demo model (deris-demo: a small DeRIS trained on synthetic coloured shapes; "
    "pass --preset and --checkpoint for an official model)"
)


def demo_model() -> tuple[str, Path]:
    """(preset, checkpoint) of the built-in demo model (sha256-checked), announced on stderr."""
    from deris.demo import DEMO_WEIGHTS, PRESET, verify_asset

    print(DEMO_NOTE, file=sys.stderr)
    return PRESET, verify_asset(DEMO_WEIGHTS)


def resolve_model(preset: str | None, checkpoint: Path | None, random_weights: bool,
                  tokenizer: Path | None = None) -> tuple[str, Path | None]:
    """(preset, checkpoint) a command runs: the arguments given or, when none of them (nor a
    tokenizer) is, the built-in demo model (:func:`demo_model`). A None checkpoint means random weights."""
    if preset is None and checkpoint is None and tokenizer is None and not random_weights:
        return demo_model()
    if preset is None:
        raise UsageError("--checkpoint, --tokenizer and --random-weights go with --preset NAME "
                         "(or pass none of them to use the built-in demo model)")
    if (checkpoint is None) == (not random_weights):
        raise UsageError("pass exactly one of --checkpoint FILE or --random-weights (a smoke test; masks are meaningless)")
    if random_weights:
        print("warning: RANDOM weights (--random-weights): the outputs are meaningless", file=sys.stderr)
    return preset, checkpoint


def resolve_tokenizer(preset: str, tokenizer: Path | None, export: str | os.PathLike[str] | None = None) -> Path:
    """The tokenizer given, or the demo model's own for the demo preset (sha256-checked). ``export``: the
    export directory the preset was read from, named in the error instead of ``--preset``."""
    from deris.demo import DEMO_TOKENIZER, PRESET, verify_asset

    if tokenizer is not None:
        return tokenizer
    if preset == PRESET:
        return verify_asset(DEMO_TOKENIZER)
    source = f"{export} (an export of {preset})" if export is not None else f"--preset {preset}"
    raise UsageError(f"--tokenizer FILE (the BEiT-3 sentencepiece model, beit3.spm) is required with {source}")


def run_main(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, run the chosen command and map its outcome to the exit codes above."""
    args = parser.parse_args(argv)
    where = f"{prog} {args.command}"
    if argv is None:
        # Run as the program (the console script): a CPU forward would otherwise fault its
        # activations in again on every call. Python code calling main([...]) keeps its own malloc.
        keep_freed_memory()
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CheckFailed as exc:
        print(f"{where}: check failed: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except (ValueError, FileNotFoundError, ToolError) as exc:
        # Every input error of the project is a ValueError subclass (ImageError, TextError,
        # CheckpointError, ExportError, OutputError, ...), each with a message that says what to do.
        print(f"{where}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
