"""`DraftRegistry`: versioned drafts, safetensors only, never pickle, in one of two stores behind one interface.

    <root>/v000007/config.json          SGLang's config (a valid --speculative-draft-model-path directory)
                  /model.safetensors    EAGLE-3 names, no embed_tokens
                  /manifest.json        version, parent, created, sha256 of every file, tensor shapes and dtypes,
                                        draft vocab hash, metrics (held-out acceptance of this and its parent)

    <root>/profiles/<target>__<gpu>__sglang-<version>.json
                                        cost profiles of the speculation controller (`tide profile`), one per target,
                                        GPU name and SGLang version: the same for every version of the draft lineage
                                        to first order (a draft step's cost is its shape, not its weights)

`<root>` is a directory (`DirectoryRegistry`: a ReadWriteMany volume) or a prefix of an S3-compatible bucket
(`S3Registry`, draft/s3.py); `open_registry` resolves a location (a path, `file://`, `s3://bucket/prefix`) to one.
Both keep the same promises: a version is visible only once complete (the directory renames a finished temporary
directory to `v000007`; S3 writes the manifest last), a publish killed half way leaves no visible version, two
publishers never take the same number (the loser of the rename, or of the conditional write that claims the
number on S3, takes the next one), and every loader verifies checksums, config, shapes and vocabulary first on a
local copy (`verify()`; S3 downloads the version to local disk first). All versions of one registry are one
lineage and share one draft vocabulary. Version 0 is the imported initial draft (`tide import`,
`store_initial`); the trainer publishes 1, 2, ... Retention is the operator's (`delete`).
"""

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from tide_sglang.draft.config import DraftConfig
from tide_sglang.draft.model import Eagle3Draft, checkpoint_dtype, checkpoint_shapes
from tide_sglang.draft.vocab import DraftVocab

FORMAT = 1
PROFILES = "profiles"  # cost profiles beside the versions (ProfileKey)
WEIGHTS, CONFIG, MANIFEST = "model.safetensors", "config.json", "manifest.json"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64",
                torch.bool: "BOOL"}


class DraftVerificationError(RuntimeError):
    """A stored version is not safe to load; the message names the version, the file and what is wrong."""


class VocabMismatch(ValueError):
    """A draft's vocabulary differs from the lineage's (SGLang bakes it into CUDA graphs: it cannot change)."""


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sha256: str
    bytes: int


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    shape: list[int]
    dtype: str  # safetensors dtype name: BF16, F32, I64, BOOL ...


class DraftMetrics(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    accept_length: float | None = Field(None, description="held-out expected acceptance length of this version")
    parent_accept_length: float | None = Field(None, description="the parent's, on the same held-out rows")
    heldout_tokens: int = Field(0, ge=0, description="held-out rows both were scored on")
    training_tokens: int = Field(0, ge=0, description="captured rows trained on in this lineage so far")
    steps: int = Field(0, ge=0, description="optimizer steps in this lineage so far")
    domains: dict[str, int] = Field(default_factory=dict, description="training rows per workload tag")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format: int = FORMAT
    version: int = Field(ge=0, description="0: the imported initial draft")
    parent: int | None = None
    created: str
    vocab_sha256: str
    files: dict[str, FileEntry]
    tensors: dict[str, TensorSpec]
    metrics: DraftMetrics = Field(default_factory=DraftMetrics)


class VerifiedDraft(BaseModel):
    """What `verify()` vouches for: enough to allocate, check and copy the weights in place."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int
    path: Path
    weights_path: Path
    config: DraftConfig
    manifest: Manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ProfileKey(BaseModel):
    """What a cost profile depends on: the target model, the GPU (its name, as torch or nvidia-smi reports it) and
    the SGLang version; the draft's shape follows from the target."""

    model_config = ConfigDict(frozen=True)

    target: str
    gpu: str
    sglang: str

    def file_name(self) -> str:
        """A file / object name: each part with every run of characters outside [A-Za-z0-9._-] as one '-'."""
        def slug(text: str) -> str:
            return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "unknown"

        return f"{slug(self.target)}__{slug(self.gpu)}__sglang-{slug(self.sglang)}.json"


class DraftRegistry(ABC):
    """The interface every store implements; publishing, verifying and loading are shared, the store supplies
    listing, reading a manifest, committing a finished version, staging one onto local disk, and deleting."""

    location: str  # where it lives, for messages: a directory or s3://bucket/prefix

    # -- what a store implements ---------------------------------------------------------------------------

    @abstractmethod
    def versions(self) -> list[int]:
        """Complete versions (those with a manifest), ascending."""

    @abstractmethod
    def _read_manifest(self, version: int) -> bytes:
        """The manifest's bytes; FileNotFoundError when the version has none."""

    @abstractmethod
    def _scratch(self) -> Path:
        """A new local temporary directory where a publish writes its files."""

    @abstractmethod
    def _commit(self, tmp: Path, version: int) -> bool:
        """Make the files in `tmp` (manifest included) version `version`, atomically; False when the number is
        taken by another publisher."""

    @abstractmethod
    def stage(self, version: int) -> Path:
        """A local directory holding the version's files, not yet verified (`verify()` stages, then checks)."""

    @abstractmethod
    def delete(self, version: int, *, in_use: set[int] | frozenset[int] = frozenset()) -> None:
        """Remove `version` (the operator's retention decides which); refuses one in `in_use` (the control state's
        stable and canary), and never leaves a half-deleted version visible."""

    @abstractmethod
    def remove_stale_tmp(self, stale_s: float = 3600.0) -> list[str]:
        """Remove what publishers or deletes killed half way left behind, older than `stale_s`; their names."""

    @abstractmethod
    def _read_profile(self, name: str) -> bytes:
        """The bytes of profiles/<name>; FileNotFoundError when absent."""

    @abstractmethod
    def _write_profile(self, name: str, body: bytes) -> None:
        """Replace profiles/<name> atomically (a reader sees the old file or the new one, never a part)."""

    # -- cost profiles ---------------------------------------------------------------------------------------

    def get_profile(self, key: "ProfileKey") -> str | None:
        """The stored profile JSON for this target, GPU and SGLang version; None when none was stored."""
        try:
            return self._read_profile(key.file_name()).decode()
        except FileNotFoundError:
            return None

    def put_profile(self, key: "ProfileKey", text: str) -> None:
        self._write_profile(key.file_name(), text.encode())

    # -- reading -------------------------------------------------------------------------------------------

    def latest(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def get(self, version: int) -> Manifest:
        """The manifest of `version` (not verified: call `verify()` before loading weights)."""
        label = f"{self.location}/v{version:06d}/{MANIFEST}"
        try:
            return Manifest.model_validate_json(self._read_manifest(version))
        except FileNotFoundError:
            raise DraftVerificationError(f"draft v{version}: {label} does not exist") from None
        except ValidationError as e:
            raise DraftVerificationError(f"draft v{version}: {label} is not a valid manifest: {e}") from None

    def vocab_sha256(self) -> str | None:
        """The lineage's draft vocabulary (every version carries the same one), None while empty."""
        latest = self.latest()
        return None if latest is None else self.get(latest).vocab_sha256

    def check_vocab(self, vocab: DraftVocab) -> None:
        lineage = self.vocab_sha256()
        if lineage is not None and lineage != vocab.sha256():
            raise VocabMismatch(
                f"draft vocabulary {vocab.sha256()[:12]} differs from the lineage's {lineage[:12]} in "
                f"{self.location}: SGLang bakes the vocabulary into its CUDA graphs, so it is fixed within a lineage "
                "(start a new registry for a new vocabulary)")

    # -- publishing ----------------------------------------------------------------------------------------

    def publish(self, draft: Eagle3Draft, *, parent: int | None = None,
                metrics: DraftMetrics | None = None) -> Manifest:
        """Store `draft` as the next version (1 or more), atomically; returns its manifest."""
        return self._store(draft.config, draft.vocab, draft.draft_tensors(), parent, metrics or DraftMetrics())

    def store_initial(self, config: DraftConfig, vocab: DraftVocab, tensors: dict[str, torch.Tensor]) -> Manifest:
        """Store an imported draft as version 0: the start of the lineage, so the registry must be empty."""
        if self.versions():
            raise ValueError(f"draft registry {self.location} already holds versions {self.versions()}: a lineage "
                             "starts once; import into a new registry")
        return self._store(config, vocab, tensors, None, DraftMetrics(), version=0)

    def _store(self, config: DraftConfig, vocab: DraftVocab, tensors: dict[str, torch.Tensor], parent: int | None,
               metrics: DraftMetrics, version: int | None = None) -> Manifest:
        """Write the files into a local temporary directory, then commit them as the version (the next free one
        when None; another publisher taking a number makes this one try the next)."""
        self.check_vocab(vocab)
        tmp = self._scratch()
        try:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
            config.write(tmp)
            files = {name: FileEntry(sha256=_sha256(tmp / name), bytes=(tmp / name).stat().st_size)
                     for name in (CONFIG, WEIGHTS)}
            specs = {name: TensorSpec(shape=list(t.shape), dtype=_DTYPE_NAMES[t.dtype]) for name, t in tensors.items()}
            number = version if version is not None else (self.latest() or 0) + 1
            while True:
                manifest = Manifest(version=number, parent=parent, vocab_sha256=vocab.sha256(),
                                    created=datetime.now(UTC).isoformat(timespec="seconds"), files=files,
                                    tensors=specs, metrics=metrics)
                (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
                if self._commit(tmp, number):
                    return manifest
                if version is not None:
                    raise ValueError(f"draft v{version} already exists in {self.location}")
                number = max(number, self.latest() or 0) + 1  # another publisher took this number
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- verifying and loading -----------------------------------------------------------------------------

    def verify(self, version: int) -> VerifiedDraft:
        """Stage the version locally, then check checksums, config, tensor names/shapes/dtypes and the vocabulary
        hash of that local copy; raise `DraftVerificationError` on any mismatch, whatever the files hold."""
        return self._verified(version)[0]

    def load_tensors(self, version: int, device: str = "cpu") -> tuple[VerifiedDraft, dict[str, torch.Tensor]]:
        """Verify, then the checkpoint tensors (SGLang names) for an in-place copy, deserialized from the very bytes
        that were hashed: a file replaced between the check and the load cannot slip in."""
        verified, tensors = self._verified(version)
        return verified, {k: v.to(device) for k, v in tensors.items()}

    def load(self, version: int, embed: torch.Tensor, device: str = "cpu") -> Eagle3Draft:
        """Verify, then build the draft on `device` with the target's embedding [V, H]."""
        verified, tensors = self.load_tensors(version)
        return Eagle3Draft.from_tensors(verified.config, tensors, embed).to(device)

    def _verified(self, version: int) -> tuple[VerifiedDraft, dict[str, torch.Tensor]]:
        """Read each file once (no symlinks, nothing outside the version directory), hash those bytes, then parse
        them; every failure of any kind is a `DraftVerificationError` naming the version and the file."""
        path = self.stage(version)
        label = f"draft v{version} ({self.location})"

        def fail(what: str) -> DraftVerificationError:
            return DraftVerificationError(f"{label}: {what}")

        try:
            manifest = Manifest.model_validate_json(_read_plain(path, MANIFEST))
        except FileNotFoundError:
            raise fail(f"{MANIFEST} is missing") from None
        except ValidationError as e:
            raise fail(f"{MANIFEST} is not a valid manifest: {e}") from None
        except OSError as e:
            raise fail(f"{MANIFEST} cannot be read: {e}") from None
        if manifest.version != version:
            raise fail(f"manifest says version {manifest.version}")
        data = verified_bytes(path, manifest, label)
        try:
            config = DraftConfig.from_sglang(json.loads(data[CONFIG]))
        except Exception as e:  # any JSON value may be there (a list, a string): every parse error is a refusal
            raise fail(f"config.json is not a valid draft config: {type(e).__name__}: {e}") from None
        try:
            tensors = safetensors_load(data[WEIGHTS])
        except Exception as e:  # safetensors raises its own error types on a malformed file
            raise fail(f"{WEIGHTS} is not a readable safetensors file: {e}") from None
        _check_tensors(tensors, config, manifest, fail)
        return VerifiedDraft(version=version, path=path, weights_path=path / WEIGHTS, config=config,
                             manifest=manifest), tensors

    # Last in the class body: once defined, the name `list` inside the class would shadow the builtin.
    def list(self) -> list[Manifest]:
        """Manifests of every stored version, oldest first."""
        return [self.get(v) for v in self.versions()]


def _check_tensors(tensors: dict[str, torch.Tensor], config: DraftConfig, manifest: Manifest,
                   fail: Callable[[str], DraftVerificationError]) -> None:
    expected = {name: TensorSpec(shape=list(shape), dtype=_DTYPE_NAMES[checkpoint_dtype(name, config)])
                for name, shape in checkpoint_shapes(config).items()}
    if manifest.tensors != expected:
        names = set(manifest.tensors) | set(expected)
        wrong = sorted(n for n in names if manifest.tensors.get(n) != expected.get(n))
        raise fail(f"manifest tensors disagree with config.json: {wrong}")
    stored = {name: TensorSpec(shape=list(t.shape), dtype=_DTYPE_NAMES.get(t.dtype, str(t.dtype)))
              for name, t in tensors.items()}
    if stored != expected:
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        bad = sorted(n for n in set(stored) & set(expected) if stored[n] != expected[n])
        raise fail(f"weights disagree with config.json: missing {missing}, unexpected {extra}, "
                   f"wrong shape/dtype {[(n, stored[n].shape, stored[n].dtype) for n in bad]}")
    try:
        vocab = DraftVocab.from_d2t(tensors["d2t"], config.vocab_size)
    except (ValueError, RuntimeError) as e:
        raise fail(f"d2t is not a valid vocabulary map: {e}") from None
    if vocab.sha256() != manifest.vocab_sha256:
        raise fail("d2t does not match the manifest's vocabulary hash")


class DirectoryRegistry(DraftRegistry):
    """Versions in a directory (a ReadWriteMany volume); a publish in progress is `<root>/.tmp-<random>/`, never
    listed, removed by remove_stale_tmp()."""

    def __init__(self, root: Path | str, *, create: bool = False) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise FileNotFoundError(f"draft registry {self.root} does not exist (create it, or mount the volume)")

    def path(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def versions(self) -> list[int]:
        found = (_VERSION_DIR.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def _read_manifest(self, version: int) -> bytes:
        return (self.path(version) / MANIFEST).read_bytes()

    def _scratch(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))  # same file system: the rename is atomic

    def _commit(self, tmp: Path, version: int) -> bool:
        """fsync the files, then rename the directory: a rename onto an existing version fails."""
        for name in (CONFIG, WEIGHTS, MANIFEST):
            with (tmp / name).open("rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        try:
            tmp.rename(self.path(version))
        except OSError:
            if not self.path(version).exists():
                raise
            return False
        _fsync_dir(self.root)
        return True

    def stage(self, version: int) -> Path:
        """The version's own directory: a mounted volume is local disk already."""
        if not self.path(version).is_dir():
            raise DraftVerificationError(f"draft v{version} does not exist in {self.root}")
        return self.path(version)

    def delete(self, version: int, *, in_use: set[int] | frozenset[int] = frozenset()) -> None:
        """Renamed first, so a delete killed half way never leaves a half-deleted version."""
        if version in in_use:
            raise ValueError(f"draft v{version} is in use ({sorted(in_use)}): not deleted")
        if not self.path(version).is_dir():
            raise FileNotFoundError(f"draft v{version} does not exist in {self.root}")
        doomed = self.root / f".tmp-delete-v{version:06d}"
        self.path(version).rename(doomed)
        shutil.rmtree(doomed)

    def remove_stale_tmp(self, stale_s: float = 3600.0) -> list[str]:
        stale = [tmp for tmp in self.root.glob(".tmp-*") if time.time() - tmp.stat().st_mtime > stale_s]
        for tmp in stale:
            shutil.rmtree(tmp, ignore_errors=True)
        return [tmp.name for tmp in stale]


    def _read_profile(self, name: str) -> bytes:
        return (self.root / PROFILES / name).read_bytes()

    def _write_profile(self, name: str, body: bytes) -> None:
        """A temporary file in the same directory, fsynced, renamed over the old one."""
        directory = self.root / PROFILES
        directory.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, directory / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(directory)


def open_registry(location: str | Path, *, create: bool = False) -> DraftRegistry:
    """The one place a registry location is parsed: a directory path, `file:///path`, or `s3://bucket/prefix`
    (endpoint and credentials from the standard AWS_* variables, draft/s3.py). `create`: make a missing directory
    (a new lineage); an S3 prefix needs no creating, its bucket must exist."""
    text = str(location)
    parts = urlsplit(text)
    if parts.scheme == "s3":
        from tide_sglang.draft.s3 import S3Registry  # boto3: imported only for an S3 registry

        if not parts.netloc:
            raise ValueError(f"registry {text!r}: an S3 location is s3://bucket/prefix")
        return S3Registry(parts.netloc, parts.path.strip("/"))
    if parts.scheme == "file":
        return DirectoryRegistry(Path(parts.path), create=create)
    if parts.scheme:
        raise ValueError(f"registry {text!r}: expected a directory, file:///path or s3://bucket/prefix")
    return DirectoryRegistry(Path(text), create=create)


def _read_plain(directory: Path, name: str) -> bytes:
    """A regular file directly in `directory`, read once; a symlink (the file or the directory) is refused, so
    nothing outside the version is ever read."""
    if directory.is_symlink():
        raise OSError(f"{directory} is a symlink")
    fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW)  # ELOOP on a symlink
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{directory / name} is not a regular file")
        return f.read()


def verified_bytes(path: Path, manifest: Manifest, label: str | None = None) -> dict[str, bytes]:
    """The files a manifest lists, each read once and checked against its size and sha256; the caller parses
    these bytes, never the files again. Raise `DraftVerificationError`."""
    label = label or str(path)
    if set(manifest.files) != {CONFIG, WEIGHTS}:
        raise DraftVerificationError(f"{label}: manifest lists files {sorted(manifest.files)}, expected "
                                     f"{[CONFIG, WEIGHTS]}")
    out = {}
    for name, entry in manifest.files.items():
        try:
            data = _read_plain(path, name)
        except FileNotFoundError:
            raise DraftVerificationError(f"{label}: {name} is missing") from None
        except OSError as e:
            raise DraftVerificationError(f"{label}: {name} is refused: {e}") from None
        if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise DraftVerificationError(f"{label}: {name} does not match its sha256 in the manifest "
                                         "(corrupted or modified)")
        out[name] = data
    return out
