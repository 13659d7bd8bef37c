"""The draft vocabulary: the target tokens the draft's lm_head can propose, and its `d2t`/`t2d` maps.

EAGLE-3 checkpoints store `d2t[i] = target_id - i` for draft id i (SGLang turns it into `hot_token_id =
d2t + arange`) and `t2d[v] = True` when target token v is in the draft vocabulary. SGLang bakes `hot_token_id`
into the draft's CUDA graphs, so a vocabulary is chosen once per lineage and never changed by a hot swap.
"""

import hashlib

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


class DraftVocab(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, extra="forbid")

    token_ids: torch.Tensor = Field(description="[Vd] int64, ascending target ids; draft id i -> token_ids[i]")
    vocab_size: int = Field(gt=0, description="V, the target's vocabulary size")

    @model_validator(mode="after")
    def _check(self) -> "DraftVocab":
        ids = self.token_ids
        if ids.dim() != 1 or ids.dtype != torch.int64 or ids.numel() == 0:
            raise ValueError(f"token_ids must be a non-empty int64 vector, got {ids.dtype} {tuple(ids.shape)}")
        if bool((ids[1:] <= ids[:-1]).any()) or int(ids[0]) < 0 or int(ids[-1]) >= self.vocab_size:
            raise ValueError(f"token_ids must be strictly ascending ids in [0, {self.vocab_size})")
        return self

    @property
    def size(self) -> int:
        return self.token_ids.numel()

    @property
    def d2t(self) -> torch.Tensor:
        return self.token_ids - torch.arange(self.size)  # [Vd] int64

    @property
    def t2d(self) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)  # [V]
        mask[self.token_ids] = True
        return mask

    def draft_index(self) -> torch.Tensor:
        """[V] int64: the draft id of each target token, -1 where the draft cannot propose it."""
        index = torch.full((self.vocab_size,), -1, dtype=torch.int64)
        index[self.token_ids] = torch.arange(self.size)
        return index

    def sha256(self) -> str:
        """Identity of the vocabulary: versions of one lineage must all carry the same hash."""
        return hashlib.sha256(self.token_ids.numpy().astype("<i8").tobytes()).hexdigest()

    @classmethod
    def from_d2t(cls, d2t: torch.Tensor, vocab_size: int) -> "DraftVocab":
        return cls(token_ids=d2t.to(torch.int64) + torch.arange(d2t.numel()), vocab_size=vocab_size)


def select_vocab(counts: torch.Tensor, size: int, always: list[int] | None = None) -> DraftVocab:
    """The `size` most frequent target tokens (ties to the lower id), plus `always` (e.g. EOS).

    counts: [V] how often each target token was emitted in captured traffic.
    """
    vocab_size = counts.numel()
    size = min(size, vocab_size)
    keep = torch.zeros(vocab_size, dtype=torch.bool)
    if always:
        keep[torch.tensor(always, dtype=torch.int64)] = True
    # Stable sort on -count keeps lower ids first among equal counts, so the choice is deterministic.
    order = torch.sort(-counts.to(torch.float64), stable=True).indices  # [V]
    need = max(size - int(keep.sum()), 0)
    keep[order[~keep[order]][:need]] = True
    return DraftVocab(token_ids=keep.nonzero().squeeze(1), vocab_size=vocab_size)
