"""`tide bench train --quick` on the CPU: the three ways train on the same sequences and are scored on held-out
prompts none of them trained on. Figures only; no timing is asserted (speed is what the bench reports)."""

import io

import pytest
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
    result = CliRunner().invoke(main, ["bench", "stream", "--device", "cuda"])
    assert result.exit_code == 2 and "stream has no parameter device" in result.output


def test_a_cuda_device_without_cuda_is_a_usage_error() -> None:
    """On this CPU-only machine (torch's CPU build) `--device cuda` is refused before any benchmark starts."""
    result = CliRunner().invoke(main, ["bench", "capture", "--device", "cuda"])
    assert result.exit_code == 2 and "this machine has no CUDA device" in result.output


def test_a_trainer_reads_everything_a_serving_engine_left_in_its_stream(redis_server, tmp_path) -> None:
    """bench.static's stream source (`--stream-url`): captures an engine wrote are read to the end, however many
    rows they hold, and a draft vocabulary is chosen from them; the generated source reads an exact count."""
    import torch

    from tide_sglang import keys
    from tide_sglang.bench.traffic import capture, generate, prompt_lengths, prompts, read_into_trainer
    from tide_sglang.draft.target import load_target
    from tide_sglang.settings import TideSettings
    from tide_sglang.stream import StreamWriter, connect

    target = load_target(device="cpu", dtype=torch.float32)
    texts = prompts(3)
    batches = capture(target, generate(target, texts, 8), ["a", "b", "c"], prompt_lengths(target, texts))
    rows = sum(b.num_tokens for b in batches)
    settings = TideSettings(redis_url=redis_server.url, deployment="served", train_device="cpu",
                            train_vocab_warmup_rows=rows // 2, train_draft_vocab_size=64, train_chunk_len=64)
    with StreamWriter(lambda: connect(settings), keys.hidden_states(settings.namespace, "served"),
                      budget_bytes=1 << 30) as writer:
        for b in batches:
            assert writer.submit(b)
        writer.flush(30)
    trainer, seconds = read_into_trainer(settings, tmp_path / "reg", target, idle_s=0.5)
    assert trainer.ingested_rows == rows and trainer.draft is not None and seconds > 0
    assert sum(c.length for c in [*trainer.replay.chunks(), *trainer.heldout]) == rows
    # A count the stream cannot reach is an error, not a hang (the group has read every entry already).
    with pytest.raises(RuntimeError, match=f"holds 0 of the {rows + 1} rows"):
        read_into_trainer(settings, tmp_path / "reg2", target, rows=rows + 1, idle_s=0.5)
