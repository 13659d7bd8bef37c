"""`DraftRegistry`: versioned drafts in a directory (a PVC in production), safetensors only, never pickle.

    <root>/v000007/config.json          SGLang's config (a valid --speculative-draft-model-path directory)
                  /model.safetensors    EAGLE-3 names, no embed_tokens
                  /manifest.json        version, parent, created, sha256 of every file, tensor shapes and dtypes,
                                        draft vocab hash, metrics (held-out acceptance of this and its parent)
    <root>/.tmp-<random>/               a publish in progress: never listed, removed by remove_stale_tmp()

Publish writes everything into a temporary directory, fsyncs it, then renames it to the next version: a publish
killed half way leaves no visible version, and two publishers can never take the same number (the rename of a
directory onto an existing one fails, and the loser takes the next number). All versions of one registry are
one lineage and share one draft vocabulary. Version 0 is the imported initial draft (`tide import`, `store_initial`);
the trainer publishes 1, 2, ... Every loader calls `verify()` first. Retention is the operator's (`delete`).
"""

import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tide_sglang.draft.config import DraftConfig
from tide_sglang.draft.model import Eagle3Draft, checkpoint_dtype, checkpoint_shapes
from tide_sglang.draft.vocab import DraftVocab

FORMAT = 1
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


class DraftRegistry:
    def __init__(self, root: Path | str, *, create: bool = False) -> None:
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise FileNotFoundError(f"draft registry {self.root} does not exist (create it, or mount the volume)")

    # -- reading -------------------------------------------------------------------------------------------

    def path(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def versions(self) -> list[int]:
        found = (_VERSION_DIR.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def get(self, version: int) -> Manifest:
        """The manifest of `version` (not verified: call `verify()` before loading weights)."""
        path = self.path(version) / MANIFEST
        try:
            return Manifest.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise DraftVerificationError(f"draft v{version}: {path} does not exist") from None
        except ValidationError as e:
            raise DraftVerificationError(f"draft v{version}: {path} is not a valid manifest: {e}") from None

    def vocab_sha256(self) -> str | None:
        """The lineage's draft vocabulary (every version carries the same one), None while empty."""
        latest = self.latest()
        return None if latest is None else self.get(latest).vocab_sha256

    def check_vocab(self, vocab: DraftVocab) -> None:
        lineage = self.vocab_sha256()
        if lineage is not None and lineage != vocab.sha256():
            raise VocabMismatch(
                f"draft vocabulary {vocab.sha256()[:12]} differs from the lineage's {lineage[:12]} in {self.root}: "
                "SGLang bakes the vocabulary into its CUDA graphs, so it is fixed within a lineage "
                "(start a new registry for a new vocabulary)")

    # -- publishing ----------------------------------------------------------------------------------------

    def publish(self, draft: Eagle3Draft, *, parent: int | None = None,
                metrics: DraftMetrics | None = None) -> Manifest:
        """Store `draft` as the next version (1 or more), atomically; returns its manifest."""
        return self._store(draft.config, draft.vocab, draft.draft_tensors(), parent, metrics or DraftMetrics())

    def store_initial(self, config: DraftConfig, vocab: DraftVocab, tensors: dict[str, torch.Tensor]) -> Manifest:
        """Store an imported draft as version 0: the start of the lineage, so the registry must be empty."""
        if self.versions():
            raise ValueError(f"draft registry {self.root} already holds versions {self.versions()}: a lineage "
                             "starts once; import into a new registry")
        return self._store(config, vocab, tensors, None, DraftMetrics(), version=0)

    def _store(self, config: DraftConfig, vocab: DraftVocab, tensors: dict[str, torch.Tensor], parent: int | None,
               metrics: DraftMetrics, version: int | None = None) -> Manifest:
        """Write into a temporary directory, fsync, rename to the version (the next free one when None)."""
        self.check_vocab(vocab)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
            config.write(tmp)
            files = {name: FileEntry(sha256=_sha256(tmp / name), bytes=(tmp / name).stat().st_size)
                     for name in (CONFIG, WEIGHTS)}
            specs = {name: TensorSpec(shape=list(t.shape), dtype=_DTYPE_NAMES[t.dtype]) for name, t in tensors.items()}
            while True:
                number = version if version is not None else (self.latest() or 0) + 1
                manifest = Manifest(version=number, parent=parent, vocab_sha256=vocab.sha256(),
                                    created=datetime.now(UTC).isoformat(timespec="seconds"), files=files,
                                    tensors=specs, metrics=metrics)
                (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
                for name in (CONFIG, WEIGHTS, MANIFEST):
                    with (tmp / name).open("rb") as f:
                        os.fsync(f.fileno())
                _fsync_dir(tmp)
                try:
                    tmp.rename(self.path(manifest.version))
                except OSError:
                    if not self.path(manifest.version).exists():
                        raise
                    if version is not None:
                        raise ValueError(f"draft v{version} already exists in {self.root}") from None
                    continue  # another publisher took this number: take the next
                _fsync_dir(self.root)
                return manifest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- verifying and loading -----------------------------------------------------------------------------

    def verify(self, version: int) -> VerifiedDraft:
        """Check checksums, config, tensor names/shapes/dtypes and the vocabulary hash; raise on any mismatch."""
        path = self.path(version)
        if not path.is_dir():
            raise DraftVerificationError(f"draft v{version} does not exist in {self.root}")
        manifest = self.get(version)

        def fail(what: str) -> DraftVerificationError:
            return DraftVerificationError(f"draft v{version} ({path}): {what}")

        if manifest.version != version:
            raise fail(f"manifest says version {manifest.version}")
        verify_files(path, manifest, f"draft v{version} ({path})")
        try:
            config = DraftConfig.read(path)
        except (ValueError, KeyError) as e:
            raise fail(f"config.json is not a valid draft config: {e}") from None
        self._check_tensors(path / WEIGHTS, config, manifest, fail)
        return VerifiedDraft(version=version, path=path, weights_path=path / WEIGHTS, config=config,
                             manifest=manifest)

    @staticmethod
    def _check_tensors(weights: Path, config: DraftConfig, manifest: Manifest,
                       fail: Callable[[str], DraftVerificationError]) -> None:
        expected = {name: TensorSpec(shape=list(shape), dtype=_DTYPE_NAMES[checkpoint_dtype(name, config)])
                    for name, shape in checkpoint_shapes(config).items()}
        if manifest.tensors != expected:
            names = set(manifest.tensors) | set(expected)
            wrong = sorted(n for n in names if manifest.tensors.get(n) != expected.get(n))
            raise fail(f"manifest tensors disagree with config.json: {wrong}")
        with safe_open(str(weights), framework="pt") as f:
            stored = {name: TensorSpec(shape=list(f.get_slice(name).get_shape()), dtype=f.get_slice(name).get_dtype())
                      for name in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
            if stored != expected:
                missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
                bad = sorted(n for n in set(stored) & set(expected) if stored[n] != expected[n])
                raise fail(f"weights disagree with config.json: missing {missing}, unexpected {extra}, "
                           f"wrong shape/dtype {[(n, stored[n].shape, stored[n].dtype) for n in bad]}")
            vocab = DraftVocab.from_d2t(f.get_tensor("d2t"), config.vocab_size)
        if vocab.sha256() != manifest.vocab_sha256:
            raise fail("d2t does not match the manifest's vocabulary hash")

    def load_tensors(self, version: int, device: str = "cpu") -> tuple[VerifiedDraft, dict[str, torch.Tensor]]:
        """Verify, then read the checkpoint tensors (SGLang names) for an in-place copy."""
        verified = self.verify(version)
        return verified, load_file(str(verified.weights_path), device=device)

    def load(self, version: int, embed: torch.Tensor, device: str = "cpu") -> Eagle3Draft:
        """Verify, then build the draft on `device` with the target's embedding [V, H]."""
        verified, tensors = self.load_tensors(version)
        return Eagle3Draft.from_tensors(verified.config, tensors, embed).to(device)

    # -- retention (the operator's) ------------------------------------------------------------------------

    def delete(self, version: int, *, in_use: set[int] | frozenset[int] = frozenset()) -> None:
        """Remove `version` (the operator's retention decides which); refuses one in `in_use` (the control state's
        stable and canary). Renamed first, so a delete killed half way never leaves a half-deleted version."""
        if version in in_use:
            raise ValueError(f"draft v{version} is in use ({sorted(in_use)}): not deleted")
        if not self.path(version).is_dir():
            raise FileNotFoundError(f"draft v{version} does not exist in {self.root}")
        doomed = self.root / f".tmp-delete-v{version:06d}"
        self.path(version).rename(doomed)
        shutil.rmtree(doomed)

    def remove_stale_tmp(self, stale_s: float = 3600.0) -> list[Path]:
        """Remove temporary directories older than `stale_s`: publishers or deletes killed half way."""
        stale = [tmp for tmp in self.root.glob(".tmp-*") if time.time() - tmp.stat().st_mtime > stale_s]
        for tmp in stale:
            shutil.rmtree(tmp, ignore_errors=True)
        return stale

    # Last in the class body: once defined, the name `list` inside the class would shadow the builtin.
    def list(self) -> list[Manifest]:
        """Manifests of every stored version, oldest first."""
        return [self.get(v) for v in self.versions()]


def verify_files(path: Path, manifest: Manifest, label: str | None = None) -> None:
    """The files a manifest lists are there, with their sizes and sha256; raise `DraftVerificationError`."""
    label = label or str(path)
    if set(manifest.files) != {CONFIG, WEIGHTS}:
        raise DraftVerificationError(f"{label}: manifest lists files {sorted(manifest.files)}, expected "
                                     f"{[CONFIG, WEIGHTS]}")
    for name, entry in manifest.files.items():
        file = path / name
        if not file.is_file():
            raise DraftVerificationError(f"{label}: {name} is missing")
        if file.stat().st_size != entry.bytes or _sha256(file) != entry.sha256:
            raise DraftVerificationError(f"{label}: {name} does not match its sha256 in the manifest "
                                         "(corrupted or modified)")
