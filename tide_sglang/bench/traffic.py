"""Captured traffic without SGLang: greedy generations of a real target, cut into verify-step `CaptureBatch`es.

For trainer tests and `tide bench train`. Row p of a sequence is what a TIDE capture hook records: the target's
aux hidden state at position p and the token it emitted after it (x_{p+1}). Requests are interleaved the way a
batched engine emits them: one entry per verify step, holding `rows_per_step` accepted rows of each request.
"""

import hashlib
import itertools
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tide_sglang import keys
from tide_sglang.capture import CaptureBatch
from tide_sglang.draft import DirectoryRegistry
from tide_sglang.draft.target import MODEL_CACHE, Target, aux_hidden_states, heads_of
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamReader, StreamWriter, connect
from tide_sglang.trainer import DraftTrainer

TOPICS = ["the ocean", "a small robot", "bread baking", "the moon", "a lost key", "winter in a city", "bees",
          "a chess game", "trains", "a lighthouse", "volcanoes", "an old library", "rain", "coffee", "a violin",
          "mountains", "a garden", "the desert", "a clock", "friendship"]
TEMPLATES = ["Write a short story about {}.", "Explain {} to a child.", "List three facts about {}.",
             "Write a poem about {}."]


def prompts(n: int, offset: int = 0) -> list[str]:
    pairs = itertools.islice(itertools.cycle(itertools.product(TEMPLATES, TOPICS)), offset, offset + n)
    return [t.format(topic) for t, topic in pairs]


@torch.no_grad()
def generate(target: Target, texts: list[str], max_new: int, batch: int = 16) -> list[torch.Tensor]:
    """Greedy chat completions; returns each full sequence (prompt + generated, no padding) as [L] int64."""
    tok = target.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:  # some transformers releases load SmolLM2 without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    out: list[torch.Tensor] = []
    for i in range(0, len(texts), batch):
        enc = tok(_chats(target, texts[i : i + batch]), return_tensors="pt", padding=True).to(target.model.device)
        gen = target.model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                                    pad_token_id=tok.pad_token_id or tok.eos_token_id)
        for row, mask in zip(gen, enc.attention_mask, strict=True):
            seq = row[int((mask == 0).sum()) :].cpu()  # drop left padding
            out.append(seq[seq != tok.pad_token_id] if tok.pad_token_id is not None else seq)
    return out


def _chats(target: Target, texts: list[str]) -> list[str]:
    return [target.tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                 add_generation_prompt=True) for t in texts]


def prompt_lengths(target: Target, texts: list[str]) -> list[int]:
    """Tokens of each chat prompt, as `generate` feeds them: a sequence's rows below this are prompt rows."""
    return [len(ids) for ids in target.tokenizer(_chats(target, texts))["input_ids"]]


def cached_generate(target: Target, texts: list[str], max_new: int, batch: int = 16) -> list[torch.Tensor]:
    """`generate`, memoised on disk (greedy decoding is deterministic): CPU generation is the slow part of a run."""
    key = hashlib.sha256(json.dumps([target.name, texts, max_new]).encode()).hexdigest()[:16]
    path = MODEL_CACHE.parent / "traffic" / f"{key}.safetensors"
    if path.is_file():
        stored = load_file(str(path))
        return [stored[f"seq{i}"] for i in range(len(stored))]
    sequences = generate(target, texts, max_new, batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({f"seq{i}": s.contiguous() for i, s in enumerate(sequences)}, str(tmp))
    tmp.rename(path)
    return sequences


@torch.no_grad()
def batched_aux(target: Target, sequences: list[torch.Tensor], batch: int = 16) -> list[torch.Tensor]:
    """Aux hidden states [L, K*H] of each sequence, on the target's device, from right-padded batched forwards
    (causal: padding at the end changes nothing before it)."""
    out = []
    for i in range(0, len(sequences), batch):
        group = sequences[i : i + batch]
        ids = torch.nn.utils.rnn.pad_sequence(group, batch_first=True).to(target.model.device)  # [B, Lmax]
        aux, _ = aux_hidden_states(target, ids)  # [B, Lmax, K*H]
        out += [a[: s.numel()] for a, s in zip(aux, group, strict=True)]
    return out


def capture(target: Target, sequences: list[torch.Tensor], rids: list[str], prompt_lens: list[int], *,
            rows_per_step: int = 4, domain: str | None = None,
            dtype: torch.dtype = torch.bfloat16) -> list[CaptureBatch]:
    """One full target forward per sequence, then its rows cut into a prefill step (the prompt rows) and verify
    steps of `rows_per_step` generated rows, interleaved across requests."""
    aux = batched_aux(target, sequences)
    per_request = []
    for a, seq, p in zip(aux, sequences, prompt_lens, strict=True):
        n = seq.numel() - 1  # the last token has no successor yet
        positions = torch.arange(n)
        per_request.append((a[:n].to(dtype).cpu(), seq[1:], positions, positions < p))
    step_rows = [_steps(r[1].numel(), rows_per_step, p) for r, p in zip(per_request, prompt_lens, strict=True)]
    batches = []
    for step in range(max(len(s) for s in step_rows)):
        live = [k for k in range(len(sequences)) if step < len(step_rows[k])]
        parts = [tuple(t[step_rows[k][step]] for t in per_request[k]) for k in live]
        batches.append(CaptureBatch(
            rids=[rids[k] for k in live],
            req_index=torch.cat([torch.full((p[1].numel(),), i) for i, p in enumerate(parts)]),
            positions=torch.cat([p[2] for p in parts]), token_ids=torch.cat([p[1] for p in parts]),
            is_prompt=torch.cat([p[3] for p in parts]), hidden=torch.cat([p[0] for p in parts]),
            vocab_size=target.vocab_size, aux_layers=len(target.aux_layer_ids),
            domains=None if domain is None else [domain] * len(live)))
    return batches


def _steps(rows: int, rows_per_step: int, prompt_len: int) -> list[slice]:
    """The prompt rows in one step (the prefill), then decode steps of `rows_per_step` accepted rows."""
    first = min(max(1, prompt_len), rows)
    return [slice(0, first)] + [slice(s, s + rows_per_step) for s in range(first, rows, rows_per_step)]


def drain_into_trainer(settings: TideSettings, batches: list[CaptureBatch], registry: Path,
                       target: Target) -> tuple[DraftTrainer, float]:
    """Write the captures to the stream (untimed, as serving does), then `read_into_trainer` all of them."""
    size = sum(b.hidden.numel() * b.hidden.itemsize for b in batches)
    # A budget that holds every entry: MAXLEN must not trim what the trainer has not read yet.
    with StreamWriter.from_settings(settings, keys.hidden_states(settings.namespace, settings.deployment),
                                    budget_bytes=max(1 << 30, 2 * size)) as writer:
        for b in batches:
            while not writer.submit(b):  # a full queue drops the entry: wait for the writer thread instead
                writer.flush(60)
        writer.flush(60)
    return read_into_trainer(settings, registry, target, rows=sum(b.num_tokens for b in batches))


def read_into_trainer(settings: TideSettings, registry: Path, target: Target, *, rows: int | None = None,
                      idle_s: float = 5.0) -> tuple[DraftTrainer, float]:
    """A fresh trainer reads, decodes and stitches the stream: `rows` rows (an error if the stream runs dry
    first), or with `rows` None everything it holds (until nothing new came for `idle_s`); returns the trainer
    and the seconds that took. The last open sequences are closed: the traffic ends here."""
    reader = StreamReader(connect(settings), keys.hidden_states(settings.namespace, settings.deployment),
                          keys.dead_letter(settings.namespace, settings.deployment), "bench", count=64, block_ms=10)
    trainer = DraftTrainer(settings, DirectoryRegistry(registry, create=True), reader, heads_of(target.model))
    start = last = time.perf_counter()
    while rows is None or trainer.ingested_rows < rows:
        if trainer.poll():
            last = time.perf_counter()
        elif time.perf_counter() - last > idle_s:
            if rows is None:
                break
            raise RuntimeError(f"the stream holds {trainer.ingested_rows} of the {rows} rows written")
    trainer.close_sequences()  # the service closes them at each checkpoint
    return trainer, (last if rows is None else time.perf_counter()) - start  # not the final idle wait
