"""kopf handlers: each a few lines over `Reconciler` (`kopf run -m tide_operator.handlers -A --standalone`).

Only TideDeployments are watched. DraftVersions, children and Redis are read afresh on every pass, so
the change handlers (fast reaction to a spec edit) and the timer (rollout progress, published versions,
pod readiness) share one idempotent code path.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import kopf
import kubernetes
from prometheus_client import start_http_server

from tide_operator import metrics
from tide_operator.config import FINALIZER, OperatorSettings
from tide_operator.kube import ApiError, Kube
from tide_operator.models import GROUP, VERSION
from tide_operator.reconcile import Reconciler

CONFIG = OperatorSettings()
TD = (GROUP, VERSION, "tidedeployments")


@kopf.on.startup()
def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: object) -> None:
    settings.persistence.finalizer = FINALIZER
    # Progress and diff-base in annotations: the CRD's status schema is strict, so the API server would
    # prune kopf's own status fields.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.scanning.disabled = True  # no CRD/namespace watching: fewer RBAC rights
    settings.posting.level = logging.WARNING
    snapshots = metrics.Snapshots(CONFIG.interval_s)
    memo.reconciler = Reconciler(Kube(login()), CONFIG, snapshots)
    if CONFIG.metrics_port:
        memo.metrics_server, _ = start_http_server(CONFIG.metrics_port, registry=metrics.registry(snapshots))


@kopf.on.cleanup()
def stop(memo: kopf.Memo, **_: object) -> None:
    server = memo.get("metrics_server")
    if server is not None:  # free the port: an operator started again in this process binds it anew
        server.shutdown()
        server.server_close()


def login() -> kubernetes.client.ApiClient:
    """The pod's service account in a cluster, else $KUBECONFIG (what kopf's own login does too)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return kubernetes.client.ApiClient()


@contextmanager
def retry_api_errors() -> Iterator[None]:
    """An API error (a conflict, the server busy) is retried by kopf after a delay; a wrong spec never gets
    here: it is a status condition."""
    try:
        yield
    except ApiError as e:
        raise kopf.TemporaryError(str(e), delay=10) from e


@kopf.on.resume(*TD)
@kopf.on.create(*TD)
@kopf.on.update(*TD)
def reconcile(namespace: str, name: str, memo: kopf.Memo, **_: object) -> None:
    with retry_api_errors():
        memo.reconciler.reconcile(namespace, name)


@kopf.timer(*TD, interval=CONFIG.interval_s)
def tick(namespace: str, name: str, memo: kopf.Memo, **_: object) -> None:
    memo.reconciler.reconcile(namespace, name, prune=False)


@kopf.on.delete(*TD)
def cleanup(namespace: str, name: str, memo: kopf.Memo, **_: object) -> None:
    with retry_api_errors():
        memo.reconciler.cleanup(namespace, name)
