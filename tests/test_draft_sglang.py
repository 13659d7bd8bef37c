"""A registry checkpoint loads through SGLang 0.5.23's own `LlamaForCausalLMEagle3.load_weights`.

SGLang cannot be imported on a CPU machine without its kernels, so the test executes the real `load_weights`
source from the pinned wheel against the parameter names SGLang's module tree defines (checked in the source
too). Self-contained: the wheel is fetched with `pip download --no-deps` into `.cache/wheels` when missing.
"""

import ast
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

from tests.test_draft import tiny_draft
from tide_sglang.draft import DirectoryRegistry

SGLANG = "0.5.23"
WHEELS = Path(__file__).parents[1] / ".cache" / "wheels"

# SGLang's parameters for a one-layer EAGLE-3 draft (LlamaModel in llama_eagle3.py, layers from llama.py).
SGLANG_PARAMS = [
    "model.embed_tokens.weight", "model.fc.weight", "model.layers.0.input_layernorm.weight",
    "model.layers.0.hidden_norm.weight", "model.layers.0.self_attn.qkv_proj.weight",
    "model.layers.0.self_attn.o_proj.weight", "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight",
    "lm_head.weight",
]


def sglang_source(member: str) -> str:
    wheels = sorted(WHEELS.glob(f"sglang-{SGLANG}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"sglang=={SGLANG}", "-d", str(WHEELS)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = sorted(WHEELS.glob(f"sglang-{SGLANG}-*.whl"))
        if not wheels:
            pytest.fail(f"cannot obtain the sglang=={SGLANG} wheel for the contract test: {' '.join(cmd)} "
                        f"failed:\n{result.stderr[-2000:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        return wheel.read(member).decode()


class _Param:
    def __init__(self, name: str, calls: list[tuple[str, tuple[int, ...], Any]]) -> None:
        self.name, self.calls = name, calls

    def weight_loader(self, param: "_Param", weight: torch.Tensor, shard_id: Any = None) -> None:
        self.calls.append((param.name, tuple(weight.shape), shard_id))


def _sglang_load_weights(source: str) -> Any:
    """The real `LlamaForCausalLMEagle3.load_weights` function, compiled from the wheel's source."""
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LlamaForCausalLMEagle3")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "load_weights")
    # Every fake parameter has its own weight_loader; SGLang only evaluates this default eagerly.
    namespace: dict[str, Any] = {"torch": torch, "default_weight_loader": None}
    prelude = "from typing import Iterable, Tuple\n"
    exec(prelude + textwrap.dedent(ast.get_source_segment(source, fn) or ""), namespace)
    return namespace["load_weights"]


def test_sglang_module_tree_has_the_parameters_we_map_to() -> None:
    eagle3 = sglang_source("sglang/srt/models/llama_eagle3.py")
    llama = sglang_source("sglang/srt/models/llama.py")
    for attr in ("embed_tokens", "fc", "layers", "norm", "hidden_norm", "lm_head"):
        assert re.search(rf"self\.{attr} = ", eagle3), attr
    assert "self.self_attn.qkv_proj = QKVParallelLinear" in eagle3
    for attr in ("input_layernorm", "post_attention_layernorm", "o_proj", "gate_up_proj", "down_proj"):
        assert re.search(rf"self\.{attr} = ", llama), attr
    for key in ("draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids", "tie_word_embeddings"):
        assert key in eagle3, key


def test_registry_checkpoint_loads_with_sglang_weight_mapping(tmp_path: Path) -> None:
    registry = DirectoryRegistry(tmp_path, create=True)
    draft = tiny_draft()
    verified = registry.verify(registry.publish(draft).version)
    tensors = load_file(str(verified.weights_path))

    calls: list[tuple[str, tuple[int, ...], Any]] = []
    params = {name: _Param(name, calls) for name in SGLANG_PARAMS}
    model = type("FakeEagle3", (), {"named_parameters": lambda self: params.items(), "hot_token_id": None})()
    _sglang_load_weights(sglang_source("sglang/srt/models/llama_eagle3.py"))(model, tensors.items())

    loaded = {(name, shard) for name, _, shard in calls}
    assert len(calls) == len(tensors) - 2, "every tensor but d2t/t2d must land in a parameter (none ignored)"
    assert {name for name, _ in loaded} == set(SGLANG_PARAMS) - {"model.embed_tokens.weight"}
    assert {s for n, s in loaded if n.endswith("qkv_proj.weight")} == {"q", "k", "v"}
    assert {s for n, s in loaded if n.endswith("gate_up_proj.weight")} == {0, 1}
    assert torch.equal(model.hot_token_id, draft.vocab.token_ids)  # SGLang's hot_token_id = d2t + arange


def test_config_json_reads_as_transformers_llama_config(tmp_path: Path) -> None:
    registry = DirectoryRegistry(tmp_path, create=True)
    path = registry.verify(registry.publish(tiny_draft()).version).path
    config = LlamaConfig.from_pretrained(path)
    assert config.architectures == ["LlamaForCausalLMEagle3"] and config.num_hidden_layers == 1
    assert (config.draft_vocab_size, config.target_hidden_size, config.tie_word_embeddings) == (40, 32, False)
    assert config.eagle_config == {"eagle_aux_hidden_state_layer_ids": [0, 1, 2]}
