"""Import boundaries that deployment images rely on."""

import re
import subprocess
import sys
from pathlib import Path


def test_operator_imports_without_torch():
    # The operator image carries no torch: importing the operator must not pull it in through tide_sglang. Nor
    # kmock (a dev dependency): only tide_operator.emulator, for tests and `tide bench faults`, imports it.
    code = ("import sys, tide_operator.handlers, tide_operator.redis_io, tide_sglang.rollout; "
            "sys.exit('torch' in sys.modules or 'kmock' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_tide_sglang_reaches_the_operator_only_from_benchmarks_that_run_it():
    # The operator imports tide_sglang, never the reverse; the exceptions (docs/architecture.md) are two
    # benchmarks at the top of the stack: the operator-restarted drill, which runs the operator against its
    # emulator, and the training-gate bench, which runs the operator's own gate functions.
    root = Path(__file__).resolve().parents[1] / "tide_sglang"
    importers = {str(p.relative_to(root)) for p in root.rglob("*.py")
                 if re.search(r"^\s*(from|import) tide_operator\b", p.read_text(), re.MULTILINE)}
    assert importers == {"bench/faults.py", "bench/train_gate.py"}, importers
