"""Helpers shared by tests (not fixtures)."""

import time
from collections.abc import Callable

import torch

from tide_sglang.capture import CaptureBatch
from tide_sglang.draft import DraftConfig, Eagle3Draft, init_draft, select_vocab
from tide_sglang.draft.target import Target, heads_of


def make_batch(n: int = 8, hidden: int = 16, k: int = 3, requests: int = 2, seed: int = 0,
               dtype: torch.dtype = torch.bfloat16, version: int = 0) -> CaptureBatch:
    g = torch.Generator().manual_seed(seed)
    req = torch.arange(n) * requests // max(n, 1)
    return CaptureBatch(
        rids=[f"req-{seed}-{i}" for i in range(requests)],
        req_index=req,
        positions=torch.arange(n) + 10,
        token_ids=torch.randint(0, 49152, (n,), generator=g),
        is_prompt=torch.arange(n) < n // 2,
        hidden=torch.randn(n, k * hidden, generator=g).to(dtype),
        vocab_size=49152,
        aux_layers=k,
        draft_version=version,
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll for an outcome instead of sleeping a fixed time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def untrained_draft(target: Target, seed: int = 0) -> Eagle3Draft:
    """A fresh EAGLE-3 draft over `target`'s heads, 512-token vocabulary, seeded."""
    torch.manual_seed(seed)
    heads = heads_of(target.model)
    config = DraftConfig.from_target(target.model.config, 512, target.aux_layer_ids)
    vocab = select_vocab(torch.arange(config.vocab_size).flip(0).float(), 512)
    return init_draft(config, vocab, heads.embed, heads.lm_head, heads.norm)
