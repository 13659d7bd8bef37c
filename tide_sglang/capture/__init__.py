"""Capture: the engine-agnostic record of what the target computed for accepted tokens."""

from tide_sglang.capture.record import DEFAULT_DOMAIN, HIDDEN_DTYPES, CaptureBatch

__all__ = ["DEFAULT_DOMAIN", "HIDDEN_DTYPES", "CaptureBatch"]
