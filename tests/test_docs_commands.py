"""Every `deris` and `deris-export` command shown in the README and docs/ parses with today's CLI, so a
renamed or removed flag cannot leave the documentation behind (parsing only: nothing is run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from deris.cli import build_parser as deris_parser
from deris.export.cli import build_parser as export_parser

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Where a command's own arguments start: the installed scripts, or `python -m` / `torchrun -m` of the module.
PROGRAMS = {".venv/bin/deris": deris_parser, "deris.cli": deris_parser, ".venv/bin/deris-export": export_parser}


def _commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for doc in DOCUMENTS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                start = next((i for i, w in enumerate(words) if w in PROGRAMS), None)
                if start is not None:
                    found.append((f"{doc.name}: {line.strip()[:70]}", words[start], words[start + 1:]))
    return found


COMMANDS = _commands()


def test_the_documents_show_commands_of_both_programs():
    programs = {program for _, program, _ in COMMANDS}
    assert {".venv/bin/deris", ".venv/bin/deris-export"} <= programs and len(COMMANDS) >= 20


@pytest.mark.parametrize(("where", "program", "argv"), COMMANDS, ids=[where for where, _, _ in COMMANDS])
def test_a_documented_command_parses(where: str, program: str, argv: list[str], capsys: pytest.CaptureFixture[str]):
    try:
        PROGRAMS[program]().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: {capsys.readouterr().err.strip()}")
