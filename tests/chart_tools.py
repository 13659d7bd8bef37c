"""The real tools the chart tests drive: helm and kubectl (from scripts/ensure-helm.sh), promtool and prometheus
(Debian `prometheus`, from scripts/ensure-system.sh). Nothing here is mocked; only the cluster is absent."""

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts/tide"
TOOLS = ROOT / ".tools/bin"
# Every values file a user may pass: the examples in helm/ and chart-testing's ci/ files.
VALUES_FILES = sorted([*(ROOT / "helm").glob("values-*.yaml"), *(CHART / "ci").glob("*-values.yaml")])
NAMESPACE = "serving"  # the examples in helm/ install into this namespace
MONITORING_APIS = ("monitoring.coreos.com/v1/PodMonitor", "monitoring.coreos.com/v1/ServiceMonitor")


def helm_binary() -> Path:
    """.tools/bin/helm, installed on first use (idempotent); a clear failure when that is impossible."""
    helm = TOOLS / "helm"
    if not helm.exists():
        run = subprocess.run([str(ROOT / "scripts/ensure-helm.sh")], capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            pytest.fail(f"scripts/ensure-helm.sh could not install helm:\n{run.stderr}")
    return helm


def system_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make system` (scripts/ensure-system.sh installs the Debian "
                    f"package prometheus, which ships prometheus and promtool)")
    return path


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if check and run.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{run.stdout}\n{run.stderr}")
    return run


def template_args(values: list[Path] | None = None, sets: list[str] | None = None,
                  apis: tuple[str, ...] = MONITORING_APIS, namespace: str = NAMESPACE) -> list[str]:
    args = ["template", "tide", str(CHART), "--namespace", namespace]
    for f in values or []:
        args += ["-f", str(f)]
    for s in sets or []:
        args += ["--set", s]
    for api in apis:
        args += ["--api-versions", api]
    return args


def render(values: list[Path] | None = None, sets: list[str] | None = None,
           apis: tuple[str, ...] = MONITORING_APIS, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """`helm template` parsed into objects."""
    out = helm(*template_args(values, sets, apis), *extra).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def render_error(sets: list[str], values: list[Path] | None = None) -> str:
    """stderr of a `helm template` that must fail."""
    run = helm(*template_args(values, sets), check=False)
    assert run.returncode != 0, f"helm template with {sets} should have failed:\n{run.stdout[:2000]}"
    return run.stderr


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
    """The real kubectl from the same layer as helm; only offline commands (no cluster is reachable)."""
    helm_binary()  # installs both
    run = subprocess.run([str(TOOLS / "kubectl"), *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={"KUBECONFIG": "/nonexistent", "PATH": "/usr/bin:/bin"})
    if run.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed:\n{run.stderr}")
    return run
