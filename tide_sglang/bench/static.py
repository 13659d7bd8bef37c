"""A static draft worth serving: trained offline on "train" prompts, served by SGLang on "eval" prompts.

The GPU comparisons (controller, loop) need a draft SGLang accepts well on MT-Bench writing, trained on prompts
it is never evaluated on (workloads.split_of): ShareGPT's English opening turns plus the "train" side of the
writing workload; evaluated on the "eval" side of the writing workload (MT-Bench writing, roleplay,
humanities).

    python -m tide_sglang.bench.static prepare     # CPU machine: the workload snapshots the GPU machine reads
    python -m tide_sglang.bench.static train --registry DIR --out DIR [--device cuda] [...]

`train` generates greedy completions of the training prompts with the target (transformers, batched), captures
them as serving would (bench/traffic), trains with the trainer's own step on the device, scores the draft on
the evaluation prompts' completions (generated rows only, as served acceptance), publishes it as the next
version of DIR (what `tide serve --registry` loads) and writes OUT/static-draft.json and OUT/eval-prompts.json
(the texts to serve it on).
"""

import json
import tempfile
import time
from pathlib import Path

import click
import torch
from pydantic import BaseModel

from tide_sglang.bench.traffic import capture, drain_into_trainer, generate, prompt_lengths
from tide_sglang.draft import DirectoryRegistry, DraftMetrics
from tide_sglang.draft.target import DEFAULT_TARGET, Target, load_target
from tide_sglang.settings import TideSettings
from tide_sglang.stream.server import LocalRedis
from tide_sglang.trainer import Acceptance, Chunk, DraftTrainer, SequenceAssembler, acceptance
from tide_sglang.workloads import Prompt, load_workload
from tide_sglang.workloads.registry import snapshot_workload

TRAIN_SEED, EVAL_SEED = 1000, 0
CHAT_SNAPSHOT = 8192  # ShareGPT prompts snapshotted for the GPU machine: enough for 2,000 English "train" ones


class StaticPlan(BaseModel):
    requests: int = 1024  # training prompts (the 15 writing "train" prompts, then ShareGPT)
    max_new: int = 256
    steps: int = 3000
    seconds: float | None = None  # stop training earlier, after this long (a GPU call has a time limit)
    batch_sequences: int = 16
    vocab: int = 8192
    lr: float = 1e-3
    ttt_steps: int = 3  # the draft steps SGLang serves it at
    generate_batch: int = 256  # HF generate took ~105 ms a token step at 64 on the H200 (host-paced): go wider


def english(prompt: Prompt) -> bool:
    """ShareGPT is mostly English: keep the turns that are almost all ASCII."""
    return sum(c.isascii() for c in prompt.text) >= 0.95 * len(prompt.text)


def train_prompts(requests: int) -> list[Prompt]:
    writing = load_workload("writing", requests, TRAIN_SEED, split="train")
    chat = [p for p in load_workload("chat", 2 * requests, TRAIN_SEED, split="train") if english(p)]
    return writing + chat[: max(requests - len(writing), 0)]


def eval_prompts() -> list[Prompt]:
    return load_workload("writing", 64, EVAL_SEED, split="eval")


def _chunks(target: Target, texts: list[str], plan: StaticPlan, domain: str) -> tuple[list, list[Chunk]]:
    """Completions of `texts` as capture batches, and the same rows stitched into whole-request chunks."""
    sequences = generate(target, texts, plan.max_new, batch=plan.generate_batch)
    batches = capture(target, sequences, [f"{domain}-{i}" for i in range(len(texts))], prompt_lengths(target, texts),
                      domain=domain)
    asm = SequenceAssembler(chunk_len=max(s.numel() for s in sequences))
    return batches, [c for b in batches for c in asm.add(b)] + asm.flush()


def _train(target: Target, batches: list, plan: StaticPlan, device: str, work: Path) -> tuple[DraftTrainer, dict]:
    """The trainer fed from the stream, then `plan.steps` optimizer steps; also the seconds of each part."""
    rows = sum(b.num_tokens for b in batches)
    with LocalRedis() as server:
        settings = TideSettings(redis_url=server.url, deployment="static", train_device=device,
                                train_chunk_len=plan.max_new + 512, train_batch_chunks=plan.batch_sequences,
                                train_ttt_steps=plan.ttt_steps, train_lr=plan.lr, train_draft_vocab_size=plan.vocab,
                                train_vocab_warmup_rows=rows, train_heldout_fraction=0.01)
        trainer, drained = drain_into_trainer(settings, batches, work, target)
    assert trainer.draft is not None
    start = time.perf_counter()
    step = 0
    while step < plan.steps:
        step += 1
        stats = trainer.train_step()
        if step % 250 == 0:  # the report waits for the device: the time below is the device's too
            click.echo(f"step {step}: loss {stats.report().loss:.3f}, "
                       f"{1000 * (time.perf_counter() - start) / step:.1f} ms/step")
            if plan.seconds is not None and time.perf_counter() - start > plan.seconds:
                break
    stats.report()
    return trainer, {"drain_s": drained, "steps": step, "steps_s": time.perf_counter() - start, "rows": rows}


def train_static(registry: Path, out: Path, device: str, plan: StaticPlan, target_name: str) -> dict:
    cuda = device.startswith("cuda")
    target = load_target(target_name, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    t0 = time.perf_counter()
    train = train_prompts(plan.requests)
    batches, _ = _chunks(target, [p.text for p in train], plan, "train")
    generated_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as work:
        trainer, timing = _train(target, batches, plan, device, Path(work))
    assert trainer.draft is not None and trainer.state is not None
    draft = trainer.draft.eval()
    trained_s = time.perf_counter() - t0 - generated_s
    evals = eval_prompts()
    _, heldout = _chunks(target, [p.text for p in evals], plan, "eval")
    score: Acceptance = acceptance(draft, heldout, plan.ttt_steps, device=device)
    manifest = DirectoryRegistry(registry, create=True).publish(draft.cpu(), metrics=DraftMetrics(
        accept_length=score.accept_length, heldout_tokens=score.rows, training_tokens=trainer.state.trained_rows,
        steps=trainer.state.steps, domains=dict(trainer.replay.added_rows)))
    result = {
        "version": manifest.version, "registry": str(registry), "device": device, "plan": plan.model_dump(),
        "train_prompts": len(train), "eval_prompts": len(evals), "generate_s": generated_s, "train_s": trained_s,
        **timing, "ms_per_step": 1000 * timing["steps_s"] / timing["steps"],
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


SNAPSHOTS = (("writing", 64, TRAIN_SEED), ("writing", 64, EVAL_SEED), ("chat", CHAT_SNAPSHOT, TRAIN_SEED))


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
def train_command(registry: Path, out: Path, device: str, target: str, requests: int, max_new: int,
                  steps: int, seconds: float | None) -> None:
    """Train on "train" prompts, score on "eval" prompts, publish."""
    plan = StaticPlan(requests=requests, max_new=max_new, steps=steps, seconds=seconds)
    result = train_static(registry, out, device, plan, target)
    click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
