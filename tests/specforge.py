"""Drafts in SpecForge's export formats, for `tide import` tests.

SpecForge is not a dependency, so this mirrors its 0.2.0 exporters (`specforge/export/to_sglang.py`, `to_hf.py`,
`checkpoint_io.py`, and the draft `specforge/modeling/draft/llama3_eagle.py: LlamaForCausalLMEagle3`), read from
the wheel (`pip download specforge==0.2.0 --no-deps`) and checked once against its own code: same config.json
(transformers' `LlamaConfig.save_pretrained` of the draft config, `draft_vocab_size` added, no
`target_hidden_size`, no `eagle_config`, then `apply_legacy_rope_scaling` mirrors `rope_theta` at top level),
same tensor names, shapes and dtypes, one `model.safetensors` with metadata `{"format": "pt"}`:

- layout "sglang" (`to_sglang`): every tensor of the model's state dict except the embedding;
- layout "hf" (`to_hf`): the same plus `embed_tokens.weight` (the target's embedding, for `from_pretrained`).

`d2t` is SpecForge's (and SGLang's) offset form, `d2t[i] = target_id - i`; `t2d` a [V] bool mask.
"""

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file


def write_specforge_export(out: Path, *, hidden_size: int, intermediate_size: int, num_attention_heads: int,
                           num_key_value_heads: int, head_dim: int, vocab_size: int, hot_ids: torch.Tensor,
                           target_hidden_size: int | None = None, layout: Literal["sglang", "hf"] = "sglang",
                           seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A draft over target ids `hot_ids` (ascending) with random weights, as SpecForge exports it."""
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    draft_vocab = hot_ids.numel()
    config = LlamaConfig(architectures=["LlamaForCausalLMEagle3"], hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, head_dim=head_dim, num_hidden_layers=1,
                         vocab_size=vocab_size, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, use_cache=True)
    config.draft_vocab_size = draft_vocab
    if target_hidden_size is not None:
        config.target_hidden_size = target_hidden_size
    config.dtype = dtype
    config.save_pretrained(out)
    _legacy_rope_theta(out / "config.json")
    g = torch.Generator().manual_seed(seed)
    h, th = hidden_size, target_hidden_size or hidden_size
    q, kv = num_attention_heads * head_dim, num_key_value_heads * head_dim

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[hot_ids] = True
    tensors = {
        "t2d": t2d, "d2t": hot_ids.to(torch.int64) - torch.arange(draft_vocab),
        "midlayer.self_attn.q_proj.weight": w(q, 2 * h), "midlayer.self_attn.k_proj.weight": w(kv, 2 * h),
        "midlayer.self_attn.v_proj.weight": w(kv, 2 * h), "midlayer.self_attn.o_proj.weight": w(h, q),
        "midlayer.mlp.gate_proj.weight": w(intermediate_size, h),
        "midlayer.mlp.up_proj.weight": w(intermediate_size, h),
        "midlayer.mlp.down_proj.weight": w(h, intermediate_size),
        "midlayer.hidden_norm.weight": torch.ones(h, dtype=dtype),
        "midlayer.input_layernorm.weight": torch.ones(h, dtype=dtype),
        "midlayer.post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
        "fc.weight": w(h, 3 * th), "norm.weight": torch.ones(h, dtype=dtype), "lm_head.weight": w(draft_vocab, h),
    }
    if layout == "hf":
        tensors["embed_tokens.weight"] = w(vocab_size, h)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _legacy_rope_theta(path: Path) -> None:
    """`apply_legacy_rope_scaling`: older serving stacks read `rope_theta` at top level only."""
    config = json.loads(path.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and config.get("rope_theta") != theta:
        config["rope_theta"] = theta
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
