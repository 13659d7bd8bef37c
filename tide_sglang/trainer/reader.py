"""`CheckpointReader`: the stream reader for a consumer that acks at checkpoints, long after reading.

`StreamReader` resumes by re-reading this consumer's pending entries from id 0 until a read returns none; that
assumes each entry is acked before the next read. The trainer acks only once a checkpoint holds the entries, so
it would get the same pending entries on every read. Here the resume pass walks a cursor instead: each pending
entry is delivered once, then new entries follow.
"""

from tide_sglang.stream import StreamReader


class CheckpointReader(StreamReader):
    _cursor = "0"

    def _xreadgroup(self, start: str, block: int | None) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
        if start != "0":
            return super()._xreadgroup(start, block)
        raw = super()._xreadgroup(self._cursor, block)  # pending entries with an id after the cursor
        if raw:
            last = raw[-1][0]
            self._cursor = last.decode() if isinstance(last, bytes) else last
        return raw
