"""The reference engine on the real SmolLM2-135M target (CPU): lossless greedy speculation, capture to Redis."""

import pytest
import torch

from tide_sglang import keys
from tide_sglang.draft import DraftConfig, init_draft, select_vocab
from tide_sglang.draft.model import DraftOutput
from tide_sglang.draft.target import Target, heads_of, load_target
from tide_sglang.engine import FixedSteps, SpecEngine, greedy_accept, truncate_at_eos
from tide_sglang.stream import StreamReader, StreamWriter, connect

PROMPTS = ["The capital of France is", "def fib(n):\n    ", "Once upon a time, in a land far away,",
           "1, 2, 3, 4, 5,", "Bonjour, je m'appelle"]
NEW = 12


@pytest.fixture(scope="module")
def target() -> Target:
    return load_target()


@pytest.fixture(scope="module")
def prompt_ids(target) -> list[list[int]]:
    return [target.tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(target, prompt_ids) -> list[list[int]]:
    """Target-only greedy decoding, one prompt at a time, by transformers' own generate()."""
    out = []
    for ids in prompt_ids:
        gen = target.model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)
        out.append(gen[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def draft(target):
    heads = heads_of(target.model)
    config = DraftConfig.from_target(target.model.config, 1024, target.aux_layer_ids, torch_dtype="float32")
    vocab = select_vocab(torch.ones(config.vocab_size), 1024)
    return init_draft(config, vocab, heads.embed, heads.lm_head, heads.norm)


class OracleDraft:
    """Test double of a *trained* draft (training one takes minutes): it proposes the reference continuation,
    with every third proposal wrong, so verify sees full, partial and zero acceptance. Rows keep their order
    because all requests run the same number of tokens."""

    def __init__(self, sequences: list[list[int]], hidden: int) -> None:
        self.sequences, self.hidden = sequences, hidden
        self.calls = 0

    def new_cache(self, batch: int, max_len: int) -> None:
        return None

    def to_target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    def step(self, hidden, input_ids, positions, cache) -> DraftOutput:
        self.calls += 1
        b, t = positions.shape
        logits = torch.zeros(b, t, 50_000)
        for i in range(b):
            for j in range(t):
                p = int(positions[i, j]) + 2  # the row at p reads x_{p+1} and predicts x_{p+2}
                seq = self.sequences[i]
                wrong = (p + self.calls) % 3 == 0
                logits[i, j, 7 if wrong or p >= len(seq) else seq[p]] = 1.0
        return DraftOutput(logits=logits, hidden=torch.zeros(b, t, self.hidden))


@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("steps", [0, 3])
def test_lossless_with_a_real_draft(target, prompt_ids, reference, draft, batch, steps):
    engine = SpecEngine(target, draft=draft, controller=FixedSteps(steps))
    out = engine.generate(prompt_ids[:batch], NEW)
    assert out == reference[:batch]


@pytest.mark.parametrize("steps", [1, 4])
def test_lossless_when_drafts_are_accepted(target, prompt_ids, reference, steps):
    oracle = OracleDraft([p + r for p, r in zip(prompt_ids, reference, strict=True)], target.hidden_size)
    engine = SpecEngine(target, draft=oracle, controller=FixedSteps(steps))  # type: ignore[arg-type]
    stats = []
    out = engine.generate(prompt_ids, NEW, on_step=stats.append)
    assert out == reference
    accepted = [s.accepted for s in stats]
    assert sum(accepted) > 0 and len(stats) < NEW  # speculation really skipped target forwards
    assert sum(s.emitted for s in stats) + len(PROMPTS) == NEW * len(PROMPTS)  # +1 token each from prefill


def test_capture_reaches_the_stream(target, prompt_ids, reference, settings):
    stream = keys.hidden_states(settings.namespace, settings.deployment)
    writer = StreamWriter(lambda: connect(settings, check=False), stream)
    oracle = OracleDraft([p + r for p, r in zip(prompt_ids, reference, strict=True)], target.hidden_size)
    engine = SpecEngine(target, draft=oracle, controller=FixedSteps(2), writer=writer)  # type: ignore[arg-type]
    engine.generate(prompt_ids, NEW, domain="test")
    writer.close()
    reader = StreamReader(connect(settings), stream, keys.dead_letter(settings.namespace, settings.deployment), "t",
                          block_ms=50)
    rows: dict[str, dict[int, int]] = {}
    prompt: dict[str, dict[int, bool]] = {}
    while entries := reader.read():
        for e in entries:
            b = e.batch
            assert b.domains == ["test"] * len(b.rids) and b.aux_layers == 3 and b.hidden_size == target.hidden_size
            assert b.vocab_size == target.vocab_size
            for r, p, tok, first in zip(b.req_index.tolist(), b.positions.tolist(), b.token_ids.tolist(),
                                        b.is_prompt.tolist(), strict=True):
                rows.setdefault(b.rids[r], {})[p] = tok
                prompt.setdefault(b.rids[r], {})[p] = first
        reader.ack(entries)
    for i, ids in enumerate(prompt_ids):  # prompt rows are flagged, generated rows are not
        flags = prompt[f"req-{i}"]
        assert [flags[p] for p in sorted(flags)] == [p < len(ids) for p in sorted(flags)]
    # Every request: each prompt row and each generated row exactly once, token = what came next in the text.
    for i, (ids, ref) in enumerate(zip(prompt_ids, reference, strict=True)):
        text = ids + ref
        got = rows[f"req-{i}"]
        assert sorted(got) == list(range(len(text) - 1))
        assert all(got[p] == text[p + 1] for p in got)


def test_capture_hidden_states_are_the_targets(target, prompt_ids, settings):
    """The streamed aux states equal a fresh full forward of the same text (bf16 rounding aside)."""
    from tide_sglang.draft.target import aux_hidden_states

    stream = keys.hidden_states(settings.namespace, settings.deployment)
    writer = StreamWriter(lambda: connect(settings, check=False), stream)
    out = SpecEngine(target, controller=FixedSteps(0), writer=writer).generate(prompt_ids[:1], 6)
    writer.close()
    reader = StreamReader(connect(settings), stream, keys.dead_letter(settings.namespace, settings.deployment), "t",
                          block_ms=50)
    got = {}
    while entries := reader.read():
        for e in entries:
            for p, h in zip(e.batch.positions.tolist(), e.batch.hidden, strict=True):
                got[p] = h.float()
    full, _ = aux_hidden_states(target, torch.tensor([prompt_ids[0] + out[0]]))
    for p, h in got.items():
        torch.testing.assert_close(h, full[0, p], rtol=2e-2, atol=2e-2)


def test_greedy_accept_and_truncation():
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [1, 6, 7]])
    target = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    assert greedy_accept(drafts, target).tolist() == [3, 1, 0]
    assert greedy_accept(torch.zeros(2, 0, dtype=torch.int64), target[:2, :1]).tolist() == [0, 0]
    assert truncate_at_eos([1, 2, 0, 3], {0}, 10) == [1, 2, 0]
    assert truncate_at_eos([1, 2, 3], {0}, 2) == [1, 2]
