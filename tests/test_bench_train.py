"""`tide bench train --quick` on the CPU: the three ways train on the same sequences and are scored on held-out
prompts none of them trained on. Figures only; no timing is asserted (speed is what the bench reports)."""

import io
import itertools

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


def _served_into(settings, batches) -> None:
    """Write capture batches into the deployment's stream, as a serving engine's writer does."""
    from tide_sglang import keys
    from tide_sglang.stream import StreamWriter, connect

    with StreamWriter(lambda: connect(settings), keys.hidden_states(settings.namespace, settings.deployment),
                      budget_bytes=1 << 30) as writer:
        for b in batches:
            assert writer.submit(b)
        writer.flush(30)


def test_a_trainer_reads_everything_a_serving_engine_left_in_its_stream(redis_server, tmp_path) -> None:
    """bench.static's stream source (`--stream-url`): captures an engine wrote are read to the end, however many
    rows they hold, and a draft vocabulary is chosen from them; the generated source reads an exact count."""
    import torch

    from tide_sglang.bench.traffic import capture, generate, prompt_lengths, prompts, read_into_trainer
    from tide_sglang.draft.target import load_target
    from tide_sglang.settings import TideSettings

    target = load_target(device="cpu", dtype=torch.float32)
    texts = prompts(3)
    batches = capture(target, generate(target, texts, 8), ["a", "b", "c"], prompt_lengths(target, texts))
    rows = sum(b.num_tokens for b in batches)
    settings = TideSettings(redis_url=redis_server.url, deployment="served", train_device="cpu",
                            train_vocab_warmup_rows=rows // 2, train_draft_vocab_size=64, train_chunk_len=64)
    _served_into(settings, batches)
    trainer, seconds = read_into_trainer(settings, tmp_path / "reg", target, idle_s=0.5)
    assert trainer.ingested_rows == rows and trainer.draft is not None and seconds > 0
    assert sum(c.length for c in [*trainer.replay.chunks(), *trainer.heldout]) == rows
    # A count the stream cannot reach is an error, not a hang (the group has read every entry already).
    with pytest.raises(RuntimeError, match=f"holds 0 of the {rows + 1} rows"):
        read_into_trainer(settings, tmp_path / "reg2", target, rows=rows + 1, idle_s=0.5)


def test_a_static_draft_samples_every_collected_request_alike() -> None:
    """bench.static keeps every request of a large collection (the serving trainer's window + reservoir would keep
    2,560 of 4,096 and draw half its batches from the newest 512) and draws them uniformly."""
    import torch

    from tide_sglang.bench.static import StaticPlan, _settings
    from tide_sglang.trainer.replay import Chunk, ReplayBuffer

    s = _settings("redis://localhost:1", "static", StaticPlan(requests=4096), "cpu", 1000)
    replay = ReplayBuffer(s.train_recent_chunks, s.train_reservoir_chunks)
    for i in range(4096):
        replay.add(Chunk(hidden=torch.zeros(1, 2), tokens=torch.zeros(1, dtype=torch.int64),
                         positions=torch.zeros(1, dtype=torch.int64), is_prompt=torch.zeros(1, dtype=torch.bool),
                         rid=str(i)))
    assert len(replay) == 4096
    drawn = [int(c.rid) for c in replay.sample(20_000)]
    newest = sum(r >= 4096 - 512 for r in drawn) / len(drawn)
    assert 0.10 < newest < 0.15, f"the newest 512 of 4,096 drawn {newest:.0%} of the time, not ~12.5 %"


def test_a_static_draft_warms_up_then_decays_its_learning_rate() -> None:
    from tide_sglang.bench.static import LR_FLOOR, WARMUP, cosine_lr

    assert cosine_lr(1e-3, 0.0) < 1e-4 and cosine_lr(1e-3, WARMUP) == pytest.approx(1e-3)
    rates = [cosine_lr(1e-3, WARMUP + k * (1 - WARMUP) / 10) for k in range(11)]
    assert all(a > b for a, b in itertools.pairwise(rates)), "falls after the warm-up"
    assert rates[-1] == pytest.approx(LR_FLOOR * 1e-3) and cosine_lr(1e-3, 3.0) == rates[-1]


def test_a_static_draft_keeps_its_best_held_out_weights(redis_server, tmp_path, monkeypatch) -> None:
    """bench.static scores the draft on the trainer's own held-out requests as it trains and keeps the weights that
    scored best: what it publishes scores the curve's maximum (a rate high enough to move the draft every step)."""
    import torch

    from tide_sglang.bench import static
    from tide_sglang.bench.traffic import capture, generate, prompt_lengths, prompts, read_into_trainer
    from tide_sglang.draft.target import load_target
    from tide_sglang.settings import TideSettings
    from tide_sglang.trainer import acceptance

    target = load_target(device="cpu", dtype=torch.float32)
    texts = prompts(8)
    rids = [f"r{i}" for i in range(len(texts))]
    batches = capture(target, generate(target, texts, 12), rids, prompt_lengths(target, texts))
    settings = TideSettings(redis_url=redis_server.url, deployment="best", train_device="cpu",
                            train_vocab_warmup_rows=10, train_draft_vocab_size=256, train_chunk_len=64,
                            train_heldout_fraction=0.4, train_lr=0.05, train_batch_chunks=4)
    _served_into(settings, batches)
    trainer, _ = read_into_trainer(settings, tmp_path / "reg", target, idle_s=0.5)
    assert trainer.heldout and len(trainer.replay), "some requests held out, some trained on"
    monkeypatch.setattr(static, "SCORE_EVERY", 2)
    fitted = static._fit(trainer, static.StaticPlan(requests=8, steps=7, lr=0.05, ttt_steps=2))
    assert [p[0] for p in fitted["heldout_curve"]] == [2, 4, 6, 7]
    scores = [p[2] for p in fitted["heldout_curve"]]
    assert fitted["best_step"] == fitted["heldout_curve"][scores.index(max(scores))][0] and max(scores) > 1.0
    kept = acceptance(trainer.draft.eval(), list(trainer.heldout), 2).accept_length
    assert kept == pytest.approx(max(scores))
    # a later, worse score does not replace the best weights: a draft whose head says nothing scores 1.0
    best = static._Best(trainer, static.StaticPlan(ttt_steps=2))
    best.score(1, 0.0)
    with torch.no_grad():
        trainer.draft.lm_head.weight.zero_()
    best.score(2, 0.0)
    assert [p[2] for p in best.curve] == [pytest.approx(kept), 1.0] and best.restore()["best_step"] == 1
    assert acceptance(trainer.draft.eval(), list(trainer.heldout), 2).accept_length == pytest.approx(kept)
