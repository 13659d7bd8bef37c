"""`tide bench train`: draft training from streamed hidden states (TIDE) vs SpecForge's online and offline modes.

One run, same device, same target, same draft initialisation, same held-out prompts, and the same sequences
sampled for every step (whole requests: one chunk is one request, drawn from replay buffers built alike):
  tide     the serving engine already captured the aux hidden states; the trainer reads them from the Redis
           stream (read, decode and stitch are timed) and trains.
  online   SpecForge "online": every step runs one target forward per sampled sequence and trains on all of its
           positions.
  offline  SpecForge "offline": one target prefill over the whole training set first (timed, reported beside the
           ratio), then trains from the stored states.
Figures: draft-training rows/s (hidden-state production included) and the wall time to reach the same
held-out acceptance length (80 % of the gain TIDE's run achieved; generated rows only), as ratios. The ways run
in turn, `eval_every` steps each, timed to the end of the device's work; evaluation is not counted.
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

from tide_sglang.bench import BenchReport, goal
from tide_sglang.bench.traffic import (
    batched_aux,
    cached_generate,
    capture,
    drain_into_trainer,
    prompt_lengths,
    prompts,
)
from tide_sglang.draft import Eagle3Draft
from tide_sglang.draft.target import Target, load_target
from tide_sglang.settings import TideSettings
from tide_sglang.stream.server import LocalRedis
from tide_sglang.trainer import Chunk, DraftTrainer, acceptance, collate, new_optimizer, optimizer_step
from tide_sglang.trainer.replay import ReplayBuffer, TrainBatch

FLOPS_TARGET = 8e9  # parameters of the target the offline prefill is scaled to (a Llama-3-8B class model)


class Plan(BaseModel):
    requests: int
    max_new: int
    steps: int
    eval_every: int
    batch_sequences: int = 4  # whole requests per optimizer step, the same for every way
    ttt_steps: int = 3
    vocab: int = 1024
    lr: float = 2e-3


PLANS = {
    "quick": Plan(requests=24, max_new=40, steps=20, eval_every=5, batch_sequences=2),
    "cpu": Plan(requests=48, max_new=64, steps=120, eval_every=10),
    "cuda": Plan(requests=80, max_new=256, steps=600, eval_every=25, batch_sequences=8, vocab=8192, lr=1e-3),
}


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


class Way(BaseModel):
    """One way under test: its result so far, its draft and its optimizer step (returns the rows it trained)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    result: WayResult
    draft: Eagle3Draft
    step: Callable[[], int]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _settings(url: str, plan: Plan, device: torch.device, chunk_len: int) -> TideSettings:
    return TideSettings(redis_url=url, deployment="bench", train_device=str(device), train_chunk_len=chunk_len,
                        train_batch_chunks=plan.batch_sequences, train_ttt_steps=plan.ttt_steps, train_lr=plan.lr,
                        train_draft_vocab_size=plan.vocab, train_vocab_warmup_rows=100, train_heldout_fraction=0.2,
                        train_min_heldout_rows=1)


def _tide(target: Target, settings: TideSettings, batches: list, registry: Path) -> tuple[Way, DraftTrainer,
                                                                                           Eagle3Draft]:
    """The engine's captures are already in the stream; the drain (read, decode, stitch) is TIDE's setup."""
    trainer, setup = drain_into_trainer(settings, batches, registry, target)
    assert trainer.draft is not None
    initial = copy.deepcopy(trainer.draft)
    way = Way(result=WayResult(way="tide", setup_s=setup, train_s=0.0, rows=0, curve=[]), draft=trainer.draft,
              step=lambda: trainer.train_step().rows)
    return way, trainer, initial


def _interleave(ways: list[Way], heldout: list[Chunk], plan: Plan, device: torch.device) -> None:
    """Run the ways in turn, `eval_every` steps each, so other load on a shared machine hits all of them alike;
    a block is timed to the end of its work on the device (no way waits for the device inside a block)."""
    def score(w: Way) -> None:
        r = w.result
        accept = acceptance(w.draft.eval(), heldout, plan.ttt_steps, device=device).accept_length
        r.curve.append((len(r.curve) * plan.eval_every, r.setup_s + r.train_s, accept))
        w.draft.train()

    for w in ways:
        score(w)
    for _ in range(plan.steps // plan.eval_every):
        for w in ways:
            t0 = time.perf_counter()
            for _ in range(plan.eval_every):
                w.result.rows += w.step()
            _sync(device)
            w.result.train_s += time.perf_counter() - t0
            score(w)


def _specforge_step(draft: Eagle3Draft, plan: Plan, make: Callable[[list[Chunk]], TrainBatch],
                    chunks: list[Chunk]) -> Callable[[], int]:
    """The trainer's optimizer step, on batches whose hidden states `make` produces. The chunks go into a replay
    buffer built like the trainer's (same order, same seed), so every way trains on the same sequences."""
    opt = new_optimizer(draft, plan.lr, weight_decay=0.0)
    defaults = TideSettings.model_fields
    replay = ReplayBuffer(defaults["train_recent_chunks"].default, defaults["train_reservoir_chunks"].default)
    for c in chunks:
        replay.add(c)
    return lambda: optimizer_step(draft, opt, make(replay.sample(plan.batch_sequences)), plan.ttt_steps).rows


def _with_states(chunks: list[Chunk], states: list[torch.Tensor], device: torch.device) -> TrainBatch:
    # bf16, as captured: all three ways train on identically rounded states.
    return collate([c.model_copy(update={"hidden": h.to(torch.bfloat16)}) for c, h in zip(chunks, states,
                                                                                          strict=True)], device)


def _online(target: Target, init: Eagle3Draft, chunks: list[Chunk], sequences: dict[str, torch.Tensor],
            plan: Plan, device: torch.device) -> Way:
    def make(batch: list[Chunk]) -> TrainBatch:
        # One target forward per sampled sequence, every step; each chunk is a whole request.
        aux = batched_aux(target, [sequences[c.rid].to(device) for c in batch])
        return _with_states(batch, [a[c.positions.to(device)] for a, c in zip(aux, batch, strict=True)], device)

    draft = copy.deepcopy(init)
    return Way(result=WayResult(way="online", setup_s=0.0, train_s=0.0, rows=0, curve=[]), draft=draft,
               step=_specforge_step(draft, plan, make, chunks))


def _offline(target: Target, init: Eagle3Draft, chunks: list[Chunk], sequences: dict[str, torch.Tensor],
             plan: Plan, device: torch.device) -> Way:
    rids = sorted({c.rid for c in chunks})
    start = time.perf_counter()
    aux = batched_aux(target, [sequences[r].to(device) for r in rids])  # the prefill pass over the training set
    stored = {r: a.to(torch.bfloat16).cpu() for r, a in zip(rids, aux, strict=True)}  # kept on the host, as TIDE
    setup = time.perf_counter() - start

    def make(batch: list[Chunk]) -> TrainBatch:
        return _with_states(batch, [stored[c.rid][c.positions] for c in batch], device)

    draft = copy.deepcopy(init)
    return Way(result=WayResult(way="offline", setup_s=setup, train_s=0.0, rows=0, curve=[]), draft=draft,
               step=_specforge_step(draft, plan, make, chunks))


def _reach(result: WayResult, threshold: float) -> None:
    hit = next(((step, t) for step, t, acc in result.curve if acc >= threshold), None)
    if hit is not None:
        result.reach_step, result.reach_s = hit


def _table(console: Console, ways: list[WayResult], threshold: float, label: str) -> None:
    table = Table(title=f"draft training, {label}, time to held-out acceptance length {threshold:.3f}")
    for col in ("way", "setup s", "train s", "rows/s", "steps to reach", "s to reach", "final accept"):
        table.add_column(col, justify="right")
    for w in ways:
        table.add_row(w.way, f"{w.setup_s:.2f}", f"{w.train_s:.2f}", f"{w.rows_s:.0f}", str(w.reach_step or "-"),
                      f"{w.reach_s:.2f}" if w.reach_s is not None else "not reached", f"{w.curve[-1][2]:.3f}")
    console.print(table)


def _ratio(other: WayResult, tide: WayResult) -> float:
    """other/tide time to reach; a way that never reached counts its whole run (a lower bound)."""
    assert tide.reach_s is not None
    return (other.reach_s if other.reach_s is not None else other.setup_s + other.train_s) / tide.reach_s


def _traffic(target: Target, plan: Plan, console: Console) -> tuple[list, dict[str, torch.Tensor], int]:
    """Greedy completions of the plan's prompts, cut into verify-step captures; also the longest sequence."""
    console.print(f"generating {plan.requests} SmolLM2 completions (cached after the first run) ...")
    texts = prompts(plan.requests)
    sequences = [s.cpu() for s in cached_generate(target, texts, plan.max_new)]
    rids = [f"req-{i}" for i in range(len(sequences))]
    batches = capture(target, sequences, rids, prompt_lengths(target, texts), rows_per_step=4)
    return batches, dict(zip(rids, sequences, strict=True)), max(s.numel() for s in sequences)


def run(quick: bool, console: Console, *, device: str | None = None) -> BenchReport:
    """`device`: "cpu" (the default) or "cuda"; `tide bench train --device cuda`. On the CPU torch runs on one
    thread: on a shared machine two OpenMP threads that lose their core wait for each other (10x slower steps)."""
    dev = torch.device(device or "cpu")
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _run(quick, console, dev)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, console: Console, dev: torch.device) -> BenchReport:
    plan = PLANS["quick" if quick else dev.type]
    target = load_target(device=str(dev), dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    batches, by_rid, longest = _traffic(target, plan, console)
    with LocalRedis() as server, tempfile.TemporaryDirectory() as tmp:
        settings = _settings(server.url, plan, dev, chunk_len=longest)  # a chunk is a whole request
        tide_way, trainer, init = _tide(target, settings, batches, Path(tmp))
        chunks, heldout = trainer.replay.chunks(), list(trainer.heldout)
        console.print(f"{len(chunks)} training, {len(heldout)} held-out sequences; {plan.steps} steps, 3 ways ...")
        ways = [tide_way, _offline(target, init, chunks, by_rid, plan, dev),
                _online(target, init, chunks, by_rid, plan, dev)]
        _interleave(ways, heldout, plan, dev)
    tide, offline, online = (w.result for w in ways)
    start = tide.curve[0][2]
    threshold = start + 0.8 * (max(acc for _, _, acc in tide.curve) - start)
    for r in (tide, offline, online):
        _reach(r, threshold)
    label = dev.type.upper()
    _table(console, [tide, offline, online], threshold, label)
    report = _report(quick, plan, target, dev, threshold, tide, offline, online, chunks)
    trained, held = {c.prompt_key for c in chunks}, {c.prompt_key for c in heldout}
    report.figures["prompts"] = {"train": len(trained), "heldout": len(held), "shared": len(trained & held)}
    return report


def _report(quick: bool, plan: Plan, target: Target, dev: torch.device, threshold: float, tide: WayResult,
            offline: WayResult, online: WayResult, chunks: list[Chunk]) -> BenchReport:
    vs_online, vs_offline = _ratio(online, tide), _ratio(offline, tide)
    params = sum(p.numel() for p in target.model.parameters())
    prefill_tokens = sum(c.length + 1 for c in chunks)
    per_token = offline.setup_s / prefill_tokens
    # The prefill grows with the target (FLOPs per token ~ 2 x parameters); the draft training part is kept as
    # measured, so this is the ratio with an 8B target's prefill in front of the same training.
    prefill_8b = per_token * prefill_tokens * FLOPS_TARGET / params
    offline_8b = (offline.reach_s or offline.setup_s + offline.train_s) - offline.setup_s + prefill_8b
    figures = {
        "device": dev.type, "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "target": "smollm2-135m", "target_parameters": params, "plan": plan.model_dump(),
        "threshold_accept_length": threshold,
        "ways": {r.way: {**r.model_dump(), "rows_s": r.rows_s} for r in (tide, offline, online)},
        "rows_s_vs_online": tide.rows_s / online.rows_s, "rows_s_vs_offline": tide.rows_s / offline.rows_s,
        "reach_vs_online": vs_online, "reach_vs_offline": vs_offline,
        "offline_prefill_s": offline.setup_s, "offline_prefill_tokens": prefill_tokens,
        "offline_prefill_s_per_token": per_token,
        "offline_prefill_s_8b_estimate": prefill_8b, "reach_vs_offline_8b_estimate": offline_8b / (tide.reach_s or 1),
    }
    label = dev.type
    goals = [goal(f"{label} time to acceptance, online / tide", vs_online, "x", ">=", 3.0),
             goal(f"{label} time to acceptance, offline / tide", vs_offline, "x", ">=", 1.67)]
    return BenchReport(name="train", quick=quick, figures=figures, goals=goals)
