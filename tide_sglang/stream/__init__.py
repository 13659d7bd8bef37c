"""Stream: the Redis Streams transport of captured hidden states (engine -> trainer)."""

from tide_sglang.stream.codec import CodecError, decode, encode
from tide_sglang.stream.connection import RedisUnavailable, connect
from tide_sglang.stream.reader import ReaderStats, StreamEntry, StreamReader
from tide_sglang.stream.writer import StreamWriter, WriterStats

__all__ = [
    "CodecError",
    "ReaderStats",
    "RedisUnavailable",
    "StreamEntry",
    "StreamReader",
    "StreamWriter",
    "WriterStats",
    "connect",
    "decode",
    "encode",
]
