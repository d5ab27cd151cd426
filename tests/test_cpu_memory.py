"""deris.cpu_memory: with its setting, a repeated large tensor stops costing fresh pages."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the setting is glibc's")

# A forward's pattern in miniature: the same large activations allocated, written and freed call
# after call. Prints the minor page faults of each call.
CALLS = """
import json, resource, sys
import torch
from deris.cpu_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    big, small = torch.empty(16 * 2**20), torch.empty(3 * 2**20)  # 64 MiB and 12 MiB
    big.fill_(1.0), small.fill_(1.0)
    del big, small
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""
PAGES = (64 + 12) * 2**20 // 4096


def run_calls(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", CALLS, mode], capture_output=True, text=True, check=True,
                            env={**clean, **env})
    return json.loads(result.stdout)


def test_kept_memory_is_reused_without_page_faults() -> None:
    default = run_calls("default")
    if max(default["faults"][-3:]) < PAGES // 2:
        pytest.skip("this machine's kernel does not fault every fresh page (transparent huge pages?)")
    kept = run_calls("keep")
    assert kept["applied"] is True
    # glibc's aligned allocations need a few calls to settle into reusable free blocks
    assert max(kept["faults"][-3:]) < PAGES // 20, kept["faults"]


def test_the_users_own_malloc_settings_win() -> None:
    assert run_calls("keep", MALLOC_ARENA_MAX="2")["applied"] is True  # not a MALLOC_*_ setting
    assert run_calls("keep", MALLOC_TRIM_THRESHOLD_="1000000")["applied"] is False
    assert run_calls("keep", GLIBC_TUNABLES="glibc.malloc.mmap_max=0")["applied"] is False
