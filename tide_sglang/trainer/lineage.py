"""Which draft the trainer trains: the lineage it continues, a new one when the registry is empty, and the served
version it goes back to after a rollback."""

import logging

import torch

from tide_sglang.draft import DraftConfig, DraftRegistry, Eagle3Draft, init_draft, select_vocab
from tide_sglang.draft.target import TargetHeads, default_aux_layer_ids
from tide_sglang.rollout import ControlState
from tide_sglang.settings import TideSettings

log = logging.getLogger("tide.trainer")


class TrainerError(RuntimeError):
    """The trainer cannot run with these settings; the message is one line that says what to change."""


def start_version(registry: DraftRegistry, ctl: ControlState | None) -> int | None:
    """The version a trainer with no checkpoint continues: the `stable` one the operator serves when this registry
    has it (version 0, the imported draft, included), else the newest; None for an empty registry."""
    if ctl is not None and ctl.stable in registry.versions():
        return ctl.stable
    return registry.latest()


def check_lineage(settings: TideSettings, heads: TargetHeads, registry: DraftRegistry, config: DraftConfig) -> None:
    wanted = settings.train_draft_vocab_size
    if "train_draft_vocab_size" in settings.model_fields_set and wanted != config.draft_vocab_size:
        raise TrainerError(
            f"TIDE_TRAIN_DRAFT_VOCAB_SIZE={wanted} but the deployed lineage in {registry.location} has "
            f"{config.draft_vocab_size}: the vocabulary is fixed within a lineage (SGLang bakes it into CUDA "
            "graphs); unset it, or start a new registry")
    if tuple(heads.embed.shape) != (config.vocab_size, config.hidden_size):
        raise TrainerError(
            f"target {settings.target!r} has embedding {tuple(heads.embed.shape)} but the lineage's drafts "
            f"expect ({config.vocab_size}, {config.hidden_size}): wrong TIDE_TARGET for this registry")


def new_lineage_draft(settings: TideSettings, heads: TargetHeads, counts: torch.Tensor) -> Eagle3Draft:
    """A draft whose vocabulary is the most counted tokens, starting from the target's embedding, lm_head, norm."""
    cfg = heads.config
    size = min(settings.train_draft_vocab_size, cfg.vocab_size)
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    vocab = select_vocab(counts, size, always=[t for t in eos if t is not None])
    config = DraftConfig.from_target(cfg, size, default_aux_layer_ids(cfg.num_hidden_layers), torch_dtype="bfloat16")
    return init_draft(config, vocab, heads.embed, heads.lm_head, heads.norm)


def ancestors(registry: DraftRegistry, version: int) -> set[int]:
    """The versions `version` descends from (parent, grandparent, ...), as far as the registry keeps them."""
    out: set[int] = set()
    parent = registry.get(version).parent
    while parent is not None and parent not in out and parent in registry.versions():
        out.add(parent)
        parent = registry.get(parent).parent
    return out


def version_to_readopt(head: int | None, head_ancestors: set[int], head_was_routed: bool,
                       ctl: ControlState | None) -> int | None:
    """The served version the trainer must train from instead of its own head (None: keep training the head).

    `head`: the version the trainer's weights descend from (its last publish). The head being served (stable or
    canary) or still waiting for its canary on top of the stable version is normal. The trainer goes back to
    `stable` when the head was served and is no longer (a rolled-back canary or promotion), or when `stable` is a
    version the head does not descend from (a pin to another version)."""
    if ctl is None or head is None or head in (ctl.stable, ctl.canary):
        return None
    if ctl.stable not in head_ancestors or head_was_routed:
        return ctl.stable
    return None
