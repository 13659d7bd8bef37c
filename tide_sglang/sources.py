"""Where a model comes from (the target, or the draft a lineage starts with), parsed in one place for engines,
trainer and operator, and fetched onto local disk once.

    /abs/path, ./rel/path, smollm2-135m     a local or mounted directory (used as is)
    pvc://claim/path                        `path` inside PVC `claim` (the operator mounts it read-only)
    s3://bucket/prefix                      the objects under the prefix (boto3's AWS_* variables)
    org/name, org/name@revision             a Hugging Face hub id (HF_TOKEN; HF_HUB_OFFLINE=1 uses only the cache)

In Kubernetes the operator fetches s3:// and hub sources with an init container (`tide fetch`) into the pod's
model-cache volume, and hands SGLang and the trainer that local directory. Only safetensors, configs and tokenizer
files are fetched (never pickle); `heads_only` fetches just the configs and the shards holding the embedding, the
final norm and the LM head: all the trainer reads of its target (draft/target.py `load_heads`).
"""

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

MODEL_CACHE = "/var/cache/tide/models"  # the model-cache volume in every pod that fetches
HEADS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
FILES = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt")  # never *.bin, *.pt, *.pth
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?$")
_INDEX = "model.safetensors.index.json"


class ModelSourceError(ValueError):
    """A model source that cannot be parsed or fetched; the message says which and why."""


class ModelSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["path", "pvc", "s3", "hub"]
    location: str  # path: the directory; pvc: the path inside the claim; s3: the URL; hub: the repo id
    claim: str | None = None  # pvc only
    revision: str | None = None  # hub only

    @property
    def fetched(self) -> bool:
        """Whether it must be fetched onto local disk before anything reads it."""
        return self.kind in ("s3", "hub")


def parse_model_source(text: str) -> ModelSource:
    if text.startswith("pvc://"):
        claim, _, path = text.removeprefix("pvc://").partition("/")
        if not claim:
            raise ModelSourceError(f"model source {text!r}: a PVC source is pvc://claim/path")
        return ModelSource(kind="pvc", location=path.strip("/"), claim=claim)
    if text.startswith("s3://"):
        if not text.removeprefix("s3://").split("/", 1)[0]:
            raise ModelSourceError(f"model source {text!r}: an S3 source is s3://bucket/prefix")
        return ModelSource(kind="s3", location=text)
    if "://" in text:
        raise ModelSourceError(f"model source {text!r}: expected a path, pvc://, s3:// or a hub id org/name")
    if (m := _HUB_ID.match(text)) and not text.startswith("."):
        return ModelSource(kind="hub", location=m.group("repo"), revision=m.group("revision"))
    return ModelSource(kind="path", location=text)


def local_dir(text: str, *, hub_cache: Path | None = None) -> Path | None:
    """The local directory a source already is, or (a hub id) that the Hugging Face cache holds, without any
    network access: SGLang downloaded a hub draft there before the plugin asks. None when there is none."""
    try:
        source = parse_model_source(text)
    except ModelSourceError:
        return None
    if source.kind == "path":
        return Path(source.location) if Path(source.location).is_dir() else None
    if source.kind != "hub":
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source.location, revision=source.revision, cache_dir=hub_cache,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        return None


def cache_path(name: str) -> str:
    """Where the operator's init container fetches the model it calls `name` (target, draft)."""
    return f"{MODEL_CACHE}/{name}"


def _head_shards(index: dict) -> set[str]:
    weight_map = index["weight_map"]
    return {weight_map[name] for name in HEADS if name in weight_map}


def fetch_model(source: ModelSource, dest: Path, *, heads_only: bool = False) -> Path:
    """Make `dest` the model's local directory (a no-op when it already is: fetched once per volume)."""
    if dest.exists():
        return dest
    if source.kind in ("path", "pvc"):
        raise ModelSourceError(f"model source {source.location!r} is local: nothing to fetch")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.kind == "hub":
        _fetch_hub(source, dest, heads_only)
    else:
        _fetch_s3(source, dest, heads_only)
    return dest


def _fetch_hub(source: ModelSource, dest: Path, heads_only: bool) -> None:
    """Into the Hugging Face cache (HF_HUB_CACHE, on the same volume), then `dest` links to the snapshot; with
    HF_HUB_OFFLINE=1 only what the cache holds is used."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    def download(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(source.location, revision=source.revision, allow_patterns=patterns))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
            raise ModelSourceError(f"cannot fetch {source.location!r} from the hub: {e}") from None

    if heads_only:
        snapshot = download(["*.json"])
        shards = _head_shards(json.loads((snapshot / _INDEX).read_text())) if (snapshot / _INDEX).is_file() \
            else {"model.safetensors"}
        snapshot = download(["*.json", *sorted(shards)])
    else:
        snapshot = download(list(FILES))
    if not any(snapshot.glob("*.safetensors")):
        raise ModelSourceError(f"{source.location!r} has no safetensors weights (pickle files are never loaded)")
    dest.symlink_to(snapshot, target_is_directory=True)


def _fetch_s3(source: ModelSource, dest: Path, heads_only: bool) -> None:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    from tide_sglang.draft.s3 import s3_client

    bucket, _, prefix = source.location.removeprefix("s3://").partition("/")
    prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    client = s3_client()
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        names = [o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])]
        wanted = [n for n in names if "/" not in n and any(Path(n).match(p) for p in FILES)]
        if heads_only:
            wanted = [n for n in wanted if n.endswith(".json")]
        for name in wanted:
            client.download_file(bucket, prefix + name, str(tmp / name))
        if heads_only:
            shards = _head_shards(json.loads((tmp / _INDEX).read_text())) if (tmp / _INDEX).is_file() \
                else {"model.safetensors"}
            for name in sorted(shards):
                client.download_file(bucket, prefix + name, str(tmp / name))
        if not any(tmp.glob("*.safetensors")):
            raise ModelSourceError(f"{source.location} has no safetensors weights (pickle files are never loaded)")
        tmp.rename(dest)  # a half-fetched model is never taken for a whole one
    except (ClientError, BotoCoreError, Boto3Error) as e:
        raise ModelSourceError(f"cannot fetch {source.location}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
