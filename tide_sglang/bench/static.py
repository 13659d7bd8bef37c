"""A static draft worth serving: trained offline on "train" prompts, served by SGLang on "eval" prompts.

The GPU comparisons (controller, loop) need a draft SGLang accepts well on MT-Bench writing, trained on prompts
it is never evaluated on (workloads.split_of): ShareGPT's English opening turns plus the "train" side of the
writing workload; evaluated on the "eval" side of the writing workload (MT-Bench writing, roleplay,
humanities).

    python -m tide_sglang.bench.static prepare     # CPU machine: the workload snapshots the GPU machine reads
    python -m tide_sglang.bench.static train --registry DIR --out DIR [--device cuda] [...]

`train` generates greedy completions of the training prompts with the target (transformers, batched), captures
them as serving would (bench/traffic), trains with the trainer's own step on the device (keeping the weights that
scored best on the trainer's own held-out requests, scored every SCORE_EVERY steps), scores the draft on
the evaluation prompts' completions (generated rows only, as served acceptance), publishes it as the next
version of DIR (what `tide serve --registry` loads) and writes OUT/static-draft.json and OUT/eval-prompts.json
(the texts to serve it on). With `--stream-url URL [--stream-deployment NAME]` it trains instead on what a serving
engine captured into that Redis (SGLang with the plugin, sent the same "train" prompts: `scripts/gpu/sglang_run.py
--phases collect,static`), read to the end of the stream.
"""

import json
import math
import tempfile
import time
from pathlib import Path

import click
import torch
from pydantic import BaseModel

from tide_sglang.bench.traffic import capture, drain_into_trainer, generate, prompt_lengths, read_into_trainer
from tide_sglang.draft import DirectoryRegistry, DraftMetrics
from tide_sglang.draft.model import NOT_SAVED
from tide_sglang.draft.target import DEFAULT_TARGET, Target, load_target
from tide_sglang.settings import TideSettings
from tide_sglang.stream.server import LocalRedis
from tide_sglang.trainer import Acceptance, Chunk, DraftTrainer, SequenceAssembler, acceptance
from tide_sglang.workloads import Prompt, load_workload, split_of
from tide_sglang.workloads.registry import snapshot_workload

TRAIN_SEED, EVAL_SEED = 1000, 0
CHAT_SNAPSHOT = 8192  # ShareGPT opening turns snapshotted for the GPU machine: 4,022 English "train" ones
FOLLOW_UP_SNAPSHOT = 16384  # and later user turns, asked alone: 7,987 more (12,024 "train" prompts in all)
# Rows counted before the draft vocabulary is chosen (stream source): 16,384 entries need their tail counted.
STREAM_WARMUP_ROWS = 200_000
SCORE_EVERY = 500  # optimizer steps between scores on the trainer's own held-out requests (not the eval prompts)
WARMUP, LR_FLOOR = 0.02, 0.05  # share of the run at a rising learning rate; the last rate, as a share of the peak


class StaticPlan(BaseModel):
    requests: int = 1024  # training prompts (the 15 writing "train" prompts, then ShareGPT)
    max_new: int = 256
    steps: int = 3000
    seconds: float | None = None  # stop training earlier, after this long (a GPU call has a time limit)
    batch_sequences: int = 16
    vocab: int = 16384  # 8,192 rows left ~11 % of the evaluation's tokens out of reach (draftable by no step)
    lr: float = 1e-3  # the peak: a short warm-up, then cosine down to LR_FLOOR of it (cosine_lr)
    ttt_steps: int = 3  # the draft steps SGLang serves it at
    generate_batch: int = 256  # HF generate took ~105 ms a token step at 64 on the H200 (host-paced): go wider


def english(prompt: Prompt) -> bool:
    """ShareGPT is mostly English: keep the turns that are almost all ASCII."""
    return sum(c.isascii() for c in prompt.text) >= 0.95 * len(prompt.text)


def train_prompts(requests: int) -> list[Prompt]:
    """The 15 "train" writing prompts, then English "train" ShareGPT opening turns, then its later user turns
    (asked alone) once the opening turns run out; each text once."""
    writing = load_workload("writing", requests, TRAIN_SEED, split="train")
    need = max(requests - len(writing), 0)
    seen = {p.text for p in writing}
    chat: list[Prompt] = []
    # From the snapshots the GPU machine carries, not from pools that grow until they hold `need`: those could
    # outgrow the snapshots.
    for name, size in (("chat", CHAT_SNAPSHOT), ("chat-followups", FOLLOW_UP_SNAPSHOT)):
        if len(chat) >= need:
            break
        for p in load_workload(name, size, TRAIN_SEED):
            if split_of(p) == "train" and english(p) and p.text not in seen:
                seen.add(p.text)
                chat.append(p)
    if len(chat) < need:
        raise ValueError(f"{requests} train prompts asked; the chat workloads hold {len(chat) + len(writing)}")
    return writing + chat[:need]


def eval_prompts() -> list[Prompt]:
    return load_workload("writing", 64, EVAL_SEED, split="eval")


def _chunks(target: Target, texts: list[str], plan: StaticPlan, domain: str) -> tuple[list, list[Chunk]]:
    """Completions of `texts` as capture batches, and the same rows stitched into whole-request chunks."""
    sequences = generate(target, texts, plan.max_new, batch=plan.generate_batch)
    batches = capture(target, sequences, [f"{domain}-{i}" for i in range(len(texts))], prompt_lengths(target, texts),
                      domain=domain)
    asm = SequenceAssembler(chunk_len=max(s.numel() for s in sequences))
    return batches, [c for b in batches for c in asm.add(b)] + asm.flush()


def _settings(url: str, deployment: str, plan: StaticPlan, device: str, warmup_rows: int) -> TideSettings:
    # Every request's chunk stays in the recent window and none goes to the reservoir, so sampling is uniform over
    # all of them: the serving trainer's window + reservoir would keep a subset of a large collection and draw
    # half its batches from the newest 512 requests. A request longer than one chunk gives two, hence the 2x.
    return TideSettings(redis_url=url, deployment=deployment, train_device=device,
                        train_chunk_len=plan.max_new + 512, train_batch_chunks=plan.batch_sequences,
                        train_ttt_steps=plan.ttt_steps, train_lr=plan.lr, train_draft_vocab_size=plan.vocab,
                        train_vocab_warmup_rows=warmup_rows, train_heldout_fraction=0.01,
                        train_recent_chunks=2 * plan.requests, train_reservoir_chunks=0)


def cosine_lr(peak: float, progress: float) -> float:
    """The learning rate at `progress` (0..1) of a fixed run: linear warm-up over WARMUP, then a cosine from the
    peak down to LR_FLOOR x peak. An offline run knows its end, which the serving trainer's constant rate does
    not; the decay is what turns the last epochs into a finer draft instead of noise around one."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < WARMUP:
        return peak * max(progress / WARMUP, 0.01)
    cos = 0.5 * (1 + math.cos(math.pi * (progress - WARMUP) / (1 - WARMUP)))
    return peak * (LR_FLOOR + (1 - LR_FLOOR) * cos)


class _Best:
    """The draft's held-out curve over training, and its best weights so far: with a few thousand requests the draft
    memorises them (its training loss goes to ~0.01), and the curve says whether the last steps still helped."""

    def __init__(self, trainer: DraftTrainer, plan: StaticPlan) -> None:
        assert trainer.draft is not None and trainer.learner is not None
        self.draft, self.device, self.steps = trainer.draft, trainer.learner.device, plan.ttt_steps
        self.heldout = list(trainer.heldout)  # whole requests of the training stream that it never trains on
        self.curve: list[list[float]] = []  # [step, seconds, held-out accept length]
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.seconds = 0.0  # spent scoring

    def score(self, step: int, elapsed: float) -> None:
        if not self.heldout:
            return
        t0 = time.perf_counter()
        self.draft.eval()
        value = acceptance(self.draft, self.heldout, self.steps, device=self.device).accept_length
        self.draft.train()
        self.curve.append([step, round(elapsed, 1), value])
        if self.best is None or value > self.best[0]:
            weights = {k: v.detach().clone() for k, v in self.draft.state_dict().items() if k not in NOT_SAVED}
            self.best = (value, step, weights)
        self.seconds += time.perf_counter() - t0

    def restore(self) -> dict:
        """Load the best weights scored; what was scored, and where the best was."""
        if self.best is not None:
            self.draft.load_state_dict(self.best[2], strict=False)
        return {"heldout_curve": self.curve, "best_step": None if self.best is None else self.best[1],
                "train_heldout_rows": sum(c.length for c in self.heldout), "score_s": self.seconds}


def _fit(trainer: DraftTrainer, plan: StaticPlan) -> dict:
    """`plan.steps` optimizer steps (fewer when `plan.seconds` runs out); their count and seconds. The learning
    rate follows `cosine_lr` over whichever of the two ends comes first. Every SCORE_EVERY steps and at the end
    the draft is scored on the trainer's held-out requests, and the best-scoring weights are the ones kept."""
    assert trainer.draft is not None and trainer.learner is not None, \
        "the stream held too few rows to choose a draft vocabulary"
    groups = trainer.learner.optimizer.param_groups
    best = _Best(trainer, plan)
    start = time.perf_counter()
    step = 0
    while step < plan.steps:
        elapsed = (time.perf_counter() - start - best.seconds) / plan.seconds if plan.seconds else 0.0
        for group in groups:
            group["lr"] = cosine_lr(plan.lr, max(step / plan.steps, elapsed))
        step += 1
        stats = trainer.train_step()
        if step % SCORE_EVERY == 0:
            best.score(step, time.perf_counter() - start)
        if step % 250 == 0:  # the report waits for the device: the time below is the device's too
            click.echo(f"step {step}: loss {stats.report().loss:.3f}, "
                       f"{1000 * (time.perf_counter() - start - best.seconds) / step:.1f} ms/step")
            if plan.seconds is not None and time.perf_counter() - start - best.seconds > plan.seconds:
                break
    stats.report()
    steps_s = time.perf_counter() - start - best.seconds
    if not best.curve or best.curve[-1][0] != step:
        best.score(step, time.perf_counter() - start)
    return {"steps": step, "steps_s": steps_s, **best.restore()}


def _trained(target: Target, train: list[Prompt], plan: StaticPlan, device: str, work: Path,
             stream: tuple[str, str] | None) -> tuple[DraftTrainer, dict]:
    """The trainer fed from a stream and fitted. `stream` (Redis URL, deployment): read the captures a serving
    engine wrote there (SGLang with the plugin, sent the `train` prompts); None: generate them with the target
    (transformers) and write them to a local Redis first."""
    if stream is not None:
        url, deployment = stream
        trainer, drained = read_into_trainer(_settings(url, deployment, plan, device, STREAM_WARMUP_ROWS), work,
                                             target)
        timing = {"source": "stream", "generate_s": 0.0}
    else:
        t0 = time.perf_counter()
        batches, _ = _chunks(target, [p.text for p in train], plan, "train")
        timing = {"source": "generate", "generate_s": time.perf_counter() - t0}
        with LocalRedis() as server:
            rows = sum(b.num_tokens for b in batches)
            trainer, drained = drain_into_trainer(_settings(server.url, "static", plan, device, rows), batches,
                                                  work, target)
    return trainer, {**timing, "drain_s": drained, "rows": trainer.ingested_rows, **_fit(trainer, plan)}


def train_static(registry: Path, out: Path, device: str, plan: StaticPlan, target_name: str,
                 stream: tuple[str, str] | None = None) -> dict:
    cuda = device.startswith("cuda")
    target = load_target(target_name, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    train = train_prompts(plan.requests)
    with tempfile.TemporaryDirectory() as work:
        trainer, timing = _trained(target, train, plan, device, Path(work), stream)
    assert trainer.draft is not None and trainer.state is not None
    draft = trainer.draft.eval()
    evals = eval_prompts()
    _, heldout = _chunks(target, [p.text for p in evals], plan, "eval")
    score: Acceptance = acceptance(draft, heldout, plan.ttt_steps, device=device)
    manifest = DirectoryRegistry(registry, create=True).publish(draft.cpu(), metrics=DraftMetrics(
        accept_length=score.accept_length, heldout_tokens=score.rows, training_tokens=trainer.state.trained_rows,
        steps=trainer.state.steps, domains=dict(trainer.replay.added_rows)))
    result = {
        "version": manifest.version, "registry": str(registry), "device": device, "plan": plan.model_dump(),
        "train_prompts": len(train), "eval_prompts": len(evals), **timing,
        "ms_per_step": 1000 * timing["steps_s"] / timing["steps"], "epochs": trainer.state.trained_rows / max(
            trainer.replay.rows, 1),
        "heldout_accept_length": score.accept_length, "heldout_rows": score.rows, "step_rate": score.step_rate,
        "shared_prompts": len({p.text for p in train} & {p.text for p in evals}),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "static-draft.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "eval-prompts.json").write_text(json.dumps([p.model_dump() for p in evals], indent=2) + "\n")
    return result


@click.group()
def main() -> None:
    """A static draft for the GPU comparisons (docs/sglang.md)."""


SNAPSHOTS = (("writing", 64, TRAIN_SEED), ("writing", 64, EVAL_SEED), ("chat", CHAT_SNAPSHOT, TRAIN_SEED),
             ("chat-followups", FOLLOW_UP_SNAPSHOT, TRAIN_SEED))


@main.command()
def prepare() -> None:
    """On a machine with the workload packages: snapshot what `train` reads (into .cache/workloads)."""
    for name, limit, seed in SNAPSHOTS:
        click.echo(snapshot_workload(name, limit, seed))


@main.command("train")
@click.option("--registry", type=click.Path(path_type=Path), required=True, help="Registry to publish into.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for the JSON results.")
@click.option("--device", default="cuda", show_default=True)
@click.option("--target", default=DEFAULT_TARGET, show_default=True)
@click.option("--requests", type=int, default=StaticPlan().requests, show_default=True)
@click.option("--max-new", type=int, default=StaticPlan().max_new, show_default=True)
@click.option("--steps", type=int, default=StaticPlan().steps, show_default=True)
@click.option("--seconds", type=float, default=None, help="Stop training after this long (checked every 250 steps).")
@click.option("--stream-url", default=None,
              help="Train on what a serving engine captured into this Redis (sent the train prompts) instead of "
                   "generating with transformers.")
@click.option("--stream-deployment", default="static", show_default=True, help="The deployment whose stream to read.")
def train_command(registry: Path, out: Path, device: str, target: str, requests: int, max_new: int,
                  steps: int, seconds: float | None, stream_url: str | None, stream_deployment: str) -> None:
    """Train on "train" prompts, score on "eval" prompts, publish."""
    plan = StaticPlan(requests=requests, max_new=max_new, steps=steps, seconds=seconds)
    stream = (stream_url, stream_deployment) if stream_url else None
    result = train_static(registry, out, device, plan, target, stream)
    click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
