"""Draft: the EAGLE-3 draft model in SGLang's checkpoint format, its vocabulary, and the versioned registry."""

from tide_sglang.draft.config import DraftConfig
from tide_sglang.draft.model import DraftCache, DraftOutput, Eagle3Draft, init_draft
from tide_sglang.draft.registry import (
    DirectoryRegistry,
    DraftMetrics,
    DraftRegistry,
    DraftVerificationError,
    Manifest,
    ProfileKey,
    VerifiedDraft,
    VocabMismatch,
    open_registry,
)
from tide_sglang.draft.vocab import DraftVocab, select_vocab

__all__ = [
    "DirectoryRegistry",
    "DraftCache",
    "DraftConfig",
    "DraftMetrics",
    "DraftOutput",
    "DraftRegistry",
    "DraftVerificationError",
    "DraftVocab",
    "Eagle3Draft",
    "Manifest",
    "ProfileKey",
    "VerifiedDraft",
    "VocabMismatch",
    "init_draft",
    "open_registry",
    "select_vocab",
]
