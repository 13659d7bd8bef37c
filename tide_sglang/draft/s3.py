"""`S3Registry`: the draft registry in an S3-compatible bucket (AWS S3, SeaweedFS, MinIO, Ceph RGW, GCS's XML API).

    s3://<bucket>/<prefix>/v000007/.claim            written first, only if absent: this publisher owns number 7
                          /v000007/config.json
                          /v000007/model.safetensors
                          /v000007/manifest.json     written last, only if absent: the version becomes visible

S3 has no rename, so a version becomes visible by its manifest alone: `versions()` lists the manifests, and a
publish killed half way leaves a claim and some files under a number no manifest names (never listed, removed by
`remove_stale_tmp`). Two publishers racing for a number both write the claim with `If-None-Match: *`; the server
refuses the second (412), which takes the next number, so neither overwrites the other's files. A server that
ignores the condition would let both in: the first publish of each registry checks that the server refuses a
second conditional write and fails loudly if it does not. Loading stages a version onto local disk (a fresh
download each time, into this registry's own cache directory), and `verify()` checks that local copy.

Endpoint and credentials come from boto3's standard variables (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION), which the operator sets from `spec.registry`. Every
store error is an `OSError` (`RegistryUnavailable` when the server cannot be reached), so callers that handle a
failing volume handle a failing bucket the same way.
"""

import json
import os
import re
import shutil
import tempfile
import time
import uuid
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tide_sglang.draft.registry import CONFIG, MANIFEST, PROFILES, WEIGHTS, DraftRegistry, DraftVerificationError

CLAIM = ".claim"
_VERSION_KEY = re.compile(r"^v(\d{6,})/(.+)$")
_TAKEN = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
STAGED_KEPT = 2  # staged versions kept on local disk: the one served and the one being swapped in


class RegistryUnavailable(OSError):
    """The object store cannot be reached (or failed mid-transfer); nothing became visible."""


def s3_client() -> Any:
    """A boto3 S3 client configured from the AWS_* variables. A custom endpoint (SeaweedFS, MinIO, an in-cluster
    gateway) gets path-style addressing: its host names carry no bucket subdomains. Checksums only where S3
    requires them: several S3-compatible servers reject the CRC headers newer clients add by default."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=60,
                    s3={"addressing_style": "path"} if endpoint else None,
                    request_checksum_calculation="when_required", response_checksum_validation="when_required")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _status(error: ClientError) -> str:
    return str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


class S3Registry(DraftRegistry):
    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None, cache_dir: Path | None = None) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = client or s3_client()
        if cache_dir is None:
            # Private: removed when this object is collected or Python exits. `tide serve` execs SGLang, which runs
            # no exit handlers, so the draft it staged for SGLang stays.
            self.cache = Path(tempfile.mkdtemp(prefix="tide-registry-"))
            weakref.finalize(self, shutil.rmtree, self.cache, True)
        else:
            self.cache = Path(cache_dir)
            self.cache.mkdir(parents=True, exist_ok=True)
        self._staged: list[int] = []
        self._conditional_checked = False
        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError as e:
            if _code(e) in _MISSING or _status(e) == "404" or _code(e) == "NoSuchBucket":
                raise FileNotFoundError(f"draft registry {self.location}: bucket {bucket!r} does not exist "
                                        "(create it first)") from None
            raise self._error("open", e) from None
        except (BotoCoreError, Boto3Error) as e:
            raise self._error("open", e) from None

    def _key(self, version: int, name: str) -> str:
        return f"{self.prefix}/v{version:06d}/{name}".lstrip("/")

    def _error(self, what: str, error: Exception) -> OSError:
        """A server-side failure (HTTP 5xx: InternalError, SlowDown, ... still there after boto3's retries) or no
        answer is RegistryUnavailable, which callers retry; any other refusal is a plain OSError. A SeaweedFS just
        restarted answers InternalError for a while (tests/test_draft_registry.py, stopped and restarted)."""
        if isinstance(error, ClientError) and not _status(error).startswith("5"):
            return OSError(f"draft registry {self.location}: {what}: {_code(error) or _status(error)}: {error}")
        return RegistryUnavailable(f"draft registry {self.location}: {what}: {error}")

    def _objects(self) -> dict[int, dict[str, float]]:
        """version -> {file name: last-modified time} of every object under the prefix."""
        out: dict[int, dict[str, float]] = {}
        start = f"{self.prefix}/" if self.prefix else ""
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for obj in page.get("Contents", []):
                    if m := _VERSION_KEY.match(obj["Key"][len(start):]):
                        out.setdefault(int(m.group(1)), {})[m.group(2)] = obj["LastModified"].timestamp()
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise self._error("list", e) from None
        return out

    def versions(self) -> list[int]:
        return sorted(v for v, files in self._objects().items() if MANIFEST in files)

    def _read_manifest(self, version: int) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(version, MANIFEST))["Body"].read()
        except ClientError as e:
            if _code(e) in _MISSING or _status(e) == "404":
                raise FileNotFoundError(self._key(version, MANIFEST)) from None
            raise self._error(f"read v{version} manifest", e) from None
        except (BotoCoreError, Boto3Error) as e:
            raise self._error(f"read v{version} manifest", e) from None

    def _read_profile(self, name: str) -> bytes:
        key = f"{self.prefix}/{PROFILES}/{name}".lstrip("/")
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as e:
            if _code(e) in _MISSING or _status(e) == "404":
                raise FileNotFoundError(key) from None
            raise self._error(f"read {key}", e) from None
        except (BotoCoreError, Boto3Error) as e:
            raise self._error(f"read {key}", e) from None

    def _write_profile(self, name: str, body: bytes) -> None:
        """One PUT: S3 replaces an object atomically."""
        key = f"{self.prefix}/{PROFILES}/{name}".lstrip("/")
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body)
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise self._error(f"write {key}", e) from None

    # -- publishing ----------------------------------------------------------------------------------------

    def _scratch(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="tide-publish-"))

    def _put_if_absent(self, key: str, body: bytes) -> bool:
        """Write `key` only if no object has that key; False when one has."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
        except ClientError as e:
            if _code(e) in _TAKEN or _status(e) in _TAKEN:
                return False
            raise
        return True

    def _check_conditional_writes(self) -> None:
        """Refuse a server that ignores If-None-Match: with it, two publishers could share a version number."""
        key = f"{self.prefix}/.tide-conditional-check-{uuid.uuid4().hex}".lstrip("/")
        try:
            first, second = self._put_if_absent(key, b"1"), self._put_if_absent(key, b"2")
        finally:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        if not first or second:
            raise OSError(f"draft registry {self.location}: the S3 server ignores conditional writes "
                          "(If-None-Match: *), so concurrent publishers could overwrite each other; use a server "
                          "that supports them (AWS S3, SeaweedFS, MinIO >= 2024-08)")
        self._conditional_checked = True

    def _commit(self, tmp: Path, version: int) -> bool:
        """Claim the number, upload the files, write the manifest last (both conditional)."""
        claim = json.dumps({"owner": uuid.uuid4().hex, "created": datetime.now(UTC).isoformat()}).encode()
        try:
            if not self._conditional_checked:
                self._check_conditional_writes()
            if not self._put_if_absent(self._key(version, CLAIM), claim):
                return False
            for name in (CONFIG, WEIGHTS):
                self.client.upload_file(str(tmp / name), self.bucket, self._key(version, name))
            return self._put_if_absent(self._key(version, MANIFEST), (tmp / MANIFEST).read_bytes())
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise self._error(f"publish v{version}", e) from None

    # -- staging -------------------------------------------------------------------------------------------

    def stage(self, version: int) -> Path:
        """Download the version into `<cache>/v000007` (a fresh copy every call: what is verified is what the store
        holds now); older staged versions beyond the newest STAGED_KEPT are removed."""
        tmp = Path(tempfile.mkdtemp(prefix=".stage-", dir=self.cache))
        try:
            (tmp / MANIFEST).write_bytes(self._read_manifest(version))
        except FileNotFoundError:
            shutil.rmtree(tmp)
            raise DraftVerificationError(f"draft v{version} does not exist in {self.location}") from None
        for name in (CONFIG, WEIGHTS):
            try:
                self.client.download_file(self.bucket, self._key(version, name), str(tmp / name))
            except ClientError as e:
                if not (_code(e) in _MISSING or _status(e) == "404"):
                    shutil.rmtree(tmp)
                    raise self._error(f"download v{version} {name}", e) from None
                # missing: verify() names the file
            except (BotoCoreError, Boto3Error) as e:
                shutil.rmtree(tmp)
                raise self._error(f"download v{version} {name}", e) from None
        dest = self.cache / f"v{version:06d}"
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        self._staged = [v for v in self._staged if v != version] + [version]
        for old in self._staged[:-STAGED_KEPT]:
            shutil.rmtree(self.cache / f"v{old:06d}", ignore_errors=True)
        self._staged = self._staged[-STAGED_KEPT:]
        return dest

    # -- retention -----------------------------------------------------------------------------------------

    def _delete_keys(self, keys: list[str]) -> None:
        for key in keys:
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def delete(self, version: int, *, in_use: set[int] | frozenset[int] = frozenset()) -> None:
        """The manifest goes first, so a delete killed half way leaves only an invisible remainder."""
        if version in in_use:
            raise ValueError(f"draft v{version} is in use ({sorted(in_use)}): not deleted")
        files = self._objects().get(version, {})
        if MANIFEST not in files:
            raise FileNotFoundError(f"draft v{version} does not exist in {self.location}")
        try:
            self._delete_keys([self._key(version, MANIFEST)])
            self._delete_keys([self._key(version, name) for name in files if name != MANIFEST])
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise self._error(f"delete v{version}", e) from None

    def remove_stale_tmp(self, stale_s: float = 3600.0) -> list[str]:
        """Numbers with objects but no manifest (a publish or delete killed half way), untouched for `stale_s`."""
        now = time.time()
        stale = [v for v, files in self._objects().items()
                 if MANIFEST not in files and now - max(files.values()) > stale_s]
        try:
            for version in stale:
                self._delete_keys([self._key(version, name) for name in self._objects().get(version, {})])
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise self._error("remove stale objects", e) from None
        return [f"v{v:06d}/" for v in stale]
