"""Which SGLang releases the plugin supports, read from installed metadata (never by importing SGLang)."""

from importlib.metadata import PackageNotFoundError, version

# 0.5.17 is the newest release pinned to torch 2.11 (the GPU machines'); 0.5.23 is the one read for DESIGN.md.
# Every hook target has the same path in all of them (0.5.17's verify lacks pp_proxy_tensors; the hooks take
# *args/**kwargs after the arguments they read).
OLDEST, NEWEST = (0, 5, 17), (0, 5, 23)
SUPPORTED_RANGE = "0.5.17 through 0.5.23"


class UnsupportedSGLang(RuntimeError):
    """SGLang is missing or its version is outside the supported range; the message says which and what to do."""


def parse(text: str) -> tuple[int, int, int] | None:
    parts = text.split("+")[0].split(".")[:3]
    try:
        major, minor, patch = (int("".join(c for c in p if c.isdigit()) or "x") for p in parts)
    except ValueError:
        return None
    return major, minor, patch


def installed() -> str | None:
    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


def check(text: str | None) -> str:
    """`text` if it names a supported release; raise `UnsupportedSGLang` otherwise."""
    if text is None:
        raise UnsupportedSGLang(
            f"SGLang is not installed: install a supported release ({SUPPORTED_RANGE}), "
            "e.g. pip install 'sglang==0.5.23' (or 0.5.17 on torch 2.11)"
        )
    parsed = parse(text)
    if parsed is None or not OLDEST <= parsed <= NEWEST:
        raise UnsupportedSGLang(
            f"SGLang {text} is not supported by the TIDE plugin (supported: {SUPPORTED_RANGE}); "
            "its hook targets were not checked against this release"
        )
    return text
