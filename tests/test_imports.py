"""Import boundaries that deployment images rely on."""

import subprocess
import sys


def test_operator_imports_without_torch():
    # The operator image carries no torch: importing the operator must not pull it in through tide_sglang. Nor
    # kmock (a dev dependency): only tide_operator.emulator, for tests and `tide bench faults`, imports it.
    code = ("import sys, tide_operator.handlers, tide_operator.redis_io, tide_sglang.rollout; "
            "sys.exit('torch' in sys.modules or 'kmock' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
