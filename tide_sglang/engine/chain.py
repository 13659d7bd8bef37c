"""Pure pieces of chain speculation: greedy acceptance and the rows a verify commits."""

import torch


def greedy_accept(drafts: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Accepted draft tokens per request under temperature 0.

    drafts [B, g]: the draft's chain; target [B, g+1]: the target's argmax after [bonus, d1..dg].
    Draft j is accepted when it equals the target's token at j and every earlier draft was accepted.
    Returns [B] int64 in 0..g; the request emits target[:, :accepted + 1].
    """
    if drafts.shape[1] == 0:
        return torch.zeros(drafts.shape[0], dtype=torch.int64, device=drafts.device)
    return (drafts == target[:, :-1]).to(torch.int64).cumprod(dim=1).sum(dim=1)


def committed_rows(accepted: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] bool: rows 0..accepted[i] of each request were committed (the bonus row included)."""
    return torch.arange(width, device=accepted.device)[None] <= accepted[:, None]


def truncate_at_eos(tokens: list[int], eos: set[int], budget: int) -> list[int]:
    """Keep tokens up to and including the first EOS, and at most `budget` of them."""
    for i, t in enumerate(tokens[:budget]):
        if t in eos:
            return tokens[: i + 1]
    return tokens[:budget]
