"""Trainer parts without Redis: sequence stitching, replay buffer, loss, acceptance counting, gate, checkpoint."""

from pathlib import Path

import pytest
import torch

from tests.test_draft import tiny_draft
from tide_sglang.capture import CaptureBatch
from tide_sglang.rollout import ControlState
from tide_sglang.trainer import (
    Acceptance,
    Chunk,
    ReplayBuffer,
    SequenceAssembler,
    acceptance,
    collate,
    new_optimizer,
    optimizer_step,
    publish_decision,
    ttt_loss,
)
from tide_sglang.trainer import state as ckpt
from tide_sglang.trainer.lineage import version_to_readopt
from tide_sglang.trainer.replay import held_out


def step_batch(rows: dict[str, list[int]], width: int = 6, domains: list[str] | None = None) -> CaptureBatch:
    """One verify step: request rid -> positions of its accepted rows (token = 1000 + position, hidden = position)."""
    rids = list(rows)
    req = torch.cat([torch.full((len(p),), i) for i, p in enumerate(rows.values())])
    pos = torch.cat([torch.tensor(p) for p in rows.values()])
    return CaptureBatch(rids=rids, req_index=req, positions=pos, token_ids=pos + 1000, is_prompt=pos < 2,
                        hidden=pos[:, None].float().expand(-1, width).contiguous(), vocab_size=2048, aux_layers=3,
                        domains=domains)


def test_assembler_stitches_requests_across_entries_and_cuts_chunks() -> None:
    asm = SequenceAssembler(chunk_len=4)
    assert asm.add(step_batch({"a": [0, 1, 2], "b": [7]})) == []
    done = asm.add(step_batch({"b": [8, 9], "a": [3, 4, 5, 6, 7, 8]}))
    assert [c.positions.tolist() for c in done] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert done[0].rid == "a" and done[0].tokens.tolist() == [1000, 1001, 1002, 1003]
    assert done[0].hidden[:, 0].tolist() == [0, 1, 2, 3]
    # a gap in b's positions closes its sequence; on flush, b's lone row after the gap is too short to keep
    assert [c.positions.tolist() for c in asm.add(step_batch({"b": [12], "a": [9]}))] == [[7, 8, 9]]
    assert [c.positions.tolist() for c in asm.flush()] == [[8, 9]] and asm.open_rows == 0


def test_assembler_tags_each_request_with_its_own_domain() -> None:
    asm = SequenceAssembler(chunk_len=2)
    done = asm.add(step_batch({"a": [0, 1], "b": [5, 6]}, domains=["writing", "french"]))
    done += asm.add(step_batch({"c": [0, 1]}))  # untagged
    assert [(c.rid, c.domain) for c in done] == [("a", "writing"), ("b", "french"), ("c", "default")]


def test_assembler_closes_least_recent_requests_beyond_max_open() -> None:
    asm = SequenceAssembler(chunk_len=8, max_open=2)
    asm.add(step_batch({"a": [0, 1]}))
    asm.add(step_batch({"b": [0, 1]}))
    done = asm.add(step_batch({"c": [0, 1]}))
    assert [c.rid for c in done] == ["a"]


def _chunk(i: int, domain: str) -> Chunk:
    return Chunk(hidden=torch.zeros(2, 6), tokens=torch.tensor([i, i]), positions=torch.arange(2),
                 is_prompt=torch.tensor([True, False]), prompt_key=f"k{i}", domain=domain)


def test_replay_keeps_recent_window_and_a_reservoir_and_samples_domains_evenly() -> None:
    buf = ReplayBuffer(recent=4, reservoir=8, seed=1)
    for i in range(200):
        buf.add(_chunk(i, "code"))
    for i in range(4):
        buf.add(_chunk(1000 + i, "french"))
    code = buf.domains["code"]
    assert [int(c.tokens[0]) for c in code.recent] == [196, 197, 198, 199]
    assert len(code.reservoir) == 8 and code.seen_old == 196
    old = [int(c.tokens[0]) for c in code.reservoir]
    assert min(old) < 100, "the reservoir keeps a sample of all older traffic, not just the latest"
    picks = [c.domain for c in buf.sample(400)]
    assert 150 < picks.count("french") < 250, "a rare domain is sampled as often as a frequent one"


@pytest.mark.parametrize(("cand", "base", "rows", "publish", "why"), [
    (1.30, 1.20, 500, True, "gain +0.100"),
    (1.22, 1.20, 500, False, "below margin"),
    (1.10, 1.20, 500, False, "below margin"),
    (2.00, 1.00, 10, False, "too small"),
])
def test_publish_gate(cand: float, base: float, rows: int, publish: bool, why: str) -> None:
    d = publish_decision(Acceptance(accept_length=cand, rows=rows, step_rate=[]),
                         Acceptance(accept_length=base, rows=rows, step_rate=[]), margin=0.05, min_rows=100)
    assert d.publish is publish and why in d.reason


def test_gate_refuses_different_held_out_rows() -> None:
    a, b = (Acceptance(accept_length=x, rows=r, step_rate=[]) for x, r in ((3.0, 500), (1.0, 400)))
    assert not publish_decision(a, b, 0.0, 1).publish


def test_acceptance_counts_the_chain_like_the_engine() -> None:
    """Compare against drafting with the KV cache row by row and checking tokens one at a time."""
    draft = tiny_draft(3)
    g = torch.Generator().manual_seed(0)
    tokens = draft.vocab.token_ids[torch.randint(0, 40, (9,), generator=g)]
    # rows 0, 1 are prompt rows: serving drafts first after row 1 (its token is the first generated one, SGLang
    # drafts right after the prefill), never after row 0 (inside the prompt)
    prompt = 2
    chunk = Chunk(hidden=torch.randn(9, 96, generator=g), tokens=tokens, positions=torch.arange(9),
                  is_prompt=torch.arange(9) < prompt)
    steps = 2
    # make the chain succeed sometimes: set the truth to the draft's own first proposal at some rows
    with torch.no_grad():
        logits = draft.unroll(chunk.hidden[None], tokens[None], chunk.positions[None], 1)[0]
        first = draft.to_target_ids(logits.argmax(-1))
    tokens[1::2] = first[0, :-1:2]
    got = acceptance(draft, [chunk], steps)
    accepted = []
    with torch.no_grad():
        for t in range(prompt - 1, 9 - steps):
            cache = draft.new_cache(1, 32)
            out = draft.step(chunk.hidden[None, : t + 1], tokens[None, : t + 1], torch.arange(t + 1)[None], cache)
            n, hidden = 0, out.hidden[:, -1:]
            for j in range(steps):
                proposed = int(draft.to_target_ids(out.logits[0, -1].argmax()))
                if proposed != int(tokens[t + j + 1]):
                    break
                n += 1
                out = draft.step(hidden, torch.tensor([[proposed]]), torch.tensor([[t + j + 1]]), cache)
                hidden = out.hidden
            accepted.append(n)
    assert got.rows == 9 - steps - (prompt - 1)
    assert got.accept_length == pytest.approx(1 + sum(accepted) / len(accepted))
    assert sum(accepted) > 0


def test_acceptance_skips_batches_of_chunks_too_short_for_a_chain() -> None:
    draft = tiny_draft(3)
    short = [Chunk(hidden=torch.randn(n, 96), tokens=draft.vocab.token_ids[:n], positions=torch.arange(n),
                   is_prompt=torch.zeros(n, dtype=torch.bool)) for n in (1, 2, 3)]
    assert acceptance(draft, short, 3, batch_size=2).rows == 0  # once raised on the shapes of a [B, 2] batch


def test_ttt_loss_trains_a_tiny_draft_to_higher_acceptance() -> None:
    torch.manual_seed(0)
    draft = tiny_draft(4)
    # a deterministic toy language: state i is followed by state perm[i]; row t emits the token of state t+1
    table = draft.vocab.token_ids[torch.randperm(40)[:8]]
    states, perm = torch.randn(8, 96), torch.randperm(8)
    chunks = []
    for start in range(12):
        idx = [start % 8]
        for _ in range(16):
            idx.append(int(perm[idx[-1]]))
        seq = torch.tensor(idx)
        chunks.append(Chunk(hidden=states[seq[:-1]], tokens=table[seq[1:]], positions=torch.arange(16),
                            is_prompt=torch.zeros(16, dtype=torch.bool)))
    before = acceptance(draft, chunks, 3).accept_length
    opt = new_optimizer(draft, lr=3e-3, weight_decay=0.0)
    for _ in range(60):
        stats = optimizer_step(draft, opt, collate(chunks[:8]), steps=3)
    assert stats.report().step_accuracy[0] > 0.5 and stats.rows == 8 * 16
    assert acceptance(draft, chunks, 3).accept_length > before + 0.3


def test_ttt_loss_equals_the_loss_over_selected_rows_in_value_and_gradient() -> None:
    """The mask-weighted loss (no host sync) against a plain reference that selects the scored rows."""
    import torch.nn.functional as F

    draft = tiny_draft(5)
    g = torch.Generator().manual_seed(1)
    chunks = [Chunk(hidden=torch.randn(n, 96, generator=g), positions=torch.arange(n),
                    tokens=torch.randint(0, 100, (n,), generator=g), is_prompt=torch.zeros(n, dtype=torch.bool))
              for n in (11, 7, 3)]  # padding, and tokens outside the 40-token draft vocabulary
    batch = collate(chunks)
    loss, stats = ttt_loss(draft, batch, steps=3)
    got = torch.autograd.grad(loss, draft.fc.weight)[0]

    index = draft.vocab.draft_index()
    logits = draft.unroll(batch.aux, batch.tokens, batch.positions, 3, batch.valid)
    want = torch.zeros(())
    for j, step_logits in enumerate(logits):
        target = index[F.pad(batch.tokens[:, j + 1 :], (0, j + 1))]
        mask = F.pad(batch.valid[:, j + 1 :], (0, j + 1)) & (target >= 0)
        if mask.any():
            want = want + 0.8**j * F.cross_entropy(step_logits[mask], target[mask])
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert torch.allclose(got, torch.autograd.grad(want, draft.fc.weight)[0], rtol=1e-4, atol=1e-7)
    assert stats.rows == 21 and stats.report().loss == pytest.approx(float(want), rel=1e-5)


def test_ttt_loss_scores_only_the_chains_serving_drafts() -> None:
    """Inside a prompt the next token is the user's, not the target's: no label there. The first chain serving
    drafts starts at the last prompt row (its token is the first generated one)."""
    draft = tiny_draft(7)
    tokens = draft.vocab.token_ids[torch.arange(11) % 40]  # all in the draft vocabulary
    chunk = Chunk(hidden=torch.randn(11, 96), tokens=tokens, positions=torch.arange(11),
                  is_prompt=torch.arange(11) < 5)  # rows 0-4 prompt, 5-10 generated
    _, stats = ttt_loss(draft, collate([chunk]), steps=3)
    # step j: chains starting at rows 4 .. 9 - j (row t + j + 1 must exist)
    assert stats.scored.tolist() == [6.0, 5.0, 4.0]


def test_ttt_loss_of_a_batch_shorter_than_the_unroll_scores_only_the_steps_it_can() -> None:
    draft = tiny_draft(6)
    tokens = draft.vocab.token_ids[:2]
    batch = collate([Chunk(hidden=torch.randn(2, 96), tokens=tokens, positions=torch.arange(2),
                           is_prompt=torch.zeros(2, dtype=torch.bool))])  # T = 2 rows, 3 unroll steps
    loss, stats = ttt_loss(draft, batch, steps=3)
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    assert stats.scored.tolist() == [1.0, 0.0, 0.0]  # only step 0 has a row with a token after it


def test_draft_index_on_the_device_equals_the_vocabularys() -> None:
    draft = tiny_draft(2)
    assert torch.equal(draft.draft_index(), draft.vocab.draft_index())


def test_requests_with_the_same_prompt_share_a_key_and_a_side_of_the_held_out_split() -> None:
    """Disjoint data in the trainer: a prompt sent by many requests (a cycled workload) is held out or trained
    on as a whole, so no held-out prompt is ever trained on."""
    asm = SequenceAssembler(chunk_len=4)
    prompts = {f"p{k}": [100 + 7 * k + i for i in range(5)] for k in range(40)}
    chunks: list[Chunk] = []
    for r in range(120):
        name = f"p{r % 40}"
        tokens = prompts[name] + [900 + r, 901 + r, 902 + r]  # 5 prompt rows, then 3 generated rows
        n = len(tokens)
        chunks += asm.add(CaptureBatch(
            rids=[f"req-{r}"], req_index=torch.zeros(n, dtype=torch.int64), positions=torch.arange(n),
            token_ids=torch.tensor(tokens), is_prompt=torch.arange(n) < 5, hidden=torch.zeros(n, 6),
            vocab_size=2048, aux_layers=3))
    chunks += asm.flush()
    side: dict[str, set[bool]] = {}
    keys: dict[str, set[str]] = {}
    for c in chunks:
        name = f"p{int(c.rid.split('-')[1]) % 40}"
        side.setdefault(name, set()).add(held_out(c, 0.3))
        keys.setdefault(name, set()).add(c.prompt_key)
    assert all(len(k) == 1 for k in keys.values()) and len({k for ks in keys.values() for k in ks}) == 40
    assert all(len(s) == 1 for s in side.values()), "a prompt is on one side of the split only"
    assert 0 < sum(True in s for s in side.values()) < 40


def test_checkpoint_chunks_round_trip(tmp_path: Path) -> None:
    stored = [("recent", _chunk(1, "a")), ("heldout", _chunk(2, "b"))]
    metas, tensors = ckpt.pack_chunks(stored)
    state = ckpt.TrainerState(config=tiny_draft().config, vocab_sha256="x", chunks=metas, steps=7)
    ckpt.save(tmp_path, state, tensors)
    ckpt.save(tmp_path, state.model_copy(update={"steps": 8}), tensors)
    assert len(list(tmp_path.iterdir())) == 1, "older checkpoints are removed once a newer one is complete"
    loaded, raw = ckpt.load_latest(tmp_path)
    back = ckpt.unpack_chunks(loaded.chunks, raw)
    assert loaded.steps == 8 and [(s, c.domain, c.prompt_key, c.tokens.tolist(), c.is_prompt.tolist())
                                  for s, c in back] == [("recent", "a", "k1", [1, 1], [True, False]),
                                                        ("heldout", "b", "k2", [2, 2], [True, False])]


def test_trainer_metrics_are_exposed_under_the_documented_names():
    from prometheus_client import generate_latest

    from tide_sglang.trainer.metrics import TrainerMetrics

    m = TrainerMetrics("chat")
    m.step(64)
    m.step(32)
    m.evaluation(candidate=1.9, deployed=1.7, deployed_version=None, loss=2.0)
    m.stream(lag=12, pending=3)
    m.reader(dead_lettered=2, redis_errors=5)
    m.reader(dead_lettered=3, redis_errors=5)
    text = generate_latest(m.registry).decode()
    assert 'tide_stream_dead_letters_total{deployment="chat"} 3.0' in text
    assert 'tide_trainer_redis_errors_total{deployment="chat"} 5.0' in text
    assert 'tide_trainer_loss{deployment="chat"} 2.0' in text
    assert 'tide_trainer_tokens_total{deployment="chat"} 96.0' in text
    assert 'tide_trainer_heldout_acceptance{deployment="chat",draft_version="0",model="candidate"} 1.9' in text
    assert 'tide_stream_lag_entries{deployment="chat"} 12.0' in text
    assert 'tide_stream_pending_entries{deployment="chat"} 3.0' in text


@pytest.mark.parametrize(("head", "ancestors", "was_routed", "ctl", "readopt"), [
    (3, {0, 1, 2}, False, None, None),  # no operator: keep training
    (3, {0, 1, 2}, False, ControlState(stable=2), None),  # v3 waits for its canary on top of the stable v2
    (3, {0, 1, 2}, False, ControlState(stable=2, canary=3, canary_pods=("p",)), None),  # v3 is the canary
    (3, {0, 1, 2}, True, ControlState(stable=3), None),  # promoted
    (3, {0, 1, 2}, True, ControlState(stable=2), 2),  # canaried, then rolled back
    (3, {0, 1, 2}, True, ControlState(stable=0), 0),  # promoted, then a pin back to the imported draft
    (3, {0, 1}, False, ControlState(stable=2), 2),  # stable on another branch (a pin): follow what is served
    (None, set(), False, ControlState(stable=0), None),  # a new lineage before its first version
])
def test_which_served_version_the_trainer_goes_back_to(head, ancestors, was_routed, ctl, readopt) -> None:
    assert version_to_readopt(head, ancestors, was_routed, ctl) == readopt
