"""Capture: the engine-agnostic record of what the target computed for accepted tokens."""

from tide_sglang.capture.record import DEFAULT_DOMAIN, DOMAIN_MAX, HIDDEN_DTYPES, CaptureBatch, is_domain_label

__all__ = ["DEFAULT_DOMAIN", "DOMAIN_MAX", "HIDDEN_DTYPES", "CaptureBatch", "is_domain_label"]
