"""benchmarks/kernels.py --quick: the CPU smoke run exits 0 and prints a results table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def test_quick_benchmark_prints_a_table(tmp_path):
    out = tmp_path / "bench.md"
    # The environment (TRITON_INTERPRET=1 from conftest.py) is inherited: the Triton kernels run too.
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| op | pass | dtype |")
    rows = table[2:]
    assert {row.split("|")[1].strip() for row in rows} == {"msda", "msda_fused", "mask_pool"}
    assert all(row.split("|")[8].strip() != "-" for row in rows), "the Triton path did not run"
    assert out.read_text().startswith("# deris kernel benchmark")
