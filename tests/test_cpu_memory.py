"""deris.cpu_memory: with its setting, a repeated large tensor stops costing fresh pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deris.cpu_memory import on_glibc

pytestmark = pytest.mark.skipif(not on_glibc(), reason="the setting is glibc's")

# A forward's pattern in miniature: the same large activations allocated, written and freed call
# after call. Prints the minor page faults of each call.
# Modes: "keep" calls keep_freed_memory(); "program" and "called" run the calls as a command of
# the CLI convention, as the console script does (no argv) and as Python code does (an argv list).
CALLS = """
import argparse, json, resource, sys
import torch
from deris.cli_support import run_main
from deris.cpu_memory import keep_freed_memory
faults = []
def calls(args):
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        big, small = torch.empty(16 * 2**20), torch.empty(3 * 2**20)  # 64 MiB and 12 MiB
        big.fill_(1.0), small.fill_(1.0)
        del big, small
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return 0
mode = sys.argv.pop(1)
applied = keep_freed_memory() if mode == "keep" else None
if mode in ("program", "called"):
    parser = argparse.ArgumentParser(prog="deris")
    parser.add_subparsers(dest="command").add_parser("calls").set_defaults(run=calls)
    sys.argv[1:] = ["calls"]
    run_main("deris", parser, None if mode == "program" else ["calls"])
else:
    calls(None)
print(json.dumps({"applied": applied, "faults": faults}))
"""
PAGES = (64 + 12) * 2**20 // 4096


def run_calls(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", CALLS, mode], capture_output=True, text=True, check=True,
                            env={**clean, **env})
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def fresh_pages_fault() -> None:
    """Skips where glibc's defaults do not fault either: there is nothing for the setting to show."""
    if max(run_calls("default")["faults"][-3:]) < PAGES // 2:
        pytest.skip("this machine's kernel does not fault every fresh page (transparent huge pages?)")


@pytest.mark.usefixtures("fresh_pages_fault")
def test_kept_memory_is_reused_without_page_faults() -> None:
    kept = run_calls("keep")
    assert kept["applied"] is True
    # glibc's aligned allocations need a few calls to settle into reusable free blocks
    assert max(kept["faults"][-3:]) < PAGES // 20, kept["faults"]


@pytest.mark.usefixtures("fresh_pages_fault")
def test_the_commands_keep_memory_when_run_as_programs_only() -> None:
    assert max(run_calls("program")["faults"][-3:]) < PAGES // 20
    assert min(run_calls("called")["faults"][-3:]) >= PAGES // 2  # main([...]) from Python code changes nothing


def test_the_users_own_malloc_settings_win() -> None:
    assert run_calls("keep", MALLOC_ARENA_MAX="2")["applied"] is True  # not a MALLOC_*_ setting
    assert run_calls("keep", MALLOC_TRIM_THRESHOLD_="1000000")["applied"] is False
    assert run_calls("keep", GLIBC_TUNABLES="glibc.malloc.mmap_max=0")["applied"] is False
