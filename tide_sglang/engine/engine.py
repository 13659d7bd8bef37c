"""`SpecEngine`: a reference EAGLE-3 speculative engine over a Hugging Face target, batched, greedy, lossless.

One wave of requests runs together (static batching; finished requests leave the batch). Each step:

    g      = controller.steps_for_batch(B)                    # 0: plain decode; the control state may force g
    extend : draft reads the rows committed since it last ran  # [B, T, K*H] aux + the tokens emitted after them
    chain  : d1..dg from the draft, fed its own hidden state   # [B, g]
    verify : target runs [bonus, d1..dg] at positions n..n+g   # one forward, [B, g+1] argmax
    accept : drafts equal to the target's argmax, in order     # emits target[:, :a+1]
    capture: the committed rows' aux hidden states -> CaptureBatch -> StreamWriter (exactly what the plugin sends)

Rejected rows stay in the target's KV cache but are masked out of attention forever (a 2-D mask with holes and
explicit positions), so no cache surgery is needed and the output equals target-only greedy decoding.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from pydantic import BaseModel
from transformers import DynamicCache

from tide_sglang.capture import CaptureBatch
from tide_sglang.draft import DraftCache, Eagle3Draft
from tide_sglang.draft.target import Target, aux_from_hidden_states
from tide_sglang.engine.chain import committed_rows, greedy_accept, truncate_at_eos
from tide_sglang.plugin.metrics import PluginMetrics
from tide_sglang.stream import StreamWriter


class StepController(Protocol):
    def steps_for_batch(self, batch_size: int) -> int: ...

    def observe(self, version: int, accepted_tokens: float, steps: float, draft_steps: int | None = None) -> None: ...

    def observe_step_time(self, batch_size: int, draft_steps: int, seconds: float) -> None: ...


class FixedSteps:
    """A fixed number of draft steps (0 = no speculation): the static baselines."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def steps_for_batch(self, batch_size: int) -> int:
        return self.steps

    def observe(self, version: int, accepted_tokens: float, steps: float, draft_steps: int | None = None) -> None:
        pass

    def observe_step_time(self, batch_size: int, draft_steps: int, seconds: float) -> None:
        pass


class StepStats(BaseModel):
    """One verify step, as the demo, the benchmarks and the Redis stats see it."""

    batch_size: int
    draft_steps: int
    emitted: int  # tokens committed to active requests (bonus included)
    accepted: int  # draft tokens accepted
    seconds: float
    draft_version: int
    domain: str | None = None

    def counts(self) -> dict[str, int]:
        """What the step adds to its version's stats hash (rollout.StatsReporter.add) and counters."""
        return {"tokens": self.batch_size * self.draft_steps, "accepted": self.accepted,
                "verify_steps": self.batch_size}


@dataclass
class _Rows:
    """Committed rows not yet read by the draft: aux [B, T, K*H], tokens [B, T], positions [B, T] (-1 pads)."""

    aux: torch.Tensor
    tokens: torch.Tensor
    positions: torch.Tensor


@dataclass
class _Wave:
    rids: list[str]
    domain: str | None
    max_new: int
    rows: torch.Tensor  # [B] index into rids of each live batch row
    out: list[list[int]]
    cache: DynamicCache
    mask: torch.Tensor  # [B, L] 1 where the target may attend
    next_pos: torch.Tensor  # [B] position of the bonus token
    bonus: torch.Tensor  # [B] last emitted token: the first input of the next verify
    pending: list[_Rows] = field(default_factory=list)
    draft_cache: DraftCache | None = None
    draft_out: tuple[torch.Tensor, torch.Tensor] | None = None  # last row's (hidden [B,1,H], first draft token [B])


class SpecEngine:
    def __init__(self, target: Target, *, draft: Eagle3Draft | None = None, draft_version: int = 0,
                 controller: StepController | None = None, writer: StreamWriter | None = None,
                 capture_prefill: bool = True, metrics: PluginMetrics | None = None) -> None:
        """`metrics`: count captures in the plugin's tide_* series, as an SGLang pod does (`tide engine`)."""
        self.target = target
        self.model = target.model
        self.device = next(self.model.parameters()).device
        self.draft, self.draft_version = draft, draft_version
        self.controller = controller or FixedSteps(0)
        self.writer, self.metrics = writer, metrics
        self.collect = True  # the control state's `collect`: off, nothing goes to the stream
        self.forced_steps: int | None = None  # the control state's forced steps (`tide profile`): wins over controller
        self.capture_prefill = capture_prefill
        eos = target.tokenizer.eos_token_id
        self.eos = {eos} if isinstance(eos, int) else set(eos or [])

    def set_draft(self, draft: Eagle3Draft | None, version: int) -> None:
        """Hot swap between steps: later drafting uses the new weights (the draft's KV cache is kept)."""
        self.draft, self.draft_version = draft, version

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, rids: list[str] | None = None,
                 domain: str | None = None, on_step: Callable[[StepStats], None] | None = None) -> list[list[int]]:
        """Greedy completions of token-id prompts; `on_step` sees every verify step (and may swap the draft)."""
        wave = self._prefill(prompts, max_new_tokens, rids or [f"req-{i}" for i in range(len(prompts))], domain)
        while len(wave.rows):
            stats = self._step(wave)
            if on_step is not None:
                on_step(stats)
        return wave.out

    # -- steps ---------------------------------------------------------------------------------------------------

    def _target(self, ids: torch.Tensor, positions: torch.Tensor, wave: _Wave) -> tuple[torch.Tensor, torch.Tensor]:
        """ids/positions [B, T] -> (argmax [B, T], aux [B, T, K*H]); appends T slots to the KV cache."""
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=wave.mask, past_key_values=wave.cache,
                         use_cache=True, output_hidden_states=True)
        return out.logits.argmax(-1), aux_from_hidden_states(out.hidden_states, self.target.aux_layer_ids)

    def _prefill(self, prompts: list[list[int]], max_new: int, rids: list[str], domain: str | None) -> _Wave:
        b, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(b, width, dtype=torch.int64)
        mask = torch.zeros(b, width, dtype=torch.int64)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column width-1
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
        wave = _Wave(rids=rids, domain=domain, max_new=max_new, rows=torch.arange(b), out=[[] for _ in range(b)],
                     cache=DynamicCache(), mask=mask, next_pos=mask.sum(-1), bonus=ids[:, -1])
        argmax, aux = self._target(ids, positions, wave)
        first = argmax[:, -1]  # [B]
        emitted = torch.cat([ids[:, 1:], first[:, None]], dim=1)  # [B, P]: the token after each prompt row
        rows = _Rows(aux=aux, tokens=emitted, positions=positions.masked_fill(mask == 0, -1))
        wave.pending.append(rows)
        if self.capture_prefill:
            self._capture(wave, rows, acceptance=None, prompt=True)
        wave.bonus = first
        self._commit(wave, first[:, None], torch.zeros(b, dtype=torch.int64, device=self.device))
        self._finish_rows(wave)
        return wave

    def _step(self, wave: _Wave) -> StepStats:
        t0 = time.perf_counter()
        b = len(wave.rows)
        g = 0 if self.draft is None else self.forced_steps if self.forced_steps is not None \
            else self.controller.steps_for_batch(b)
        drafts = self._draft_chain(wave, g) if g else torch.zeros(b, 0, dtype=torch.int64, device=self.device)
        ids = torch.cat([wave.bonus[:, None], drafts], dim=1)  # [B, g+1]
        positions = wave.next_pos[:, None] + torch.arange(g + 1, device=self.device)  # [B, g+1]
        wave.mask = torch.cat([wave.mask, torch.ones_like(ids)], dim=1)
        argmax, aux = self._target(ids, positions, wave)
        accepted = greedy_accept(drafts, argmax)  # [B]
        wave.mask[:, -(g + 1):] = committed_rows(accepted, g + 1).to(wave.mask.dtype)  # rejected: never attended
        kept = self._commit(wave, argmax, accepted)  # [B] <= accepted + 1: EOS or the budget may cut a request
        rows = _Rows(aux=aux, tokens=argmax, positions=positions.masked_fill(~committed_rows(kept - 1, g + 1), -1))
        wave.pending.append(rows)
        self._capture(wave, rows, acceptance=accepted, prompt=False)
        wave.bonus = argmax.gather(1, accepted[:, None]).squeeze(1)
        wave.next_pos = wave.next_pos + accepted + 1
        acc = int(accepted.sum())
        self.controller.observe(self.draft_version, acc, b, g)
        self._finish_rows(wave)
        seconds = time.perf_counter() - t0
        self.controller.observe_step_time(b, g, seconds)  # the online correction of the controller's cost model
        return StepStats(batch_size=b, draft_steps=g, emitted=int(kept.sum()), accepted=acc,
                         seconds=seconds, draft_version=self.draft_version, domain=wave.domain)

    def _draft_chain(self, wave: _Wave, g: int) -> torch.Tensor:
        """Extend the draft over pending rows, then draft g tokens: [B, g] target ids."""
        draft = self.draft
        assert draft is not None
        if wave.draft_cache is None:
            wave.draft_cache = draft.new_cache(len(wave.rows), int(wave.mask.shape[1]) + wave.max_new + 64)
        rows = _Rows(*(torch.cat([getattr(r, f) for r in wave.pending], dim=1) for f in ("aux", "tokens", "positions")))
        wave.pending.clear()
        out = draft.step(rows.aux, rows.tokens, rows.positions, wave.draft_cache)
        last = rows.positions.argmax(dim=1)  # [B] the newest committed row of each request
        row = torch.arange(len(last), device=last.device)
        hidden = out.hidden[row, last][:, None]  # [B, 1, H]
        token = draft.to_target_ids(out.logits[row, last].argmax(-1))  # [B]
        pos = rows.positions.max(dim=1).values + 1  # [B] position of the bonus token
        chain = [token]
        for _ in range(g - 1):
            out = draft.step(hidden, chain[-1][:, None], pos[:, None], wave.draft_cache)
            hidden, pos = out.hidden, pos + 1
            chain.append(draft.to_target_ids(out.logits[:, -1].argmax(-1)))
        return torch.stack(chain, dim=1)

    # -- bookkeeping ---------------------------------------------------------------------------------------------

    def _commit(self, wave: _Wave, tokens: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
        """Append emitted tokens [B, :a+1] to each live request, stopping at EOS or the token budget.

        Returns [B] how many tokens each request kept."""
        counts = []
        for row, (req, a) in enumerate(zip(wave.rows.tolist(), accepted.tolist(), strict=True)):
            out = wave.out[req]
            kept = truncate_at_eos(tokens[row, : a + 1].tolist(), self.eos, wave.max_new - len(out))
            out.extend(kept)
            counts.append(len(kept))
        return torch.tensor(counts, dtype=torch.int64, device=self.device)

    def _finish_rows(self, wave: _Wave) -> None:
        """Drop finished requests from the batch: target KV cache, masks, draft cache and pending rows."""
        live = [i for i, req in enumerate(wave.rows.tolist())
                if len(wave.out[req]) < wave.max_new and not (wave.out[req] and wave.out[req][-1] in self.eos)]
        if len(live) == len(wave.rows):
            return
        idx = torch.tensor(live, dtype=torch.int64, device=self.device)
        if live:
            wave.cache.batch_select_indices(idx)
        wave.rows, wave.mask = wave.rows[idx.cpu()], wave.mask[idx]
        wave.next_pos, wave.bonus = wave.next_pos[idx], wave.bonus[idx]
        wave.pending = [_Rows(r.aux[idx], r.tokens[idx], r.positions[idx]) for r in wave.pending]
        if wave.draft_cache is not None:
            c = wave.draft_cache
            c.k, c.v, c.filled = c.k[idx], c.v[idx], c.filled[idx]

    def _capture(self, wave: _Wave, rows: _Rows, acceptance: torch.Tensor | None, prompt: bool) -> None:
        """Send the committed rows of live requests, in bf16 as SGLang serves, to the stream; `prompt`: the rows
        are the prefill's (prompt tokens), else a verify step's accepted (generated) tokens."""
        if self.writer is None or not self.collect:
            return
        committed = rows.positions >= 0  # [B, T]
        b_idx, t_idx = committed.nonzero(as_tuple=True)
        if not len(b_idx):
            return
        batch = CaptureBatch(
            rids=[wave.rids[r] for r in wave.rows.tolist()],
            req_index=b_idx.cpu(),
            positions=rows.positions[b_idx, t_idx].cpu(),
            token_ids=rows.tokens[b_idx, t_idx].cpu(),
            is_prompt=torch.full((len(b_idx),), prompt),
            hidden=rows.aux[b_idx, t_idx].to(torch.bfloat16).cpu(),
            vocab_size=self.target.vocab_size,
            aux_layers=len(self.target.aux_layer_ids),
            draft_version=self.draft_version,
            domains=None if wave.domain is None else [wave.domain] * len(wave.rows),
            acceptance=None if acceptance is None else [float(a) for a in acceptance.tolist()],
        )
        submitted = self.writer.submit(batch)
        if self.metrics is not None:
            self.metrics.captured(batch, submitted)
