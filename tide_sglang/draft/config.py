"""`DraftConfig`: the EAGLE-3 draft's shape, written as the `config.json` SGLang's `LlamaForCausalLMEagle3` reads."""

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

ARCHITECTURE = "LlamaForCausalLMEagle3"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_AUX_LAYERS = 3  # SGLang's capture when the config names no layers: [2, L // 2, L - 3]


class DraftConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(gt=0, description="H: equals the target's, the draft shares its token embeddings")
    target_hidden_size: int = Field(gt=0, description="the target's H; fc reads K of these concatenated")
    intermediate_size: int = Field(gt=0, description="MLP width of the one decoder layer")
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0, description="grouped-query attention: heads sharing one K/V")
    head_dim: int = Field(gt=0)
    rms_norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    max_position_embeddings: int = Field(8192, gt=0)
    vocab_size: int = Field(gt=0, description="the target's vocabulary; embeddings and t2d cover it")
    draft_vocab_size: int = Field(gt=0, description="rows of lm_head: the hot tokens the draft can propose")
    aux_layer_ids: list[int] = Field(description="target layers fused by fc (SGLang/SpecForge ids); empty: "
                                     "SGLang's default three")
    torch_dtype: str = Field("bfloat16", description="dtype of the saved tensors (SGLang serves in this)")

    @model_validator(mode="after")
    def _check(self) -> "DraftConfig":
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(f"draft_vocab_size {self.draft_vocab_size} > vocab_size {self.vocab_size}")
        if self.torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype must be one of {sorted(DTYPES)}, got {self.torch_dtype!r}")
        return self

    @property
    def aux_layers(self) -> int:
        """K: how many target layers are concatenated in a captured hidden state (SGLang's default: 3)."""
        return len(self.aux_layer_ids) or DEFAULT_AUX_LAYERS

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    @classmethod
    def from_target(cls, target_config: Any, draft_vocab_size: int, aux_layer_ids: list[int],
                    **overrides: Any) -> "DraftConfig":
        """A one-layer draft shaped like one decoder layer of the target (a Hugging Face Llama-style config)."""
        rope = getattr(target_config, "rope_parameters", None) or {}
        fields: dict[str, Any] = {
            "hidden_size": target_config.hidden_size,
            "target_hidden_size": target_config.hidden_size,
            "intermediate_size": target_config.intermediate_size,
            "num_attention_heads": target_config.num_attention_heads,
            "num_key_value_heads": target_config.num_key_value_heads,
            "head_dim": getattr(target_config, "head_dim", None)
            or target_config.hidden_size // target_config.num_attention_heads,
            "rms_norm_eps": target_config.rms_norm_eps,
            "rope_theta": rope.get("rope_theta", getattr(target_config, "rope_theta", 10000.0)),
            "max_position_embeddings": target_config.max_position_embeddings,
            "vocab_size": target_config.vocab_size,
            "draft_vocab_size": draft_vocab_size,
            "aux_layer_ids": aux_layer_ids,
        }
        return cls(**{**fields, **overrides})

    def to_sglang(self) -> dict[str, Any]:
        """The `config.json` body: a LlamaConfig plus the EAGLE-3 fields SGLang reads."""
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "target_hidden_size": self.target_hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": 1,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            # transformers 5 reads rope_parameters, older readers rope_theta: write both, same value.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            # False: with True SGLang would use the embedding as a full-vocabulary head and ignore lm_head.
            "tie_word_embeddings": False,
            "torch_dtype": self.torch_dtype,
        } | ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": self.aux_layer_ids}} if self.aux_layer_ids else {})

    @classmethod
    def from_sglang(cls, body: dict[str, Any]) -> "DraftConfig":
        """Read an EAGLE-3 `config.json`: TIDE's own, SpecForge's exports (no `target_hidden_size`, no
        `eagle_config`: SGLang's defaults; `dtype` as transformers 5 writes it), and other SGLang-format drafts.
        Anything TIDE's draft model would compute differently from SGLang is rejected, with the field named."""
        if body.get("architectures") != [ARCHITECTURE] or body.get("num_hidden_layers", 1) != 1:
            raise ValueError(f"not a one-layer {ARCHITECTURE} config: architectures {body.get('architectures')}, "
                             f"num_hidden_layers {body.get('num_hidden_layers')}")
        if body.get("tie_word_embeddings", False) is not False:
            raise ValueError("tie_word_embeddings must be false for a reduced-vocabulary draft")
        eagle = body.get("eagle_config") or {}
        unsupported = {k: v for k, v in (("hidden_act", body.get("hidden_act", "silu")),
                                         ("fc_norm", body.get("fc_norm", False)),
                                         ("norm_before_fc", eagle.get("norm_before_fc", body.get("norm_before_fc"))),
                                         ("attention_bias", body.get("attention_bias", False)),
                                         ("mlp_bias", body.get("mlp_bias", False)))
                       if v not in (None, False, "silu")}
        rope = body.get("rope_parameters") or body.get("rope_scaling") or {}
        if (rope.get("rope_type") or rope.get("type") or "default") != "default":
            unsupported["rope"] = rope.get("rope_type") or rope.get("type")
        if unsupported:
            raise ValueError(f"unsupported draft architecture options {unsupported}: TIDE's draft model computes "
                             "plain Llama-style attention and RoPE without scaling")
        names = set(cls.model_fields) - {"aux_layer_ids"}
        fields = {k: body[k] for k in names if body.get(k) is not None}
        fields.setdefault("target_hidden_size", body.get("hidden_size"))
        fields.setdefault("draft_vocab_size", body.get("vocab_size"))
        fields.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if "head_dim" not in fields and body.get("hidden_size") and body.get("num_attention_heads"):
            fields["head_dim"] = body["hidden_size"] // body["num_attention_heads"]
        dtype = body.get("torch_dtype") or body.get("dtype")
        if dtype is not None:
            fields["torch_dtype"] = dtype
        return cls(**fields, aux_layer_ids=eagle.get("eagle_aux_hidden_state_layer_ids") or [])

    def write(self, directory: Path) -> Path:
        path = directory / "config.json"
        path.write_text(json.dumps(self.to_sglang(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> "DraftConfig":
        return cls.from_sglang(json.loads((directory / "config.json").read_text()))
