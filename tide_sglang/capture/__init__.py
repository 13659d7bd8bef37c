"""Capture: the engine-agnostic record of what the target computed for accepted tokens."""

from tide_sglang.capture.record import HIDDEN_DTYPES, CaptureBatch

__all__ = ["HIDDEN_DTYPES", "CaptureBatch"]
