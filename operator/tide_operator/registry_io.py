"""The registry adapter: the operator owns version retention, so it is the one that deletes registry versions.

It deletes only versions no DraftVersion names and older than the newest one named (a version published but not
yet ingested is newer than every DraftVersion), so nothing a DraftVersion names, and nothing still on its way
to one, is ever deleted. The operator reaches a registry given as `registry.url: file:///path` (a volume mounted
into the operator's pod as well, or a local directory), at the deployment's own `<path>/<namespace>/<name>`. A
registry on a PVC of the TideDeployment's namespace is not mounted into the operator, and the operator holds no
keys of an S3 registry, so there only DraftVersions are retired and the files stay.
"""

import logging
from typing import TYPE_CHECKING

from tide_operator.builders import registry_url
from tide_operator.models import RegistrySpec

if TYPE_CHECKING:
    from tide_sglang.draft import DraftRegistry

log = logging.getLogger(__name__)


def open_registry(namespace: str, name: str, spec: RegistrySpec) -> "DraftRegistry | None":
    """The deployment's registry when the operator can reach it, else None."""
    url = registry_url(namespace, name, spec)
    if url is None or not url.startswith("file://"):
        return None
    from tide_sglang.draft import open_registry  # torch: imported only where a registry is reachable

    try:
        return open_registry(url)
    except FileNotFoundError:
        return None  # the trainer creates it


def delete_unnamed(registry: "DraftRegistry", named: set[int]) -> list[int]:
    """Delete the stored versions no DraftVersion names, older than the newest named; returns those deleted."""
    deleted = []
    for v in registry.versions():
        if v in named or v >= max(named, default=0):
            continue
        try:
            registry.delete(v, in_use=named)  # the registry refuses a named version too
        except OSError as e:  # retried on the next pass: the rule is level-based
            log.warning("could not delete draft v%d from the registry %s: %s", v, registry.location, e)
            continue
        log.info("deleted draft v%d from the registry %s: no DraftVersion names it", v, registry.location)
        deleted.append(v)
    return deleted
