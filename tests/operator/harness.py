"""pytest fixtures around tide_operator.emulator: the real kopf operator against kmock (an emulated Kubernetes
API). On top of the emulator's API-server bookkeeping, `ApiServer` here validates every stored TideDeployment and
DraftVersion against the generated CRDs, as a real server would: what it would refuse or prune fails the test.
"""

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock as km
import pytest
import pytest_asyncio
from tide_operator import emulator
from tide_operator.crds import KINDS

from tests.operator.crdcheck import errors, load_crds

CRDS = load_crds()


class ApiServer(emulator.ApiServer):
    """The emulator's API server, recording in `schema_errors` what a real one would refuse or silently drop."""

    schema_errors: list[str]

    async def _handle(self, request: km.Request) -> Any:
        response = await super()._handle(request)
        self._check_schema(request)
        return response

    def _check_schema(self, request: km.Request) -> None:
        if request.resource is None or request.resource.group != "tide.dev" \
                or request.action not in (km.action.CREATE, km.action.UPDATE):
            return
        name = request.name or (request.data or {}).get("metadata", {}).get("name")
        key = (request.resource, request.namespace, name)
        if key in self.objects and not self.objects[key].deleted:
            obj = json.loads(json.dumps(dict(self.objects[key].raw)))
            kind = obj.get("kind") or next(k.kind for k in KINDS if k.plural == request.resource.plural)
            self.schema_errors += [f"{kind} {name}: {e}" for e in errors(CRDS[kind], {**obj, "kind": kind})]


@pytest_asyncio.fixture(name="operator")
async def operator_fixture(kmock: ApiServer, tmp_path: Path) -> AsyncIterator[emulator.Operator]:
    kmock.schema_errors = []
    async with emulator.running_operator(kmock, tmp_path) as op:
        yield op
    assert not op.errors, op.errors
    assert not kmock.schema_errors, kmock.schema_errors[:5]


@pytest.fixture(name="cluster")
def cluster_fixture(kmock: ApiServer) -> emulator.Cluster:
    return emulator.Cluster(kmock)
