"""Model sources: one parser for engines, trainer and operator; `tide fetch` as the operator's init containers run
it, against a local Hugging Face cache standing in for the hub (HF_HUB_OFFLINE=1: no network here) and a real
SeaweedFS S3 server."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.s3server import BUCKET, LocalS3
from tide_sglang.draft.target import load_heads
from tide_sglang.sources import ModelSource, ModelSourceError, local_dir, parse_model_source

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(("text", "expected"), [
    ("/models/llama", ModelSource(kind="path", location="/models/llama")),
    ("./llama", ModelSource(kind="path", location="./llama")),
    ("smollm2-135m", ModelSource(kind="path", location="smollm2-135m")),
    ("pvc://weights/llama/8b", ModelSource(kind="pvc", location="llama/8b", claim="weights")),
    ("s3://models/llama/8b", ModelSource(kind="s3", location="s3://models/llama/8b")),
    ("meta-llama/Llama-3.1-8B-Instruct", ModelSource(kind="hub", location="meta-llama/Llama-3.1-8B-Instruct")),
    ("lmsys/sglang-EAGLE3-LLaMA3.1-Instruct-8B@v2", ModelSource(kind="hub", location=(
        "lmsys/sglang-EAGLE3-LLaMA3.1-Instruct-8B"), revision="v2")),
])
def test_parse_model_source(text: str, expected: ModelSource) -> None:
    assert parse_model_source(text) == expected
    assert parse_model_source(text).fetched == (expected.kind in ("s3", "hub"))


@pytest.mark.parametrize("bad", ["http://example.com/m", "pvc:///path", "s3:///prefix"])
def test_bad_model_sources_are_named(bad: str) -> None:
    with pytest.raises(ModelSourceError, match="model source"):
        parse_model_source(bad)


def tiny_llama(out: Path, shard: str | None = None) -> Path:
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    return out


def fetch(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tide_sglang.cli", "fetch", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **env}, timeout=120)


def hub_cache(cache: Path, repo: str, files: Path) -> None:
    """A Hugging Face cache holding `repo` at main, as an earlier online fetch would have left it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    for f in files.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())


def test_fetch_from_the_hub_cache_offline_once(tmp_path: Path) -> None:
    cache = tmp_path / "volume" / "hub"
    hub_cache(cache, "org/tiny", tiny_llama(tmp_path / "src"))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    dest = tmp_path / "volume" / "target"
    done = fetch("org/tiny", str(dest), env=env)
    assert done.returncode == 0, done.stderr
    heads = load_heads(str(dest))
    assert heads.embed.shape == (64, 16) and heads.lm_head.shape == (64, 16)
    assert fetch("org/tiny", str(dest), env=env).returncode == 0  # fetched once: kept as it is
    missing = fetch("org/missing", str(tmp_path / "volume" / "draft"), env=env)
    assert missing.returncode != 0 and "cannot fetch 'org/missing' from the hub" in missing.stderr
    assert not (tmp_path / "volume" / "draft").exists()


def test_trainer_fetches_only_the_target_heads_from_s3(tmp_path: Path, s3_server: LocalS3) -> None:
    """A sharded checkpoint in a bucket: `--heads-only` downloads the configs and the shards holding the embedding,
    the final norm and the LM head, and never a pickle file."""
    src = tiny_llama(tmp_path / "src", shard="8KB")
    (src / "pytorch_model.bin").write_bytes(b"never loaded")
    client = s3_server.client()
    for f in src.iterdir():
        client.put_object(Bucket=BUCKET, Key=f"models/tiny/{f.name}", Body=f.read_bytes())
    dest = tmp_path / "cache" / "target"
    done = fetch(f"s3://{BUCKET}/models/tiny", str(dest), "--heads-only", env=s3_server.env)
    assert done.returncode == 0, done.stderr
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    fetched = sorted(p.name for p in dest.glob("*.safetensors"))
    assert len(shards) > 2 and 0 < len(fetched) < len(shards) and not (dest / "pytorch_model.bin").exists()
    want, got = load_heads(str(src)), load_heads(str(dest))
    for name in ("embed", "lm_head", "norm"):
        assert torch.equal(getattr(want, name), getattr(got, name)), name


def test_a_served_hub_draft_is_found_in_the_local_cache(tmp_path: Path) -> None:
    """What keeps hot swap on for `--speculative-draft-model-path org/name`: the plugin compares versions with the
    snapshot SGLang downloaded, found without network access."""
    hub_cache(tmp_path / "hub", "org/draft", tiny_llama(tmp_path / "src"))
    found = local_dir("org/draft", hub_cache=tmp_path / "hub")
    assert found is not None and (found / "config.json").is_file()
    assert local_dir(str(tmp_path / "src")) == tmp_path / "src"
    assert local_dir("org/absent", hub_cache=tmp_path / "hub") is None
    assert local_dir(str(tmp_path / "nope")) is None and local_dir("s3://b/p") is None
