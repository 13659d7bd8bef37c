"""`DraftTrainer`: the `tide train` service loop, composed of its jobs.

    StreamReader.read ─► Ingest (held-out by prompt hash | ReplayBuffer) ─► Learner.step (ttt_loss, AdamW)
    every eval interval: Publisher.evaluate(candidate, served) ─► gate ─► DraftRegistry.publish + Published event
    every loop: the control state (rollout) says whether to train and which served version to go back to
    every checkpoint interval: flush open sequences, save state, then ack the entries it contains

A lineage continues from the served version of the registry (version 0 is the imported draft: `tide import`),
its vocabulary fixed; an empty registry starts a new lineage once `train_vocab_warmup_rows` captured rows have
been counted to choose the vocabulary (lineage.py). The trainer never runs the target: everything comes from the
stream.
"""

import copy
import logging
import os
import threading
import time
from collections.abc import Callable

import torch

from tide_sglang import rollout
from tide_sglang.draft import DraftMetrics, DraftRegistry, Eagle3Draft
from tide_sglang.draft.target import TargetHeads
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamEntry, StreamReader
from tide_sglang.trainer import distributed, lineage
from tide_sglang.trainer import state as ckpt
from tide_sglang.trainer.ingest import Ingest
from tide_sglang.trainer.learner import Learner
from tide_sglang.trainer.lineage import TrainerError
from tide_sglang.trainer.metrics import TrainerMetrics
from tide_sglang.trainer.objective import LossStats
from tide_sglang.trainer.publisher import EvalReport, Publisher
from tide_sglang.trainer.replay import collate

log = logging.getLogger("tide.trainer")

DIST_SLICE_STEPS = 4  # optimizer steps between polls under torchrun (a fixed count keeps ranks in lockstep)
CONTROL_POLL_S = 1.0  # how often the control state is read


def lower_priority(nice: int) -> None:
    """Raise the calling thread's niceness to `nice` (never lower it). On Linux niceness is per thread, and threads
    started later (torch's) inherit it; a process sharing the training thread is not slowed."""
    current = os.nice(0)
    if nice > current:
        os.nice(nice - current)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainerError(f"TIDE_TRAIN_DEVICE={name} but no CUDA device is visible")
    return torch.device(name)


class DraftTrainer:
    def __init__(self, settings: TideSettings, registry: DraftRegistry, reader: StreamReader, heads: TargetHeads,
                 *, should_train: Callable[[], bool] | None = None, seed: int = 0,
                 dist: distributed.Dist | None = None) -> None:
        self.s, self.registry, self.reader, self.heads, self.dist = settings, registry, reader, heads, dist
        self.metrics = TrainerMetrics(settings.deployment)
        self._stream_metrics_at = 0.0
        self.device = resolve_device(settings.train_device)
        if dist is not None and self.device.type == "cuda":
            self.device = torch.device("cuda", dist.local_rank)
        self.checkpoint_dir = settings.train_checkpoint_dir
        if dist is not None and self.checkpoint_dir is not None:
            self.checkpoint_dir = self.checkpoint_dir / f"rank-{dist.rank}"  # each rank's own buffer and acks
        self.should_train = should_train or self._gate
        self.ingest = Ingest(settings, heads.config.vocab_size, seed=seed)
        self.publisher = Publisher(settings, registry, reader.client, heads.embed, self.device)
        self.pending: list[StreamEntry] = []  # used but not acked: their rows live only in memory until a checkpoint
        self.published: list[int] = []
        self.last_loss: LossStats | None = None
        self.learner: Learner | None = None
        self._initial: Eagle3Draft | None = None  # the baseline of a new lineage, before its first version
        self._ctl: tuple[float, rollout.ControlState | None] | None = None
        self._head_routed = False  # the head version was served (stable or canary) since it became the head
        self._judged: tuple[rollout.ControlState, int] | None = None  # what follow_rollbacks last looked at
        registry.remove_stale_tmp()
        self._start()

    # what tests, benchmarks and the CLI read
    draft = property(lambda self: None if self.learner is None else self.learner.draft)
    state = property(lambda self: None if self.learner is None else self.learner.state)
    replay = property(lambda self: self.ingest.replay)
    heldout = property(lambda self: self.ingest.heldout)
    ingested_rows = property(lambda self: self.ingest.rows)

    @property
    def ready(self) -> bool:
        """A step can be taken now: a draft to train, rows to train on, and the gate (control state) allows it."""
        return self.learner is not None and len(self.ingest.replay) > 0 and self.should_train()

    # -- start: resume, continue the served lineage, or wait for a vocabulary -----------------------------

    def _start(self) -> None:
        saved = ckpt.load_latest(self.checkpoint_dir) if self.checkpoint_dir else None
        if saved is not None:
            self._restore(*saved)
            return
        version = lineage.start_version(self.registry, self._control(fresh=True))
        if version is not None:
            self._continue_from(version)

    def _continue_from(self, version: int) -> None:
        verified, tensors = self.registry.load_tensors(version)
        lineage.check_lineage(self.s, self.heads, self.registry, verified.config)
        draft = Eagle3Draft.from_tensors(verified.config, tensors, self.heads.embed).float()
        self.learner = Learner(self.s, draft, version, self.device, self.dist, self.ingest.rows)
        self._head_routed = False
        log.info("training from served draft v%d", version)

    def _new_lineage(self) -> None:
        counts = self.ingest.counts if self.dist is None else distributed.summed(self.ingest.counts, self.device)
        draft = lineage.new_lineage_draft(self.s, self.heads, counts)
        self._initial = copy.deepcopy(draft).eval()
        self.learner = Learner(self.s, draft, None, self.device, self.dist, self.ingest.rows)
        log.info("new lineage: draft vocabulary of %d tokens from %d captured rows", draft.config.draft_vocab_size,
                 self.ingest.rows)

    # -- data ---------------------------------------------------------------------------------------------

    def poll(self, wait: bool = True) -> int:
        """Read one batch of stream entries into the buffers; returns how many entries were read. `wait`: wait up
        to the reader's block time for new entries when there are none."""
        entries = self.reader.read(wait)
        draft = self.draft
        width = draft.config.aux_layers * draft.config.target_hidden_size if draft is not None else None
        for entry in entries:
            self.ingest.add(entry.batch, width, count_tokens=draft is None)
        if self.checkpoint_dir is None:
            self.reader.ack(entries)  # nothing is durable without a checkpoint: do not let the pending list grow
        else:
            self.pending += entries
        if self.learner is None and self._counted_enough():
            self._new_lineage()
        return len(entries)

    def _counted_enough(self) -> bool:
        rows = torch.tensor([self.ingest.rows])
        total = rows if self.dist is None else distributed.summed(rows, self.device)
        return int(total) >= self.s.train_vocab_warmup_rows

    def close_sequences(self) -> None:
        self.ingest.close_sequences()

    # -- training, evaluation, publishing ------------------------------------------------------------------

    def train_step(self) -> LossStats:
        """One optimizer step; nothing waits for the device (the loss is read back at evaluation)."""
        assert self.learner is not None
        batch = collate(self.ingest.replay.sample(self.s.train_batch_chunks), self.device)
        stats = self.learner.step(batch)
        self.last_loss = stats
        self.metrics.step(stats.rows)
        return stats

    def evaluate(self) -> EvalReport:
        """Score the candidate and the served draft on the same held-out rows; publish when the gate says so."""
        assert self.learner is not None
        version = lineage.start_version(self.registry, self._control())
        if version is None:
            assert self._initial is not None
            served = self._initial.to(self.device)
        else:
            served = self.publisher.deployed(version)
        report = self.publisher.evaluate(self.learner.draft, served, version, list(self.ingest.heldout))
        cand, base, state = report.candidate, report.deployed, self.learner.state
        loss = self.last_loss.report().loss if self.last_loss is not None else float("nan")
        self.metrics.evaluation(cand.accept_length, base.accept_length, version, loss)
        log.info("step %d: held-out acceptance %.3f vs served %s %.3f over %d rows: %s", state.steps,
                 cand.accept_length, version, base.accept_length, cand.rows, report.decision.reason)
        if report.decision.publish:
            metrics = DraftMetrics(accept_length=cand.accept_length, parent_accept_length=base.accept_length,
                                   heldout_tokens=cand.rows, training_tokens=state.trained_rows, steps=state.steps,
                                   domains=dict(self.ingest.replay.added_rows))
            report.published = self.publisher.publish(self.learner.draft, state.parent, metrics)
            state.parent = report.published
            self.published.append(report.published)
            self._head_routed = False
        return report

    # -- the control state (operator) -----------------------------------------------------------------------

    def _control(self, fresh: bool = False) -> rollout.ControlState | None:
        """The control state, read at most every CONTROL_POLL_S; Redis down or a malformed hash: the last one."""
        now = time.monotonic()
        if fresh or self._ctl is None or now - self._ctl[0] >= CONTROL_POLL_S:
            try:
                self._ctl = (now, rollout.read_control(self.reader.client, self.s.namespace, self.s.deployment))
            except (*rollout.UNAVAILABLE, rollout.RolloutError) as e:
                log.warning("cannot read the control state: %s", e)
                self._ctl = (now, self._ctl[1] if self._ctl else None)
        return self._ctl[1]

    def _gate(self) -> bool:
        """train_gate=trigger: the control state's `train` (written by the operator) says whether to train."""
        if self.s.train_gate == "always":
            return True
        ctl = self._control()
        return ctl is None or ctl.train

    def follow_rollbacks(self) -> int | None:
        """Go back to the served version when the operator rolled the head back or pinned another version;
        returns the version re-adopted. Under torchrun rank 0 decides for every rank."""
        target = None
        if self.dist is None or self.dist.main:
            target = self._readopt_target()
        if self.dist is not None:
            target = distributed.broadcast_int(target, self.device)
        if target is not None:
            log.warning("the operator serves v%d, not this trainer's head v%s: training continues from v%d",
                        target, self.state.parent if self.state else None, target)
            self._continue_from(target)
            self.publisher.forget_deployed()
        return target

    def _readopt_target(self) -> int | None:
        ctl, head = self._control(), self.state.parent if self.state is not None else None
        if ctl is None or head is None or (ctl, head) == self._judged:
            return None  # nothing changed since the last look: no registry reads
        self._judged = (ctl, head)
        self._head_routed |= head in (ctl.stable, ctl.canary)
        target = lineage.version_to_readopt(head, lineage.ancestors(self.registry, head), self._head_routed, ctl)
        return target if target in self.registry.versions() else None

    def park(self) -> None:
        """Not training: give the GPU back."""
        if self.learner is not None and self.learner.park():
            self.publisher.forget_deployed()
            torch.cuda.empty_cache()

    # -- checkpoint and resume ----------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Save everything the pending entries contributed, then ack them (see trainer/state.py)."""
        if self.learner is None:
            return  # still counting tokens for the vocabulary: entries stay pending and are re-read on restart
        self.ingest.close_sequences()
        state = self.learner.state
        tensors = self.ingest.save_into(state) | self.learner.tensors()
        if state.parent is None and self._initial is not None:
            tensors.update({f"base.{k}": v for k, v in self._initial.state_dict().items()
                            if k != "embed_tokens.weight"})
        state.contained_ids = [e.id for e in self.pending]
        assert self.checkpoint_dir is not None
        ckpt.save(self.checkpoint_dir, state, tensors)
        self.reader.ack(self.pending)
        self.pending = []

    def _restore(self, state: ckpt.TrainerState, tensors: dict[str, torch.Tensor]) -> None:
        lineage_sha = self.registry.vocab_sha256()
        if lineage_sha is not None and state.vocab_sha256 != lineage_sha:
            raise TrainerError(
                f"trainer checkpoint in {self.checkpoint_dir} has draft vocabulary {state.vocab_sha256[:12]} but "
                f"the registry lineage has {lineage_sha[:12]}: the vocabulary is fixed within a lineage; use a new "
                "registry or remove the checkpoint")
        lineage.check_lineage(self.s, self.heads, self.registry, state.config)

        def draft_from(prefix: str) -> Eagle3Draft:
            weights = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            return Eagle3Draft.from_tensors(state.config, weights, self.heads.embed).float()

        self.learner = Learner(self.s, draft_from("draft."), state.parent, self.device, self.dist)
        if "base.d2t" in tensors:
            self._initial = draft_from("base.").eval()
        self.learner.load_optimizer(state, tensors)
        self.ingest.restore(state, tensors)
        if state.contained_ids:  # a trainer killed between writing this checkpoint and acking: ack now, not re-read
            self.reader.ack_ids(state.contained_ids)
        log.info("resumed at step %d from %s", state.steps, self.checkpoint_dir)

    # -- the service loop ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event, max_steps: int | None = None, slice_s: float = 0.5) -> None:
        """Poll, follow the control state, train between polls while the gate allows, evaluate, checkpoint;
        until stop (or max_steps). One process trains for `slice_s` between polls; under torchrun every rank
        trains the same fixed number of steps, so DDP's collectives line up. With rows to train on it never waits
        for new entries: its load on the machine does not depend on whether engines are capturing."""
        lower_priority(self.s.train_nice)
        next_checkpoint = time.monotonic() + self.s.train_checkpoint_interval_s
        while True:
            self.poll(wait=not self.ready)
            self.publisher.announce()
            self._stream_metrics()
            if self.learner is not None:
                self.follow_rollbacks()
            ready = self.ready
            running = not stop.is_set()
            if self.dist is not None:
                ready, running = distributed.agree([ready, running], self.device)
            if not running:
                break
            if ready:
                self._train_slice(stop, max_steps, slice_s)
            else:
                self.park()
            if time.monotonic() >= next_checkpoint and self.checkpoint_dir is not None:
                self.checkpoint()
                next_checkpoint = time.monotonic() + self.s.train_checkpoint_interval_s
        if self.checkpoint_dir is not None:
            self.checkpoint()

    def _stream_metrics(self, every_s: float = 5.0) -> None:
        if time.monotonic() - self._stream_metrics_at < every_s:
            return
        self._stream_metrics_at = time.monotonic()
        self.metrics.reader(self.reader.stats.dead_lettered, self.reader.stats.redis_errors)
        try:
            self.metrics.stream(self.reader.lag(), self.reader.pending())
        except rollout.UNAVAILABLE as e:
            log.warning("cannot read the stream's lag: %s", e)

    def _train_slice(self, stop: threading.Event, max_steps: int | None, slice_s: float) -> None:
        assert self.learner is not None
        state, until = self.learner.state, time.monotonic() + slice_s

        def more(steps: int) -> bool:
            if max_steps is not None and state.steps >= max_steps:
                stop.set()
            if stop.is_set():
                return False
            return steps < DIST_SLICE_STEPS if self.dist else time.monotonic() < until

        self.train_slice(more)

    def train_slice(self, more: Callable[[int], bool]) -> int:
        """Optimizer steps while `more(steps taken so far)`, with a publish decision every eval interval;
        returns the steps taken (`run` slices by time; a lockstep driver, `tide bench train-gate`, by count)."""
        assert self.learner is not None
        self.learner.unpark()
        state, steps = self.learner.state, 0
        while more(steps):
            self.train_step()
            steps += 1
            if state.steps % self.s.train_eval_interval_steps == 0 and (self.dist is None or self.dist.main):
                self.evaluate()
        return steps
