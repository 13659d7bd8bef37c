"""The EAGLE-3 training-time-test loss, and the held-out acceptance length it is judged by.

Both read only captured rows: row t holds the target's state at position p and the token x_{p+1} after it, so
unroll step j at row t must predict x_{p+j+2} = tokens[t+j+1]. Greedy verification accepts draft token j only if
tokens 0..j-1 were accepted too, and teacher forcing (step j reads the true token) is exact on an accepted
prefix: acceptance is computed without running the target.

Both count only the chains serving drafts (`drafted_after`): after a token the target emitted. Inside a prompt the
next tokens are the user's, not what the target would emit, so they are neither training labels nor scored.

Nothing here waits for the device: masks weight the loss instead of selecting rows (a boolean index needs the
row count on the host), and figures stay tensors until someone reads them (`LossStats.report`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel

from tide_sglang.draft import Eagle3Draft
from tide_sglang.trainer.replay import Chunk, TrainBatch, collate


class LossReport(BaseModel):
    loss: float
    step_accuracy: list[float]  # per unroll step: argmax == the target's token, over scored rows
    rows: int


@dataclass(frozen=True)
class LossStats:
    """One step's figures, still on the training device; `report()` reads them back (one sync), so a trainer
    calls it only at its log and eval intervals."""

    loss: torch.Tensor  # [] detached
    correct: torch.Tensor  # [steps] scored rows whose argmax was the target's token
    scored: torch.Tensor  # [steps] rows scored
    rows: int  # training rows in the batch, counted on the host

    def report(self) -> LossReport:
        accuracy = (self.correct / self.scored.clamp(min=1)).tolist()
        return LossReport(loss=float(self.loss), step_accuracy=accuracy, rows=self.rows)


def drafted_after(batch: TrainBatch) -> torch.Tensor:
    """[B, T] rows after which serving drafts a chain: the row's token was emitted by the target, so the next row
    is a generated one. The last prompt row counts (its token is the first generated one: SGLang drafts right after
    the prefill); rows inside a prompt do not (their token is the user's next one, never a draft's context)."""
    return F.pad(batch.valid[:, 1:] & ~batch.prompt[:, 1:], (0, 1))


def _targets(batch: TrainBatch, j: int, draft_index: torch.Tensor,
             starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft-vocabulary targets for unroll step j [B, T] and where they count: the chain starts where serving
    drafts (`starts`, [B, T]), row t+j+1 exists and its token is in the draft vocabulary."""
    shift = min(j + 1, batch.tokens.shape[1])  # a batch shorter than the unroll scores nothing at this step
    tokens = F.pad(batch.tokens[:, shift:], (0, shift))  # [B, T]: tokens[t+j+1]
    present = F.pad(batch.valid[:, shift:], (0, shift))  # [B, T]
    target = draft_index[tokens]  # [B, T], -1 when the draft vocabulary lacks the token
    return target, starts & present & (target >= 0)


def ttt_loss(draft: Eagle3Draft, batch: TrainBatch, steps: int, decay: float = 0.8,
             model: torch.nn.Module | None = None) -> tuple[torch.Tensor, LossStats]:
    """Sum over steps of decay^j x cross-entropy over the chains serving drafts; tokens outside the draft
    vocabulary are not scored.

    `model`: the draft wrapped in DistributedDataParallel, whose forward (= `unroll`) syncs the gradients."""
    draft_index = draft.draft_index()  # [V], on the draft's device
    logits = (model or draft)(batch.aux, batch.tokens, batch.positions, steps, batch.valid)
    loss = batch.aux.new_zeros((), dtype=torch.float32)
    correct, scored = [], []
    starts = drafted_after(batch)
    for j, step_logits in enumerate(logits):
        target, mask = _targets(batch, j, draft_index, starts)
        weight = mask.float()  # [B, T]
        n = weight.sum()
        # Rows flattened, classes last: over [B, V, T] CUDA runs its spatial softmax, which took 66 % of an H200
        # step's device time (the step took half as long after this change).
        ce = F.cross_entropy(step_logits.flatten(0, 1).float(), target.flatten().clamp(min=0),
                             reduction="none").view_as(target)  # [B, T]
        loss = loss + decay**j * (ce * weight).sum() / n.clamp(min=1)  # a step with no scored row adds 0
        correct.append(((step_logits.argmax(-1) == target) & mask).sum())
        scored.append(n)
    return loss, LossStats(loss=loss.detach(), correct=torch.stack(correct).float(), scored=torch.stack(scored),
                           rows=batch.rows)


def new_optimizer(draft: Eagle3Draft, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; fused (one kernel for all of them) when the draft is on CUDA."""
    params = [p for p in draft.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=params[0].device.type == "cuda")


def optimizer_step(draft: Eagle3Draft, optimizer: torch.optim.Optimizer, batch: TrainBatch, steps: int,
                   model: torch.nn.Module | None = None) -> LossStats:
    """One step, queued on the device without waiting for it: bf16 autocast on CUDA (weights and AdamW moments
    stay fp32), plain fp32 on the CPU, gradients clipped at norm 1.0."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch.aux.device.type == "cuda"):
        loss, stats = ttt_loss(draft, batch, steps, model=model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
    optimizer.step()
    return stats


class Acceptance(BaseModel):
    accept_length: float  # 1 + mean accepted draft tokens per verify step (SGLang's spec_accept_length)
    rows: int  # verify steps simulated: generated rows with a full chain of `steps` true tokens after them
    step_rate: list[float]  # P(draft token j accepted), chained


@torch.no_grad()
def acceptance(draft: Eagle3Draft, chunks: list[Chunk], steps: int, batch_size: int = 16,
               device: torch.device | str = "cpu") -> Acceptance:
    """Expected acceptance length of a chain of `steps` greedy draft tokens, started at every held-out row serving
    drafts after (`drafted_after`: after every token the target emitted), so it reads like served acceptance."""
    accepted = torch.zeros(steps, device=device)
    rows = torch.zeros((), dtype=torch.int64, device=device)
    dtype = draft.fc.weight.dtype
    for i in range(0, len(chunks), batch_size):
        batch = collate(chunks[i : i + batch_size], device, dtype)
        if batch.valid.shape[1] <= steps:
            continue  # no chunk long enough for a full chain (the shapes below assume one)
        logits = draft.unroll(batch.aux, batch.tokens, batch.positions, steps, batch.valid)
        # A chain started at row t needs tokens[t+1 .. t+steps] to exist, so it is counted in full.
        full = F.pad(batch.valid[:, steps:], (0, steps)) & drafted_after(batch)  # [B, T]
        chain = torch.ones_like(full)
        for j, step_logits in enumerate(logits):
            proposed = draft.to_target_ids(step_logits.argmax(-1))  # [B, T] target ids
            truth = F.pad(batch.tokens[:, j + 1 :], (0, j + 1))  # [B, T]
            chain = chain & (proposed == truth)
            accepted[j] += (chain & full).sum()
        rows += full.sum()
    total = int(rows)  # the one sync of an evaluation
    rate = (accepted / max(total, 1)).tolist()
    return Acceptance(accept_length=1.0 + sum(rate), rows=total, step_rate=rate)
