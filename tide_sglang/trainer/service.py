"""`DraftTrainer`: the `tide train` service loop.

    StreamReader.read ─► SequenceAssembler ─► held-out (by request hash) | ReplayBuffer ─► ttt_loss ─► AdamW
    every eval interval: acceptance(candidate) vs acceptance(deployed) on the same held-out rows ─► gate ─► publish
    every checkpoint interval: flush open sequences, save state, then ack the entries it contains

A fresh lineage first counts token frequencies over `train_vocab_warmup_rows` captured rows, chooses the draft
vocabulary, and starts from the target's embedding/lm_head/norm; an existing lineage starts from the deployed
version (its vocabulary is fixed). The trainer never runs the target: everything comes from the stream.
"""

import copy
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import redis
import torch
import xxhash
from pydantic import BaseModel

from tide_sglang import rollout
from tide_sglang.capture import CaptureBatch
from tide_sglang.draft import DraftConfig, DraftMetrics, DraftRegistry, Eagle3Draft, init_draft, select_vocab
from tide_sglang.draft.target import TargetHeads, default_aux_layer_ids
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamEntry, StreamReader
from tide_sglang.trainer import distributed
from tide_sglang.trainer import state as ckpt
from tide_sglang.trainer.gate import GateDecision, publish_decision
from tide_sglang.trainer.metrics import TrainerMetrics
from tide_sglang.trainer.objective import Acceptance, LossReport, acceptance, ttt_loss
from tide_sglang.trainer.replay import Chunk, ReplayBuffer, SequenceAssembler, collate

log = logging.getLogger("tide.trainer")

DIST_SLICE_STEPS = 4  # optimizer steps between polls under torchrun (a fixed count keeps ranks in lockstep)


class TrainerError(RuntimeError):
    """The trainer cannot run with these settings; the message is one line that says what to change."""


class EvalReport(BaseModel):
    candidate: Acceptance
    deployed: Acceptance
    deployed_version: int | None
    decision: GateDecision
    published: int | None = None


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
        self.assembler = SequenceAssembler(settings.train_chunk_len, min_len=2)
        self.replay = ReplayBuffer(settings.train_recent_chunks, settings.train_reservoir_chunks, seed=seed)
        self.heldout: deque[Chunk] = deque(maxlen=settings.train_heldout_chunks)
        self.pending: list[StreamEntry] = []  # used but not acked: their rows live only in memory until a checkpoint
        self.counts = torch.zeros(heads.config.vocab_size)  # token frequencies, to choose a new lineage's vocabulary
        self.ingested_rows = 0
        self.skipped_rows = 0
        self.published: list[int] = []
        self.last_loss: LossReport | None = None
        self.draft: Eagle3Draft | None = None
        self.model: torch.nn.Module | None = None  # the draft, wrapped in DistributedDataParallel under torchrun
        self.optimizer: torch.optim.AdamW | None = None
        self.state: ckpt.TrainerState | None = None
        self._initial: Eagle3Draft | None = None  # the baseline of a fresh lineage, before its first version
        self._deployed: tuple[int, Eagle3Draft] | None = None
        self._parked = False
        self._start()

    # -- start: resume, continue the deployed lineage, or wait for a vocabulary -----------------------------

    def _start(self) -> None:
        lineage = self.registry.vocab_sha256()
        saved = ckpt.load_latest(self.checkpoint_dir) if self.checkpoint_dir else None
        if saved is not None:
            state, tensors = saved
            if lineage is not None and state.vocab_sha256 != lineage:
                raise TrainerError(
                    f"trainer checkpoint in {self.checkpoint_dir} has draft vocabulary "
                    f"{state.vocab_sha256[:12]} but the registry lineage has {lineage[:12]}: "
                    "the vocabulary is fixed within a lineage; use a new registry or remove the checkpoint")
            self._restore(state, tensors)
            return
        version = self._deployed_version()
        if version is None:
            return
        verified = self.registry.verify(version)
        self._check_lineage(verified.config)
        draft = self.registry.load(version, self.heads.embed).float()
        self._adopt(draft, parent=version)
        log.info("continuing lineage from deployed draft v%d", version)

    def _check_lineage(self, config: DraftConfig) -> None:
        wanted = self.s.train_draft_vocab_size
        if "train_draft_vocab_size" in self.s.model_fields_set and wanted != config.draft_vocab_size:
            raise TrainerError(
                f"TIDE_TRAIN_DRAFT_VOCAB_SIZE={wanted} but the deployed lineage in {self.registry.root} has "
                f"{config.draft_vocab_size}: the vocabulary is fixed within a lineage (SGLang bakes it into CUDA "
                "graphs); unset it, or start a new registry")
        if tuple(self.heads.embed.shape) != (config.vocab_size, config.hidden_size):
            raise TrainerError(
                f"target {self.s.target!r} has embedding {tuple(self.heads.embed.shape)} but the lineage's drafts "
                f"expect ({config.vocab_size}, {config.hidden_size}): wrong TIDE_TARGET for this registry")

    def _adopt(self, draft: Eagle3Draft, parent: int | None) -> None:
        self.draft = self.model = draft.to(self.device).train()
        if self.dist is not None:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(draft, device_ids=ids)  # broadcasts rank 0's
        self.optimizer = torch.optim.AdamW(
            [p for p in self.draft.parameters() if p.requires_grad], lr=self.s.train_lr,
            weight_decay=self.s.train_weight_decay)
        self.state = ckpt.TrainerState(parent=parent, config=draft.config, vocab_sha256=draft.vocab.sha256(),
                                       ingested_rows=self.ingested_rows)

    def _new_lineage(self) -> None:
        """Choose the vocabulary from the counted traffic and start from the target's heads."""
        cfg = self.heads.config
        size = min(self.s.train_draft_vocab_size, cfg.vocab_size)
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        counts = self.counts if self.dist is None else distributed.summed(self.counts, self.device)
        vocab = select_vocab(counts, size, always=[t for t in eos if t is not None])
        config = DraftConfig.from_target(cfg, size, default_aux_layer_ids(cfg.num_hidden_layers),
                                         torch_dtype="bfloat16")
        draft = init_draft(config, vocab, self.heads.embed, self.heads.lm_head, self.heads.norm)
        self._initial = copy.deepcopy(draft).eval()
        self._adopt(draft, parent=None)
        log.info("new lineage: draft vocabulary of %d tokens from %d captured rows", size, self.ingested_rows)

    # -- data ---------------------------------------------------------------------------------------------

    def poll(self) -> int:
        """Read one batch of stream entries into the buffers; returns how many entries were read."""
        entries = self.reader.read()
        for entry in entries:
            self._ingest(entry.batch)
        if self.checkpoint_dir is None:
            self.reader.ack(entries)  # nothing is durable without a checkpoint: do not let the pending list grow
        else:
            self.pending += entries
        if self.draft is None and self._counted_enough():
            self._new_lineage()
        return len(entries)

    def _counted_enough(self) -> bool:
        rows = torch.tensor([self.ingested_rows])
        total = rows if self.dist is None else distributed.summed(rows, self.device)
        return int(total) >= self.s.train_vocab_warmup_rows

    def _ingest(self, batch: CaptureBatch) -> None:
        width = self.draft.config.aux_layers * self.draft.config.target_hidden_size if self.draft else None
        if width is not None and batch.hidden.shape[1] != width:
            self.skipped_rows += batch.num_tokens
            log.error("skipping %d rows of width %d: the draft fuses K*H = %d", batch.num_tokens,
                      batch.hidden.shape[1], width)
            return
        self.ingested_rows += batch.num_tokens
        if self.draft is None:
            self.counts += torch.bincount(batch.token_ids, minlength=self.counts.numel()).float()
        for chunk in self.assembler.add(batch):
            self._store(chunk)

    def close_sequences(self) -> None:
        """Move every open (partial) request sequence into the buffers."""
        for chunk in self.assembler.flush():
            self._store(chunk)

    def _store(self, chunk: Chunk) -> None:
        # Whole requests are held out (by a hash of their id), so no held-out row was trained on.
        if xxhash.xxh3_64_intdigest(chunk.rid.encode()) % 10_000 < self.s.train_heldout_fraction * 10_000:
            self.heldout.append(chunk)
        else:
            self.replay.add(chunk)

    # -- training -----------------------------------------------------------------------------------------

    def train_step(self) -> LossReport:
        assert self.draft is not None and self.optimizer is not None and self.state is not None
        batch = collate(self.replay.sample(self.s.train_batch_chunks), self.device)
        # bf16 autocast on GPU (weights and AdamW stay fp32); plain fp32 on CPU.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss, report = ttt_loss(self.draft, batch, self.s.train_ttt_steps, model=self.model)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.draft.parameters(), 1.0)
        self.optimizer.step()
        self.state.steps += 1
        self.state.trained_rows += report.rows
        self.last_loss = report
        self.metrics.step(report.loss, report.rows)
        return report

    def evaluate(self) -> EvalReport:
        """Score the candidate and the deployed draft on the same held-out rows; publish when the gate says so."""
        assert self.draft is not None and self.state is not None
        chunks = list(self.heldout)
        steps = self.s.train_ttt_steps
        version, deployed = self._deployed_draft()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            cand = acceptance(self.draft.eval(), chunks, steps, device=self.device)
            base = acceptance(deployed, chunks, steps, device=self.device)
        self.draft.train()
        decision = publish_decision(cand, base, self.s.train_publish_margin, self.s.train_min_heldout_rows)
        report = EvalReport(candidate=cand, deployed=base, deployed_version=version, decision=decision)
        self.metrics.evaluation(cand.accept_length, base.accept_length, version)
        log.info("step %d: held-out acceptance %.3f vs deployed %s %.3f over %d rows: %s", self.state.steps,
                 cand.accept_length, version, base.accept_length, cand.rows, decision.reason)
        if decision.publish:
            report.published = self._publish(cand, base)
        return report

    def _publish(self, cand: Acceptance, base: Acceptance) -> int:
        assert self.draft is not None and self.state is not None
        metrics = DraftMetrics(accept_length=cand.accept_length, parent_accept_length=base.accept_length,
                               heldout_tokens=cand.rows, training_tokens=self.state.trained_rows,
                               steps=self.state.steps, domains=dict(self.replay.added_rows))
        manifest = self.registry.publish(self.draft, parent=self.state.parent, metrics=metrics)
        self.state.parent = manifest.version
        self.published.append(manifest.version)
        numbers = {k: float(v) for k, v in metrics.model_dump(exclude={"domains"}).items() if v is not None}
        rollout.append_event(self.reader.client, self.s.namespace, self.s.deployment,
                             rollout.Published(version=manifest.version, parent=manifest.parent, metrics=numbers))
        self.registry.gc(self.s.registry_keep_last, protect=self._rollout_versions())
        log.info("published draft v%d (parent %s)", manifest.version, manifest.parent)
        return manifest.version

    # -- the deployed version, from the operator's control hash -------------------------------------------

    def _control(self) -> rollout.ControlState | None:
        return rollout.read_control(self.reader.client, self.s.namespace, self.s.deployment)

    def _rollout_versions(self) -> set[int]:
        ctl = self._control()
        return set() if ctl is None else {v for v in (ctl.stable, ctl.canary) if v is not None}

    def _deployed_version(self) -> int | None:
        """The `stable` version the operator set, when this registry has it; else the newest version."""
        ctl = self._control()
        if ctl is not None and ctl.stable in self.registry.versions():
            return ctl.stable
        return self.registry.latest()

    def _deployed_draft(self) -> tuple[int | None, Eagle3Draft]:
        version = self._deployed_version()
        if version is None:
            assert self._initial is not None
            return None, self._initial.to(self.device)
        if self._deployed is None or self._deployed[0] != version:
            self._deployed = (version, self.registry.load(version, self.heads.embed, str(self.device)).float().eval())
        return self._deployed

    def _gate(self) -> bool:
        """train_gate=trigger: the control state's `train` (written by the operator) says whether to train."""
        if self.s.train_gate == "always":
            return True
        ctl = self._control()
        return ctl is None or ctl.train

    def park(self) -> None:
        """Not training: give the GPU back (weights and optimizer moments wait on the CPU)."""
        if self._parked or self.device.type != "cuda" or self.draft is None:
            return
        self._move("cpu")
        self._deployed = None
        torch.cuda.empty_cache()
        self._parked = True

    def unpark(self) -> None:
        if self._parked:
            self._move(self.device)
            self._parked = False

    def _move(self, device: torch.device | str) -> None:
        assert self.draft is not None and self.optimizer is not None
        self.draft.to(device)
        for st in self.optimizer.state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    st[k] = v.to(device)

    # -- checkpoint and resume ----------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Save everything the pending entries contributed, then ack them (see trainer/state.py)."""
        if self.draft is None or self.optimizer is None or self.state is None:
            return  # still counting tokens for the vocabulary: entries stay pending and are re-read on restart
        self.close_sequences()
        stored = [("heldout", c) for c in self.heldout] + [
            (store, c) for d in self.replay.domains.values()
            for store, cs in (("recent", d.recent), ("reservoir", d.reservoir)) for c in cs]
        self.state.chunks, tensors = ckpt.pack_chunks(stored)
        self.state.ingested_rows = self.ingested_rows
        self.state.domains_trained = dict(self.replay.added_rows)
        self.state.reservoir_seen = {k: d.seen_old for k, d in self.replay.domains.items()}
        opt = self.optimizer.state_dict()
        self.state.optimizer_groups = json.loads(json.dumps(opt["param_groups"]))
        for i, st in opt["state"].items():
            tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in st.items()})
        tensors.update({f"draft.{k}": v for k, v in self.draft.state_dict().items() if k != "embed_tokens.weight"})
        if self.state.parent is None and self._initial is not None:
            tensors.update({f"base.{k}": v for k, v in self._initial.state_dict().items()
                            if k != "embed_tokens.weight"})
        self.state.contained_ids = [e.id for e in self.pending]
        assert self.checkpoint_dir is not None
        ckpt.save(self.checkpoint_dir, self.state, tensors)
        self.reader.ack(self.pending)
        self.pending = []

    def _restore(self, state: ckpt.TrainerState, tensors: dict[str, torch.Tensor]) -> None:
        self._check_lineage(state.config)

        def draft_from(prefix: str) -> Eagle3Draft:
            weights = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            return Eagle3Draft.from_tensors(state.config, weights, self.heads.embed).float()

        self.ingested_rows = state.ingested_rows
        self._adopt(draft_from("draft."), state.parent)
        if "base.d2t" in tensors:
            self._initial = draft_from("base.").eval()
        assert self.optimizer is not None
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                opt_state.setdefault(int(i), {})[name] = v.to(self.device) if name != "step" else v
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state.optimizer_groups})
        self.state = state
        for store, chunk in ckpt.unpack_chunks(state.chunks, tensors):
            if store == "heldout":
                self.heldout.append(chunk)
            else:
                self.replay.put(chunk, reservoir=store == "reservoir")
        for domain, seen in state.reservoir_seen.items():
            self.replay.domains[domain].seen_old = seen
        self.replay.added_rows = dict(state.domains_trained)
        if state.contained_ids:  # a trainer killed between writing this checkpoint and acking: ack now, not re-read
            self.reader.client.xack(self.reader.stream, self.reader.group, *state.contained_ids)
        log.info("resumed at step %d from %s", state.steps, self.checkpoint_dir)

    # -- the service loop ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event, max_steps: int | None = None, slice_s: float = 0.5) -> None:
        """Poll, train between polls while the gate allows, evaluate, checkpoint; until stop (or max_steps).

        One process trains for `slice_s` between polls; under torchrun every rank trains the same fixed number
        of steps, so DDP's collectives line up."""
        next_checkpoint = time.monotonic() + self.s.train_checkpoint_interval_s
        while True:
            self.poll()
            self._stream_metrics()
            ready = self.draft is not None and len(self.replay) > 0 and self.should_train()
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
        try:
            self.metrics.stream(self.reader.lag(), self.reader.pending())
        except redis.RedisError as e:
            log.warning("cannot read the stream's lag: %s", e)

    def _train_slice(self, stop: threading.Event, max_steps: int | None, slice_s: float) -> None:
        assert self.state is not None
        self.unpark()
        until, steps = time.monotonic() + slice_s, 0
        while not stop.is_set() and (steps < DIST_SLICE_STEPS if self.dist else time.monotonic() < until):
            self.train_step()
            steps += 1
            if self.state.steps % self.s.train_eval_interval_steps == 0 and (self.dist is None or self.dist.main):
                self.evaluate()
            if max_steps is not None and self.state.steps >= max_steps:
                stop.set()
