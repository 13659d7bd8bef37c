"""The EAGLE-3 training-time-test loss, and the held-out acceptance length it is judged by.

Both read only captured rows: row t holds the target's state at position p and the token x_{p+1} it emitted, so
unroll step j at row t must predict x_{p+j+2} = tokens[t+j+1]. Greedy verification accepts draft token j only if
tokens 0..j-1 were accepted too, and teacher forcing (step j reads the true token) is exact on an accepted
prefix: acceptance is computed without running the target.
"""

import torch
import torch.nn.functional as F
from pydantic import BaseModel

from tide_sglang.draft import Eagle3Draft
from tide_sglang.trainer.replay import Chunk, TrainBatch, collate


class LossReport(BaseModel):
    loss: float
    step_accuracy: list[float]  # per unroll step: argmax == the target's token, over scored rows
    rows: int


def _targets(batch: TrainBatch, j: int, draft_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft-vocabulary targets for unroll step j [B, T] and where they count (row t+j+1 exists and is draftable)."""
    shift = j + 1
    tokens = F.pad(batch.tokens[:, shift:], (0, shift))  # [B, T]: tokens[t+j+1]
    present = F.pad(batch.valid[:, shift:], (0, shift))  # [B, T]
    target = draft_index[tokens]  # [B, T], -1 when the draft vocabulary lacks the token
    return target, present & (target >= 0)


def ttt_loss(draft: Eagle3Draft, batch: TrainBatch, steps: int, decay: float = 0.8,
             model: torch.nn.Module | None = None) -> tuple[torch.Tensor, LossReport]:
    """Sum over steps of decay^j x cross-entropy; tokens outside the draft vocabulary are not scored.

    `model`: the draft wrapped in DistributedDataParallel, whose forward (= `unroll`) syncs the gradients."""
    draft_index = draft.vocab.draft_index().to(batch.tokens.device)  # [V]
    logits = (model or draft)(batch.aux, batch.tokens, batch.positions, steps, batch.valid)
    loss = batch.aux.new_zeros((), dtype=torch.float32)
    accuracy = []
    for j, step_logits in enumerate(logits):
        target, mask = _targets(batch, j, draft_index)
        if not bool(mask.any()):
            accuracy.append(0.0)
            continue
        scored = step_logits[mask].float()  # [n, Vd]
        loss = loss + decay**j * F.cross_entropy(scored, target[mask])
        accuracy.append(float((scored.argmax(-1) == target[mask]).float().mean()))
    return loss, LossReport(loss=float(loss.detach()), step_accuracy=accuracy, rows=batch.rows)


class Acceptance(BaseModel):
    accept_length: float  # 1 + mean accepted draft tokens per verify step (SGLang's spec_accept_length)
    rows: int  # verify steps simulated: rows with a full chain of `steps` true tokens after them
    step_rate: list[float]  # P(draft token j accepted), chained


@torch.no_grad()
def acceptance(draft: Eagle3Draft, chunks: list[Chunk], steps: int, batch_size: int = 16,
               device: torch.device | str = "cpu") -> Acceptance:
    """Expected acceptance length of a chain of `steps` greedy draft tokens, started at every held-out row."""
    accepted = torch.zeros(steps)
    rows = 0
    dtype = draft.fc.weight.dtype
    for i in range(0, len(chunks), batch_size):
        batch = collate(chunks[i : i + batch_size], device, dtype)
        if batch.valid.shape[1] <= steps:
            continue  # no chunk long enough for a full chain (the shapes below assume one)
        logits = draft.unroll(batch.aux, batch.tokens, batch.positions, steps, batch.valid)
        # A chain started at row t needs tokens[t+1 .. t+steps] to exist, so it is counted in full.
        full = F.pad(batch.valid[:, steps:], (0, steps))  # [B, T]
        chain = torch.ones_like(full)
        for j, step_logits in enumerate(logits):
            proposed = draft.to_target_ids(step_logits.argmax(-1))  # [B, T] target ids
            truth = F.pad(batch.tokens[:, j + 1 :], (0, j + 1))  # [B, T]
            chain = chain & (proposed == truth)
            accepted[j] += float((chain & full).sum())
        rows += int(full.sum())
    rate = (accepted / max(rows, 1)).tolist()
    return Acceptance(accept_length=1.0 + sum(rate), rows=rows, step_rate=rate)
