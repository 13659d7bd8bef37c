"""`tide bench train --quick` on the CPU: the three ways train on the same sequences and are scored on held-out
prompts none of them trained on. Figures only; no timing is asserted (speed is what the bench reports)."""

import io

from click.testing import CliRunner
from rich.console import Console

from tide_sglang.bench import train
from tide_sglang.cli import main


def test_quick_bench_trains_three_ways_on_the_same_sequences() -> None:
    report = train.run(quick=True, console=Console(file=io.StringIO()))
    f = report.figures
    ways = f["ways"]
    assert f["device"] == "cpu" and set(ways) == {"tide", "offline", "online"}
    assert ways["tide"]["rows"] == ways["offline"]["rows"] == ways["online"]["rows"] > 0, "same sampled sequences"
    assert len({len(w["curve"]) for w in ways.values()}) == 1
    tide = ways["tide"]["curve"]
    assert tide[-1][2] > tide[0][2], "training raised the held-out acceptance"
    assert ways["tide"]["reach_s"] is not None and f["offline_prefill_s"] > 0
    assert f["offline_prefill_s_8b_estimate"] > f["offline_prefill_s"]
    assert f["prompts"]["shared"] == 0 and f["prompts"]["heldout"] > 0
    assert [g.name for g in report.goals] == ["cpu time to acceptance, online / tide",
                                              "cpu time to acceptance, offline / tide"]


def test_device_option_reaches_only_benchmarks_that_take_it() -> None:
    result = CliRunner().invoke(main, ["bench", "capture", "--device", "cuda"])
    assert result.exit_code != 0 and "capture has no parameter device" in result.output
