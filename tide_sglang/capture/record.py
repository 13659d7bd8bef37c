"""`CaptureBatch`: the accepted rows of one verify step, as the SGLang plugin and the reference engine emit them.

Row r means: the target ran token x_p at position p = positions[r] of request rids[req_index[r]], produced the
EAGLE-3 aux hidden states hidden[r] (K layers concatenated, [K*H]) and emitted token_ids[r] = x_{p+1}, which
was accepted. Rows of one request are in position order, so a trainer can chain them into sequences.
is_prompt[r] says whether x_p was a prompt token (a prefill row) or a generated one (an accepted decode row).
"""

import re
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

HIDDEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEFAULT_DOMAIN = "default"  # the domain of every row of an untagged batch (domains=None)
MAX_POSITION = 1 << 31  # positions travel as int32; the trainer sorts rows by req_index * 2**40 + position
DOMAIN_MAX = 64
# What a client may send as a request's domain (docs/sglang.md, "Domains"): a short label, so a per-domain replay
# buffer, a manifest's row counts and a log line never carry free text.
_DOMAIN_LABEL = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{DOMAIN_MAX - 1}}}")

Domain = Annotated[str, Field(max_length=DOMAIN_MAX)]


def is_domain_label(text: str) -> bool:
    """1-64 characters of [A-Za-z0-9_.-], starting with a letter or digit."""
    return _DOMAIN_LABEL.fullmatch(text) is not None


class CaptureBatch(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, extra="forbid")

    rids: list[str] = Field(description="request ids, one per request in the batch")
    req_index: torch.Tensor = Field(description="[n] int, row -> index into rids")
    positions: torch.Tensor = Field(description="[n] int, position of the token the hidden state is for")
    token_ids: torch.Tensor = Field(description="[n] int, the accepted token the target emitted after it")
    is_prompt: torch.Tensor = Field(description="[n] bool, True for a prompt (prefill) row, False for a generated "
                                    "(accepted decode) row")
    hidden: torch.Tensor = Field(description="[n, K*H] aux hidden states, bf16/fp16/fp32, on the CPU")
    vocab_size: int = Field(ge=1, description="the target's vocabulary size: every token id is below it")
    aux_layers: int = Field(3, ge=1, le=16, description="K: EAGLE-3 fuses K target layers (3 by default)")
    draft_version: int = Field(0, ge=0, description="draft version that was serving when captured")
    domains: list[Domain] | None = Field(None, description="per request (one per rid): workload tag for per-domain "
                                         f"replay; None: every row is in domain {DEFAULT_DOMAIN!r}")
    acceptance: list[float] | None = Field(None, description="per request: accepted tokens this step")

    @model_validator(mode="after")
    def _shapes(self) -> "CaptureBatch":
        n = self.hidden.shape[0] if self.hidden.dim() == 2 else -1
        if n < 0:
            raise ValueError(f"hidden must be [n, K*H], got shape {tuple(self.hidden.shape)}")
        if self.hidden.dtype not in HIDDEN_DTYPES:
            raise ValueError(f"hidden dtype {self.hidden.dtype} is not one of bf16/fp16/fp32")
        if self.hidden.shape[1] % self.aux_layers:
            raise ValueError(f"hidden width {self.hidden.shape[1]} is not a multiple of K={self.aux_layers}")
        for name in ("req_index", "positions", "token_ids"):
            t = getattr(self, name)
            if t.shape != (n,) or t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor of shape [{n}], got {t.dtype} {tuple(t.shape)}")
        if self.is_prompt.shape != (n,) or self.is_prompt.dtype != torch.bool:
            raise ValueError(f"is_prompt must be a bool tensor of shape [{n}], got {self.is_prompt.dtype} "
                             f"{tuple(self.is_prompt.shape)}")
        _bounded("token_ids", self.token_ids, 0, self.vocab_size)
        _bounded("positions", self.positions, 0, MAX_POSITION)
        _bounded("req_index", self.req_index, 0, len(self.rids))
        for name in ("domains", "acceptance"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.rids):
                raise ValueError(f"{name} has {len(values)} values for {len(self.rids)} requests")
        return self

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0]

    @property
    def hidden_size(self) -> int:
        """H, the target's hidden size."""
        return self.hidden.shape[1] // self.aux_layers

    def domain_of(self, request: int) -> str:
        """The domain of request `request` (an index into rids)."""
        return DEFAULT_DOMAIN if self.domains is None else self.domains[request]


def _bounded(name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Every value of t in [low, high): checked before anything indexes with it."""
    if not t.numel():
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi >= high:
        raise ValueError(f"{name} must be in [{low}, {high}), got values from {lo} to {hi}")
