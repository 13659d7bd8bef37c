"""Which rows of a verify or an extend are captured: pure, vectorized functions, no SGLang, no Python loop over
rows (the prefill rule runs on the scheduler thread once per extend; the decode rule in the capture helper).

Decode (verify): request i owns rows [i*nd, i*nd + accept_lens[i]) of the verify output. Row j of it is the
target at position seq_lens[i] + j, and next_token_ids[i*nd + j] is the token it emitted there, which was
committed (drafts accepted, then the bonus token). With topk > 1 SGLang compacts the accepted path to the front
of each block before returning, so the same rule holds.

Prefill (extend): request i owns extend_lens[i] rows starting after the previous requests' rows, at positions
prefix_lens[i] + j. The token after row j is the next prompt token, and after the last row the token the target
sampled, known only when the request's prompt is complete (not a chunk of a chunked prefill).
"""

import numpy as np
import torch
import xxhash


def sampled(rid: str, rate: float) -> bool:
    """Per request, so a captured request's rows are all there (the trainer chains them by position)."""
    return rate >= 1.0 or xxhash.xxh3_64_intdigest(rid.encode()) / 2**64 < rate


def hard_enough(accept_lens: np.ndarray, nd: int, max_acceptance: float) -> np.ndarray:
    """TIDE's hard-example filter: False for requests the draft already predicts well (share of drafted tokens
    accepted above `max_acceptance`; the bonus token is not a draft)."""
    if nd <= 1:
        return np.ones(len(accept_lens), dtype=bool)
    return (accept_lens - 1) / (nd - 1) <= max_acceptance


def _ranks(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, j) per element of the concatenation of ranges [0, counts[k]): owner k and offset j."""
    owner = np.repeat(np.arange(len(counts)), counts)
    return owner, np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)


def decode_rows(accept_lens: np.ndarray, seq_lens: np.ndarray, nd: int,
                keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows into the [bs*nd] verify output, req_index into `keep`, positions) of the accepted tokens."""
    a = np.asarray(accept_lens)[keep]
    bad = (a < 1) | (a > nd)
    if bad.any():
        raise ValueError(f"accept lengths {a[bad].tolist()} are outside 1..{nd}")
    req, j = _ranks(a)
    return np.asarray(keep)[req] * nd + j, req, np.asarray(seq_lens)[keep][req] + j


def prefill_rows(extend_lens: list[int], prefix_lens: list[int],
                 complete: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows into the extend's hidden states, req_index, positions, token sources) of every request.

    A token source indexes the concatenation [input_ids (sum extend_lens), next_token_ids (bs)]: the next prompt
    token for every row but the last, the sampled token for the last row of a complete prompt (a chunk's last row
    has no known next token yet and is left out).
    """
    ext = torch.tensor(extend_lens, dtype=torch.long)
    starts = torch.cumsum(ext, 0) - ext
    n = (ext - (~torch.tensor(complete, dtype=torch.bool)).long()).clamp(min=0)
    req = torch.repeat_interleave(torch.arange(len(ext)), n)
    j = torch.arange(len(req)) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    row = starts[req] + j
    last = j == ext[req] - 1
    src = torch.where(last, int(ext.sum()) + req, row + 1)
    return row, req, torch.tensor(prefix_lens, dtype=torch.long)[req] + j, src
