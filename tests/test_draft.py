"""The EAGLE-3 draft: shapes, gradients, training-time test == chain drafting, vocab maps, target init."""

import json
from pathlib import Path

import pytest
import torch

from tide_sglang.draft import DraftConfig, DraftVocab, Eagle3Draft, init_draft, select_vocab
from tide_sglang.draft.model import checkpoint_dtype, checkpoint_shapes
from tide_sglang.draft.target import Target, aux_hidden_states, default_aux_layer_ids, load_heads, load_target

TINY = DraftConfig(hidden_size=32, target_hidden_size=32, intermediate_size=64, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, vocab_size=100, draft_vocab_size=40, aux_layer_ids=[0, 1, 2],
                   torch_dtype="float32")


def tiny_draft(seed: int = 0) -> Eagle3Draft:
    torch.manual_seed(seed)
    return Eagle3Draft(TINY, select_vocab(torch.rand(100, generator=torch.Generator().manual_seed(seed)), 40))


@pytest.fixture(scope="module")
def smollm2() -> Target:
    return load_target()


def test_unroll_shapes_and_gradients() -> None:
    draft = tiny_draft()
    aux, ids = torch.randn(2, 12, 96), torch.randint(0, 100, (2, 12))
    logits = draft.unroll(aux, ids, torch.arange(12).expand(2, 12), steps=3)
    assert [tuple(x.shape) for x in logits] == [(2, 12, 40)] * 3
    sum(x.logsumexp(-1).mean() for x in logits).backward()
    assert draft.embed_tokens.weight.grad is None  # the target's embedding stays frozen
    for name, p in draft.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_training_time_test_equals_chain_drafting_with_cache() -> None:
    """Step j of the unroll at row t must be exactly what the engine computes drafting j tokens past row t."""
    draft = tiny_draft(1)
    b, t_len, t = 2, 10, 4
    aux, ids = torch.randn(b, t_len, 96), torch.randint(0, 100, (b, t_len))
    pos = torch.arange(t_len).expand(b, t_len) + 5
    with torch.no_grad():
        unrolled = draft.unroll(aux, ids, pos, steps=3)
        cache = draft.new_cache(b, 64)
        out = draft.step(aux[:, : t + 1], ids[:, : t + 1], pos[:, : t + 1], cache)
        torch.testing.assert_close(out.logits[:, t], unrolled[0][:, t])
        hidden = out.hidden[:, -1:]
        for j in (1, 2):
            out = draft.step(hidden, ids[:, t + j : t + j + 1], pos[:, t : t + 1] + j, cache)
            torch.testing.assert_close(out.logits[:, 0], unrolled[j][:, t])
            hidden = out.hidden


def test_cache_padding_rows_do_not_leak() -> None:
    draft = tiny_draft(2)
    aux, ids = torch.randn(1, 6, 96), torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        alone = draft.step(aux[:, :4], ids[:, :4], torch.arange(4)[None], draft.new_cache(1, 16))
        padded_pos = torch.tensor([[0, 1, 2, 3, -1, -1]])
        padded = draft.step(aux, ids, padded_pos, draft.new_cache(1, 16))
    torch.testing.assert_close(padded.logits[:, :4], alone.logits)


def test_vocab_maps_round_trip() -> None:
    counts = torch.zeros(100)
    counts[[5, 7, 9, 50]] = torch.tensor([10.0, 30.0, 20.0, 5.0])
    vocab = select_vocab(counts, 3, always=[2])
    assert vocab.token_ids.tolist() == [2, 7, 9]  # EOS forced in, then the two most frequent
    assert (vocab.d2t + torch.arange(3)).tolist() == [2, 7, 9]  # what SGLang turns into hot_token_id
    assert vocab.t2d.nonzero().squeeze(1).tolist() == [2, 7, 9]
    assert vocab.draft_index()[[2, 7, 9, 5]].tolist() == [0, 1, 2, -1]
    assert DraftVocab.from_d2t(vocab.d2t, 100).sha256() == vocab.sha256()
    assert select_vocab(counts, 3).sha256() != vocab.sha256()
    with pytest.raises(ValueError, match="ascending"):
        DraftVocab(token_ids=torch.tensor([3, 3]), vocab_size=100)


def test_checkpoint_names_shapes_and_dtypes_match_the_contract() -> None:
    cfg = TINY.model_copy(update={"torch_dtype": "bfloat16"})
    draft = Eagle3Draft(cfg, select_vocab(torch.rand(100), 40))
    tensors = draft.draft_tensors()
    assert {k: tuple(v.shape) for k, v in tensors.items()} == checkpoint_shapes(cfg)
    assert all(v.dtype == checkpoint_dtype(k, cfg) for k, v in tensors.items())
    assert "embed_tokens.weight" not in tensors
    again = Eagle3Draft.from_tensors(cfg, tensors, draft.embed_tokens.weight)
    assert torch.equal(again.lm_head.weight, draft.lm_head.weight.to(torch.bfloat16).float())


def test_config_json_round_trip_and_rejects_tied_embeddings(tmp_path: Path) -> None:
    TINY.write(tmp_path)
    body = json.loads((tmp_path / "config.json").read_text())
    assert body["architectures"] == ["LlamaForCausalLMEagle3"] and body["tie_word_embeddings"] is False
    assert DraftConfig.read(tmp_path) == TINY
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        DraftConfig.from_sglang({**body, "tie_word_embeddings": True})


def test_smollm2_target_aux_states_and_draft_init(smollm2: Target) -> None:
    assert smollm2.aux_layer_ids == default_aux_layer_ids(30) == [1, 14, 26]  # SGLang captures inputs of 2,15,27
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    aux, logits = aux_hidden_states(smollm2, ids)
    assert aux.shape == (1, ids.shape[1], 3 * 576) and logits.shape == (1, ids.shape[1], 49152)
    out = smollm2.model(ids, output_hidden_states=True)
    torch.testing.assert_close(aux[..., 576:1152], out.hidden_states[15])  # input of layer 15

    vocab = select_vocab(torch.bincount(ids.flatten(), minlength=49152).float(), 512)
    config = DraftConfig.from_target(smollm2.model.config, 512, smollm2.aux_layer_ids)
    heads = load_heads()  # read from the cached checkpoint, without the target model
    assert torch.equal(heads.embed, smollm2.model.get_input_embeddings().weight)
    draft = init_draft(config, vocab, heads.embed, heads.lm_head, heads.norm)
    assert config.rope_theta == 100000.0 and config.head_dim == 64
    assert torch.equal(draft.lm_head.weight, smollm2.model.lm_head.weight[vocab.token_ids])
    assert torch.equal(draft.embed_tokens.weight, smollm2.model.get_input_embeddings().weight)
