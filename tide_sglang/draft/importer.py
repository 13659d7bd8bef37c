"""`tide import`: a user's EAGLE-3 draft becomes version 0 of a registry, the lineage the trainer continues.

Sources, told apart by their files:
- a TIDE version (`manifest.json` beside `config.json` and `model.safetensors`): checked against its manifest;
- SGLang's EAGLE-3 format (`config.json` naming `LlamaForCausalLMEagle3`, safetensors): SpecForge's SGLang export
  (`to_sglang`), public EAGLE-3 drafts, and SpecForge's HF export (`to_hf`), whose `embed_tokens.weight` (the
  target's embedding) is dropped. `d2t` in SGLang's offset form, or none: the draft proposes the whole vocabulary.

Weights are read from safetensors only (never pickle). The draft keeps its vocabulary, weights and dtype: SGLang
serves it unchanged, and every later version of the lineage has the same tensors.
"""

import json
import logging
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file

from tide_sglang.draft.config import DraftConfig
from tide_sglang.draft.model import checkpoint_dtype, checkpoint_shapes
from tide_sglang.draft.registry import CONFIG, MANIFEST, DraftRegistry, Manifest, verified_bytes
from tide_sglang.draft.vocab import DraftVocab

log = logging.getLogger("tide.draft.import")

DROPPED = ("embed_tokens.weight",)  # the target's embedding: SGLang shares it, a checkpoint never carries it


class DraftImportError(ValueError):
    """The source is not a draft TIDE can import; the message says what is missing or wrong."""


class SourceDraft(BaseModel):
    """A draft read from a source directory, in TIDE's checkpoint names and dtypes."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    format: str  # "tide", "sglang" or "specforge-hf"
    config: DraftConfig
    vocab: DraftVocab
    tensors: dict[str, torch.Tensor]


def read_source(source: Path) -> SourceDraft:
    """Read and check a draft directory; raise `DraftImportError` naming every problem."""
    if not (source / CONFIG).is_file():
        raise DraftImportError(f"{source} has no {CONFIG}: not a draft checkpoint directory")
    files = sorted(source.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in source.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        raise DraftImportError(f"{source} has no safetensors weights" + (
            f" (only {pickled}: pickle files are never loaded; convert them to safetensors)" if pickled else ""))
    if (source / MANIFEST).is_file():
        verified_bytes(source, Manifest.model_validate_json((source / MANIFEST).read_bytes()))
    body = json.loads((source / CONFIG).read_text())
    try:
        config = DraftConfig.from_sglang(body)
    except ValueError as e:
        raise DraftImportError(f"{source / CONFIG}: {e}") from None
    raw: dict[str, torch.Tensor] = {}
    for file in files:
        raw.update(load_file(str(file)))
    fmt = "tide" if (source / MANIFEST).is_file() else "specforge-hf" if "embed_tokens.weight" in raw else "sglang"
    vocab = _vocab(raw, config)
    tensors = _checkpoint_tensors(raw, config, vocab)
    return SourceDraft(format=fmt, config=config, vocab=vocab, tensors=tensors)


def _vocab(raw: dict[str, torch.Tensor], config: DraftConfig) -> DraftVocab:
    if "d2t" not in raw:
        if config.draft_vocab_size != config.vocab_size:
            raise DraftImportError(f"no d2t, but draft_vocab_size {config.draft_vocab_size} != vocab_size "
                               f"{config.vocab_size}: without d2t the draft must cover the whole vocabulary")
        return DraftVocab(token_ids=torch.arange(config.vocab_size), vocab_size=config.vocab_size)
    try:
        vocab = DraftVocab.from_d2t(raw["d2t"], config.vocab_size)
    except ValueError as e:
        raise DraftImportError(f"d2t is not SGLang's offset form (d2t[i] = target id - i, ascending): {e}") from None
    if "t2d" in raw and not torch.equal(raw["t2d"].to(torch.bool), vocab.t2d):
        raise DraftImportError("t2d and d2t disagree: they name different draft vocabularies")
    return vocab


def _checkpoint_tensors(raw: dict[str, torch.Tensor], config: DraftConfig,
                        vocab: DraftVocab) -> dict[str, torch.Tensor]:
    renamed = {n.replace("layers.0.", "midlayer.", 1) if n.startswith("layers.0.") else n: t
               for n, t in raw.items() if n not in DROPPED}
    renamed |= {"d2t": vocab.d2t, "t2d": vocab.t2d}
    expected = checkpoint_shapes(config)
    missing, extra = sorted(set(expected) - set(renamed)), sorted(set(renamed) - set(expected))
    wrong = sorted(n for n in set(expected) & set(renamed) if tuple(renamed[n].shape) != expected[n])
    if missing or extra or wrong:
        hint = " (lm_head.weight missing: the draft reads the target's lm_head, which TIDE cannot train)" \
            if "lm_head.weight" in missing else ""
        raise DraftImportError(f"tensors do not fit config.json: missing {missing}, unknown {extra}, wrong shape "
                           f"{[(n, tuple(renamed[n].shape), expected[n]) for n in wrong]}{hint}")
    return {n: renamed[n].to(checkpoint_dtype(n, config)).contiguous() for n in expected}


def import_draft(source: Path, registry: DraftRegistry) -> Manifest:
    """Store the draft in `source` as version 0 of `registry` (which must be empty)."""
    draft = read_source(source)
    manifest = registry.store_initial(draft.config, draft.vocab, draft.tensors)
    log.info("imported %s draft %s as v0 (%d of %d tokens, %s)", draft.format, source, draft.vocab.size,
             draft.config.vocab_size, draft.config.torch_dtype)
    return manifest

