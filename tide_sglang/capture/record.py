"""`CaptureBatch`: the accepted rows of one verify step, as the SGLang plugin and the reference engine emit them.

Row r means: the target ran token x_p at position p = positions[r] of request rids[req_index[r]], produced the
EAGLE-3 aux hidden states hidden[r] (K layers concatenated, [K*H]) and emitted token_ids[r] = x_{p+1}, which
was accepted. Rows of one request are in position order, so a trainer can chain them into sequences.
"""

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

HIDDEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class CaptureBatch(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, extra="forbid")

    rids: list[str] = Field(description="request ids, one per request in the batch")
    req_index: torch.Tensor = Field(description="[n] int, row -> index into rids")
    positions: torch.Tensor = Field(description="[n] int, position of the token the hidden state is for")
    token_ids: torch.Tensor = Field(description="[n] int, the accepted token the target emitted after it")
    hidden: torch.Tensor = Field(description="[n, K*H] aux hidden states, bf16/fp16/fp32, on the CPU")
    aux_layers: int = Field(3, ge=1, le=16, description="K: EAGLE-3 fuses K target layers (3 by default)")
    draft_version: int = Field(0, ge=0, description="draft version that was serving when captured")
    domain: str | None = Field(None, max_length=64, description="workload tag for per-domain replay")
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
            if t.shape != (n,) or t.dtype.is_floating_point:
                raise ValueError(f"{name} must be an integer tensor of shape [{n}], got {t.dtype} {tuple(t.shape)}")
        if self.acceptance is not None and len(self.acceptance) != len(self.rids):
            raise ValueError(f"acceptance has {len(self.acceptance)} values for {len(self.rids)} requests")
        return self

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0]

    @property
    def hidden_size(self) -> int:
        """H, the target's hidden size."""
        return self.hidden.shape[1] // self.aux_layers
