"""TIDE's draft forward against SGLang's own `LlamaForCausalLMEagle3` (llama_eagle3.py), on the CPU, over what
SGLang runs per verify step: the draft extend over the accepted rows (the target's aux states, the tokens after
them), then the chain steps, each fed the state SGLang hands the next step (the model's second output, the
pre-norm residual sum; `norm_output` off) and the token the draft just proposed, at the next position.

SGLang's attention backends need CUDA; here each layer's `RadixAttention` is replaced by position-indexed causal
attention over a KV cache, which is what the backends compute for a chain (the draft extend writes the accepted
positions, a chain step attends to the committed prefix and to the earlier steps). Everything else is SGLang's
module code: fc, the norms, the concatenation order, q/k/v, rope, the MLP, the final fused norm. The same check
for TIDE's own unroll (training, held-out evaluation) against `step` is tests/test_draft.py."""

import math
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sglang.srt.server_args import prepare_server_args

from tests.contract.drafts import CONFIG, draft, registry_with, sglang_eagle3
from tide_sglang.draft.registry import WEIGHTS
from tide_sglang.plugin.swap import never_loaded


@pytest.fixture(scope="module")
def server_args(target_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    registry = registry_with(tmp_path_factory.mktemp("args-registry"), draft(0))
    return prepare_server_args(["--model-path", str(target_dir), "--device", "cpu", "--speculative-algorithm",
                                "EAGLE3", "--speculative-draft-model-path", str(registry.path(1))])


class CachedAttention(torch.nn.Module):
    """Stands in for `RadixAttention`: writes k/v at the rows' positions, attends to every filled slot at or
    before each row's position (GQA: kv heads shared by groups of query heads)."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, slots: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.k = torch.zeros(slots, kv_heads, head_dim)
        self.v = torch.zeros(slots, kv_heads, head_dim)
        self.filled = torch.zeros(slots, dtype=torch.bool)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, forward_batch, **_) -> torch.Tensor:
        pos = forward_batch.positions  # [N]
        self.k[pos], self.v[pos] = k.view(-1, self.kv_heads, self.head_dim), v.view(-1, self.kv_heads, self.head_dim)
        self.filled[pos] = True
        group = self.heads // self.kv_heads
        keys, values = (x.repeat_interleave(group, dim=1).transpose(0, 1) for x in (self.k, self.v))  # [nh, S, hd]
        q = q.view(-1, self.heads, self.head_dim).transpose(0, 1)  # [nh, N, hd]
        mask = (torch.arange(self.k.shape[0])[None] <= pos[:, None]) & self.filled[None]  # [N, S]
        scores = (q @ keys.transpose(-1, -2) / math.sqrt(self.head_dim)).masked_fill(~mask, float("-inf"))
        return (torch.softmax(scores, dim=-1) @ values).transpose(0, 1).reshape(-1, self.heads * self.head_dim)


def _sglang_draft(path: Path, server_args, monkeypatch) -> torch.nn.Module:
    """SGLang's module with the checkpoint loaded by its own `load_weights`, its ops on their plain-torch paths."""
    model = sglang_eagle3(path, server_args, monkeypatch)
    model.load_weights([(n, t) for n, t in load_file(str(path / WEIGHTS)).items() if not never_loaded(n)])
    for module in model.modules():
        if hasattr(module, "forward_native") and hasattr(module, "_forward_method"):
            module._forward_method = module.forward_native  # CustomOps: the reference path, not a CPU kernel
    for layer in model.model.layers:
        layer.self_attn.attn = CachedAttention(CONFIG.num_attention_heads, CONFIG.num_key_value_heads,
                                               CONFIG.head_dim, slots=64)
    return model


@contextmanager
def _one_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A single tensor-parallel rank: the linear layers only ask its group whether to use symmetric memory (they
    do not here). 0.5.17 reads the group from `parallel_state`, 0.5.23 from the runtime context."""
    import sglang.srt.runtime_context as rc
    from sglang.srt.distributed import parallel_state

    group = types.SimpleNamespace(world_size=1, rank_in_group=0)
    monkeypatch.setattr(parallel_state, "_TP", group)
    with rc.get_parallel().override(tp_group=group):
        yield


def _run(model: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor,
         positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGLang draft forward: (logits over the draft vocabulary [N, Vd], the state SGLang passes on [N, H])."""
    batch = types.SimpleNamespace(
        positions=positions, mm_input_embeds=None, spec_info=types.SimpleNamespace(hidden_states=hidden),
        forward_mode=types.SimpleNamespace(is_extend=lambda: False), contains_mm_inputs=lambda: False)
    # The embedding is the target's table: looked up here (SGLang's vocab-parallel lookup needs a TP group)
    embeds = torch.nn.functional.embedding(ids, model.model.embed_tokens.weight)
    to_logits, (passed_on,) = model.model(ids, positions, batch, input_embeds=embeds)
    logits = to_logits @ model.lm_head.weight[: CONFIG.draft_vocab_size].T  # SGLang pads the head to 64 rows
    return logits, passed_on


def test_tide_draft_equals_sglangs_over_the_extend_and_a_chain_of_steps(tmp_path: Path, server_args,
                                                                       monkeypatch) -> None:
    tide = draft(3)
    registry = registry_with(tmp_path / "registry", tide)
    model = _sglang_draft(registry.path(1), server_args, monkeypatch)
    tide = registry.load(1, embed=tide.embed_tokens.weight, device="cpu")
    with torch.no_grad():
        # the target's, which SGLang hands the draft (its table padded to a multiple of 64 rows)
        model.model.embed_tokens.weight[: CONFIG.vocab_size].copy_(tide.embed_tokens.weight)

    g = torch.Generator().manual_seed(0)
    rows, start = 7, 5  # accepted rows at positions 5..11 (a prefix of 5 positions drafted before is not needed)
    aux = torch.randn(rows, 3 * CONFIG.target_hidden_size, generator=g)
    ids = torch.randint(0, CONFIG.vocab_size, (rows,), generator=g)
    positions = torch.arange(start, start + rows)
    cache = tide.new_cache(1, 64)
    with torch.no_grad(), _one_rank(monkeypatch):
        want = tide.step(aux[None], ids[None], positions[None], cache)
        logits, passed_on = _run(model, aux, ids, positions)  # the draft extend
        torch.testing.assert_close(logits, want.logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(passed_on, want.hidden[0], rtol=1e-4, atol=1e-4)
        hidden, pos = passed_on[-1:], positions[-1:]
        tide_hidden = want.hidden[:, -1:]
        for _ in range(3):  # chain steps: the proposed token (a target id), the state passed on, position + 1
            token = tide.to_target_ids(logits[-1:].argmax(-1))
            pos = pos + 1
            want = tide.step(tide_hidden, token[None], pos[None], cache)
            logits, hidden = _run(model, hidden, token, pos)
            torch.testing.assert_close(logits, want.logits[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(hidden, want.hidden[0], rtol=1e-4, atol=1e-4)
            tide_hidden = want.hidden
