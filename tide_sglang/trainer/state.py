"""The trainer's own checkpoint: draft, AdamW moments, replay and held-out sequences, counters. No pickle.

    <dir>/ckpt-000000123-<ns>/state.json           TrainerState (counters, lineage, chunk index, optimizer groups)
                            /state.safetensors    draft.*, base.*, opt.<i>.<key>,
                                                  chunks.{hidden,tokens,positions,is_prompt}

Written aside and renamed, then older checkpoints are removed: a trainer killed at any moment restarts from the
newest complete one. Stream entries are acked only after the checkpoint that contains their rows is written, so
whatever Redis forgot (acked) is in the checkpoint, and whatever is not is still pending for this trainer.
"""

import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from tide_sglang.draft import DraftConfig
from tide_sglang.trainer.replay import Chunk

FORMAT = 2  # 2: chunks carry prompt flags and prompt keys
Store = Literal["recent", "reservoir", "heldout"]


class ChunkMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    length: int = Field(ge=1)
    rid: str
    prompt_key: str
    domain: str
    store: Store


class TrainerState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: int = FORMAT
    steps: int = 0
    trained_rows: int = 0
    ingested_rows: int = 0
    parent: int | None = Field(None, description="registry version the draft descends from (None: fresh)")
    config: DraftConfig
    vocab_sha256: str
    domains_trained: dict[str, int] = Field(default_factory=dict)
    reservoir_seen: dict[str, int] = Field(default_factory=dict)
    chunks: list[ChunkMeta] = Field(default_factory=list)
    optimizer_groups: list[dict[str, Any]] = Field(default_factory=list)
    contained_ids: list[str] = Field(default_factory=list, description="stream entries this checkpoint holds, "
                                     "acked right after it is written (again on resume, if the trainer died first)")


def pack_chunks(stored: list[tuple[Store, Chunk]]) -> tuple[list[ChunkMeta], dict[str, torch.Tensor]]:
    if not stored:
        return [], {}
    metas = [ChunkMeta(length=c.length, rid=c.rid, prompt_key=c.prompt_key, domain=c.domain, store=s)
             for s, c in stored]
    chunks = [c for _, c in stored]
    return metas, {
        "chunks.hidden": torch.cat([c.hidden for c in chunks]).contiguous(),  # [sum T, K*H]
        "chunks.tokens": torch.cat([c.tokens for c in chunks]),
        "chunks.positions": torch.cat([c.positions for c in chunks]),
        "chunks.is_prompt": torch.cat([c.is_prompt for c in chunks]),
    }


def unpack_chunks(metas: list[ChunkMeta], tensors: dict[str, torch.Tensor]) -> list[tuple[Store, Chunk]]:
    if not metas:
        return []
    lengths = [m.length for m in metas]
    parts = zip(*(torch.split(tensors[f"chunks.{k}"], lengths) for k in ("hidden", "tokens", "positions",
                                                                          "is_prompt")), strict=True)
    return [(m.store, Chunk(hidden=h, tokens=t, positions=p, is_prompt=f, rid=m.rid, prompt_key=m.prompt_key,
                            domain=m.domain))
            for m, (h, t, p, f) in zip(metas, parts, strict=True)]


def save(directory: Path, state: TrainerState, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{state.steps:09d}-{time.time_ns()}"
    tmp = directory / f".tmp-{name}"
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(state.model_dump_json() + "\n")
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    final = directory / name
    tmp.rename(final)
    for old in directory.iterdir():
        if old != final and (old.name.startswith("ckpt-") or old.name.startswith(".tmp-")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(directory: Path) -> tuple[TrainerState, dict[str, torch.Tensor]] | None:
    """The newest complete checkpoint, or None when there is none."""
    if not directory.is_dir():
        return None
    done = sorted(p for p in directory.glob("ckpt-*") if (p / "state.json").is_file())
    if not done:
        return None
    state = TrainerState.model_validate_json((done[-1] / "state.json").read_bytes())
    if state.format != FORMAT:
        raise ValueError(f"trainer checkpoint {done[-1]} has format {state.format}, this trainer reads {FORMAT}")
    return state, load_file(str(done[-1] / "state.safetensors"))
