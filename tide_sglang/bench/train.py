"""`tide bench train`: draft training from streamed hidden states (TIDE) vs SpecForge's online and offline modes.

One run, same machine, same target, same draft initialisation, same training rows and held-out rows:
  tide     the serving engine already captured the aux hidden states; the trainer reads them from the Redis
           stream (read, decode and stitch are timed) and trains.
  online   SpecForge "online": every step recomputes the batch's hidden states with a target forward over each
           sequence's prefix, then trains.
  offline  SpecForge "offline": one target prefill over the whole training set first (timed), then trains
           from the stored states.
Figures: draft-training rows/s (hidden-state production included) and the wall time to reach the same
held-out acceptance length (80 % of the gain TIDE's run achieved), as ratios. Evaluation time is not counted.
On the CPU the target (SmolLM2-135M) dwarfs the one-layer draft, so ratios there overstate the GPU ones.
"""

import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.table import Table

from tide_sglang import keys
from tide_sglang.bench import BenchReport, goal
from tide_sglang.bench.traffic import batched_aux, cached_generate, capture, prompt_lengths, prompts
from tide_sglang.draft import DraftRegistry, Eagle3Draft
from tide_sglang.draft.target import Target, heads_of, load_target
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamReader, StreamWriter, connect
from tide_sglang.stream.server import LocalRedis
from tide_sglang.trainer import Chunk, DraftTrainer, acceptance, collate, ttt_loss
from tide_sglang.trainer.replay import ReplayBuffer, TrainBatch


class Plan(BaseModel):
    requests: int
    max_new: int
    steps: int
    eval_every: int
    chunk_len: int = 16
    batch_chunks: int = 4
    ttt_steps: int = 3
    vocab: int = 1024
    lr: float = 2e-3


QUICK = Plan(requests=24, max_new=40, steps=30, eval_every=5)
FULL = Plan(requests=48, max_new=64, steps=120, eval_every=10)


class WayResult(BaseModel):
    way: str
    setup_s: float  # before the first step: stream drain (tide) or full prefill (offline)
    train_s: float  # the training loop, hidden-state recompute included (online), evaluation excluded
    rows: int  # training rows consumed by optimizer steps
    curve: list[tuple[int, float, float]]  # (step, seconds since start, held-out acceptance length)
    reach_s: float | None = None
    reach_step: int | None = None

    @property
    def rows_s(self) -> float:
        return self.rows / (self.setup_s + self.train_s)


def _settings(url: str, plan: Plan) -> TideSettings:
    return TideSettings(redis_url=url, deployment="bench", train_device="cpu", train_chunk_len=plan.chunk_len,
                        train_batch_chunks=plan.batch_chunks, train_ttt_steps=plan.ttt_steps, train_lr=plan.lr,
                        train_draft_vocab_size=plan.vocab, train_vocab_warmup_rows=100, train_heldout_fraction=0.2,
                        train_min_heldout_rows=1)


class Way(BaseModel):
    """One way under test: its result so far, its draft and its optimizer step (returns the rows it trained)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    result: WayResult
    draft: Eagle3Draft
    step: Callable[[], int]


def _tide(target: Target, url: str, plan: Plan, batches: list, registry: Path) -> tuple[Way, DraftTrainer,
                                                                                        Eagle3Draft]:
    """The engine's captures are already in the stream (written untimed, as serving does); drain, then train."""
    settings = _settings(url, plan)
    with StreamWriter(lambda: connect(settings), keys.hidden_states("default", "bench")) as writer:
        for b in batches:
            writer.submit(b)
        writer.flush(60)
    reader = StreamReader(connect(settings), keys.hidden_states("default", "bench"),
                          keys.dead_letter("default", "bench"), "bench", count=64, block_ms=10)
    trainer = DraftTrainer(settings, DraftRegistry(registry, create=True), reader, heads_of(target.model))
    total = sum(b.num_tokens for b in batches)
    start = time.perf_counter()
    while trainer.ingested_rows < total:
        trainer.poll()
    trainer.close_sequences()  # the traffic ends here; the service closes them at each checkpoint
    setup = time.perf_counter() - start
    assert trainer.draft is not None
    initial = copy.deepcopy(trainer.draft)
    way = Way(result=WayResult(way="tide", setup_s=setup, train_s=0.0, rows=0, curve=[]), draft=trainer.draft,
              step=lambda: trainer.train_step().rows)
    return way, trainer, initial


def _interleave(ways: list[Way], heldout: list[Chunk], plan: Plan) -> None:
    """Step the ways round-robin, so load from other processes on a shared machine hits all of them alike;
    evaluate every `eval_every` steps, untimed."""
    def score(w: Way) -> None:
        r = w.result
        r.curve.append((len(r.curve) * plan.eval_every, r.setup_s + r.train_s,
                        acceptance(w.draft.eval(), heldout, plan.ttt_steps).accept_length))
        w.draft.train()

    for w in ways:
        score(w)
    for i in range(1, plan.steps + 1):
        for w in ways:
            t0 = time.perf_counter()
            w.result.rows += w.step()
            w.result.train_s += time.perf_counter() - t0
        if i % plan.eval_every == 0:
            for w in ways:
                score(w)


def _specforge_step(draft: Eagle3Draft, plan: Plan, make: Callable[[list[Chunk]], TrainBatch],
                    chunks: list[Chunk]) -> Callable[[], int]:
    """The trainer's optimizer step, on batches whose hidden states `make` produces. The chunks go into a replay
    buffer built like the trainer's (same order, same seed), so all ways train on the same batches."""
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=plan.lr, weight_decay=0.0)
    defaults = TideSettings.model_fields
    replay = ReplayBuffer(defaults["train_recent_chunks"].default, defaults["train_reservoir_chunks"].default)
    for c in chunks:
        replay.add(c)

    def step() -> int:
        batch = make(replay.sample(plan.batch_chunks))
        loss, report = ttt_loss(draft, batch, plan.ttt_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        return report.rows

    return step


def _with_states(chunks: list[Chunk], states: list[torch.Tensor]) -> TrainBatch:
    # bf16, as captured: all three ways train on identically rounded states.
    return collate([Chunk(hidden=h.to(torch.bfloat16), tokens=c.tokens, positions=c.positions, rid=c.rid)
                    for c, h in zip(chunks, states, strict=True)])


def _online(target: Target, init: Eagle3Draft, chunks: list[Chunk], sequences: dict[str, torch.Tensor],
            plan: Plan) -> Way:
    def make(batch: list[Chunk]) -> TrainBatch:
        prefixes = [sequences[c.rid][: int(c.positions[-1]) + 1] for c in batch]
        aux = batched_aux(target, prefixes)  # a target forward over every prefix, every step
        return _with_states(batch, [a[c.positions] for a, c in zip(aux, batch, strict=True)])

    draft = copy.deepcopy(init)
    return Way(result=WayResult(way="online", setup_s=0.0, train_s=0.0, rows=0, curve=[]), draft=draft,
               step=_specforge_step(draft, plan, make, chunks))


def _offline(target: Target, init: Eagle3Draft, chunks: list[Chunk], sequences: dict[str, torch.Tensor],
             plan: Plan) -> Way:
    rids = sorted({c.rid for c in chunks})
    start = time.perf_counter()
    stored = dict(zip(rids, (a.to(torch.bfloat16) for a in batched_aux(target, [sequences[r] for r in rids])),
                      strict=True))  # the prefill pass over the whole training set
    setup = time.perf_counter() - start

    def make(batch: list[Chunk]) -> TrainBatch:
        return _with_states(batch, [stored[c.rid][c.positions] for c in batch])

    draft = copy.deepcopy(init)
    return Way(result=WayResult(way="offline", setup_s=setup, train_s=0.0, rows=0, curve=[]), draft=draft,
               step=_specforge_step(draft, plan, make, chunks))


def _reach(result: WayResult, threshold: float) -> None:
    hit = next(((step, t) for step, t, acc in result.curve if acc >= threshold), None)
    if hit is not None:
        result.reach_step, result.reach_s = hit


def _table(console: Console, ways: list[WayResult], threshold: float) -> None:
    table = Table(title=f"draft training, CPU, time to held-out acceptance length {threshold:.3f}")
    for col in ("way", "setup s", "train s", "rows/s", "steps to reach", "s to reach", "final accept"):
        table.add_column(col, justify="right")
    for w in ways:
        table.add_row(w.way, f"{w.setup_s:.1f}", f"{w.train_s:.1f}", f"{w.rows_s:.0f}", str(w.reach_step or "-"),
                      f"{w.reach_s:.1f}" if w.reach_s is not None else "not reached", f"{w.curve[-1][2]:.3f}")
    console.print(table)


def _ratio(other: WayResult, tide: WayResult) -> float:
    """other/tide time to reach; a way that never reached counts its whole run (a lower bound)."""
    assert tide.reach_s is not None
    return (other.reach_s if other.reach_s is not None else other.setup_s + other.train_s) / tide.reach_s


def run(quick: bool, console: Console) -> BenchReport:
    plan = QUICK if quick else FULL
    target = load_target()
    console.print(f"generating {plan.requests} SmolLM2 completions (cached after the first run) ...")
    texts = prompts(plan.requests)
    sequences = cached_generate(target, texts, plan.max_new)
    rids = [f"req-{i}" for i in range(len(sequences))]
    batches = capture(target, sequences, rids, prompt_lengths(target, texts), rows_per_step=4)
    with LocalRedis() as server, tempfile.TemporaryDirectory() as tmp:
        tide_way, trainer, init = _tide(target, server.url, plan, batches, Path(tmp))
        chunks, heldout, by_rid = trainer.replay.chunks(), list(trainer.heldout), dict(zip(rids, sequences,
                                                                                         strict=True))
        console.print(f"{len(chunks)} training, {len(heldout)} held-out sequences; {plan.steps} steps, 3 ways ...")
        ways = [tide_way, _offline(target, init, chunks, by_rid, plan), _online(target, init, chunks, by_rid, plan)]
        _interleave(ways, heldout, plan)
    tide, offline, online = (w.result for w in ways)
    start = tide.curve[0][2]
    threshold = start + 0.8 * (max(acc for _, _, acc in tide.curve) - start)
    for r in (tide, offline, online):
        _reach(r, threshold)
    _table(console, [tide, offline, online], threshold)
    vs_online, vs_offline = _ratio(online, tide), _ratio(offline, tide)
    figures = {
        "device": "cpu", "target": "smollm2-135m", "plan": plan.model_dump(), "threshold_accept_length": threshold,
        "ways": {r.way: {**r.model_dump(), "rows_s": r.rows_s} for r in (tide, offline, online)},
        "rows_s_vs_online": tide.rows_s / online.rows_s, "rows_s_vs_offline": tide.rows_s / offline.rows_s,
        "reach_vs_online": vs_online, "reach_vs_offline": vs_offline,
    }
    goals = [goal("cpu time to acceptance, online / tide", vs_online, "x", ">=", 3.0),
             goal("cpu time to acceptance, offline / tide", vs_offline, "x", ">=", 1.67)]
    return BenchReport(name="train", quick=quick, figures=figures, goals=goals)
