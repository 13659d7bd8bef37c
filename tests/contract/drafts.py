"""Tiny TIDE drafts published into a real DirectoryRegistry, shaped to fit conftest.tiny_target."""

from pathlib import Path

import torch

from tide_sglang.draft import DirectoryRegistry, DraftConfig, Eagle3Draft, select_vocab

CONFIG = DraftConfig(hidden_size=32, target_hidden_size=32, intermediate_size=64, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, vocab_size=100, draft_vocab_size=40,
                     aux_layer_ids=[0, 1, 2], torch_dtype="float32")


def draft(seed: int, config: DraftConfig = CONFIG, vocab_seed: int = 0) -> Eagle3Draft:
    torch.manual_seed(seed)
    counts = torch.rand(config.vocab_size, generator=torch.Generator().manual_seed(vocab_seed))
    return Eagle3Draft(config, select_vocab(counts, config.draft_vocab_size))


def registry_with(root: Path, *drafts: Eagle3Draft) -> DirectoryRegistry:
    registry = DirectoryRegistry(root, create=True)
    for i, d in enumerate(drafts):
        registry.publish(d, parent=i or None)
    return registry


def sglang_eagle3(draft_dir: Path, server_args, monkeypatch) -> torch.nn.Module:
    """SGLang's own `LlamaForCausalLMEagle3`, built on the CPU from a TIDE checkpoint's config.json."""
    import sglang.srt.layers.rotary_embedding.base as rope
    from sglang.srt.models.llama_eagle3 import LlamaForCausalLMEagle3
    from transformers import LlamaConfig

    from tests.contract.conftest import sglang_model_context

    # RotaryEmbedding binds a CUDA (or vLLM) kernel unless it believes it is on SGLang's CPU engine, which needs
    # sgl_kernel's CPU build (not installable here). The flag only picks that kernel; no test runs a forward.
    monkeypatch.setattr(rope, "_is_cpu", True)
    with sglang_model_context(server_args):
        return LlamaForCausalLMEagle3(LlamaConfig.from_pretrained(draft_dir))
