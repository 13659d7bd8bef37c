"""Which rows of a verify or an extend are captured: pure functions over CPU lists and tensors, no SGLang.

Decode (verify): request i owns rows [i*nd, i*nd + accept_lens[i]) of the verify output. Row j of it is the
target at position seq_lens[i] + j, and next_token_ids[i*nd + j] is the token it emitted there, which was
committed (drafts accepted, then the bonus token). With topk > 1 SGLang compacts the accepted path to the front
of each block before returning, so the same rule holds.

Prefill (extend): request i owns extend_lens[i] rows starting after the previous requests' rows, at positions
prefix_lens[i] + j. The token after row j is the next prompt token, and after the last row the token the target
sampled, known only when the request's prompt is complete (not a chunk of a chunked prefill).
"""

import torch


def _long(xs: list[int]) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


def acceptance(accept_len: int, nd: int) -> float:
    """Share of drafted tokens the target accepted in one verify (the bonus token is not a draft)."""
    return 0.0 if nd <= 1 else (accept_len - 1) / (nd - 1)


def keep_requests(accept_lens: list[int], nd: int, committed: list[bool], sampled: list[bool],
                  max_acceptance: float) -> list[int]:
    """Requests whose rows go to the stream: committed, sampled, and hard enough (TIDE's hard-example filter
    skips requests the draft already predicts well: acceptance above `max_acceptance`)."""
    return [i for i, a in enumerate(accept_lens)
            if committed[i] and sampled[i] and acceptance(a, nd) <= max_acceptance]


def decode_rows(accept_lens: list[int], seq_lens: list[int], nd: int,
                keep: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows into the [bs*nd] verify output, req_index into `keep`, positions) of the accepted tokens."""
    rows, req, pos = [], [], []
    for k, i in enumerate(keep):
        a = accept_lens[i]
        if not 1 <= a <= nd:
            raise ValueError(f"accept length {a} of request {i} is outside 1..{nd}")
        rows.extend(range(i * nd, i * nd + a))
        req.extend([k] * a)
        pos.extend(range(seq_lens[i], seq_lens[i] + a))
    return _long(rows), _long(req), _long(pos)


def prefill_rows(extend_lens: list[int], prefix_lens: list[int], complete: list[bool],
                 keep: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows into the extend's hidden states, req_index into `keep`, positions, token sources).

    A token source indexes the concatenation [input_ids (sum extend_lens), next_token_ids (bs)]: the next prompt
    token for every row but the last, the sampled token for the last row of a complete prompt (a chunk's last row
    has no known next token yet and is left out).
    """
    starts = [sum(extend_lens[:i]) for i in range(len(extend_lens))]
    total = sum(extend_lens)
    rows, req, pos, src = [], [], [], []
    for k, i in enumerate(keep):
        n = extend_lens[i] if complete[i] else extend_lens[i] - 1
        for j in range(max(n, 0)):
            row = starts[i] + j
            rows.append(row)
            req.append(k)
            pos.append(prefix_lens[i] + j)
            src.append(row + 1 if j < extend_lens[i] - 1 else total + i)
    return _long(rows), _long(req), _long(pos), _long(src)
