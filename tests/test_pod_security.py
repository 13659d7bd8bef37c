"""Every pod the chart renders and the operator builds passes the Pod Security Standard "restricted" profile (checked
on the rendered specs by tests/pss.py: no cluster runs here to enforce it), and that check does fail each control."""

import copy
from typing import Any

import pytest
import yaml
from tide_operator import builders
from tide_operator.status import parse

from tests.chart_tools import NAMESPACE, ROOT, VALUES_FILES, by_kind, render
from tests.pss import CONTROLS, pod_specs, restricted_violations

EXAMPLES = sorted((ROOT / "docs/examples").glob("tidedeployment-*.yaml"))


def _built(tds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The workloads the operator builds for these TideDeployments, by "td/kind/name"."""
    out = {}
    for td in tds:
        name = td["metadata"]["name"]
        spec, problems = parse(name, td["spec"])
        assert spec is not None and problems == [], (name, problems)
        for obj in builders.children(name, NAMESPACE, spec, operator_namespace="tide-system"):
            out[f"{name}/{obj['kind']}/{obj['metadata']['name']}"] = obj
    return out


def workloads() -> dict[str, dict[str, Any]]:
    """Chart renders (defaults with the chart's Redis, every values file) and what the operator builds from the
    TideDeployments they render and from docs/examples."""
    out: dict[str, dict[str, Any]] = {}
    renders = {"defaults+redis": render(sets=["redis.enabled=true"])}
    renders |= {p.name: render([p]) for p in VALUES_FILES}
    for label, objs in renders.items():
        out |= {f"{label}: {o['kind']}/{o['metadata']['name']}": o for o in objs}
        out |= {f"{label}: {k}": v for k, v in _built(by_kind(objs, "TideDeployment")).items()}
    for path in EXAMPLES:
        out |= {f"{path.name}: {k}": v for k, v in _built([yaml.safe_load(path.read_text())]).items()}
    return out


@pytest.fixture(scope="module")
def pods() -> dict[str, dict[str, Any]]:
    return {k: pod for k, obj in workloads().items() for pod in pod_specs(obj)}


def test_every_pod_passes_the_restricted_profile(pods: dict[str, dict[str, Any]]) -> None:
    assert len(pods) >= 20 and any("operator" in k for k in pods) and any("-redis" in k for k in pods), sorted(pods)
    failing = {k: v for k, pod in pods.items() if (v := restricted_violations(pod))}
    assert failing == {}


def test_pods_the_operator_builds_mount_no_service_account_token(pods: dict[str, dict[str, Any]]) -> None:
    built = {k: pod for k, pod in pods.items() if "/StatefulSet/" in k or "/Deployment/" in k}
    assert built and all(pod["automountServiceAccountToken"] is False for pod in built.values())


def test_every_container_has_cpu_and_memory_requests(pods: dict[str, dict[str, Any]]) -> None:
    """Defaults where a spec sets no resources (test_operator_builders checks them and their memory limits)."""
    for where, pod in pods.items():
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            res = c.get("resources") or {}
            assert {"cpu", "memory"} <= set(res.get("requests") or {}), f"{where}/{c['name']}"


def test_the_root_filesystem_is_read_only_and_caches_are_volumes(pods: dict[str, dict[str, Any]]) -> None:
    """SGLang, Triton, torch and the Hugging Face hub write under HOME and /tmp: both are emptyDirs in TIDE pods."""
    for where, pod in pods.items():
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, f"{where}/{c['name']}"
        if "/Deployment/" not in where:
            continue  # the chart's operator and Redis: /tmp or /data only
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert "emptyDir" in volumes[mounts["/tmp"]] and "emptyDir" in volumes[mounts[env["HOME"]]], where


_GOOD: dict[str, Any] = {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [{"name": "c", "image": "i", "securityContext": {"allowPrivilegeEscalation": False,
                                                                    "capabilities": {"drop": ["ALL"]}}}],
    "volumes": [{"name": "v", "emptyDir": {}}],
}


def _with(path: str, value: Any) -> dict[str, Any]:
    pod = copy.deepcopy(_GOOD)
    *parents, last = path.split(".")
    node: Any = pod
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    node[last] = value
    return pod


@pytest.mark.parametrize(("control", "path", "value"), [
    ("HostProcess", "securityContext.windowsOptions", {"hostProcess": True}),
    ("Host Namespaces", "hostNetwork", True),
    ("Privileged Containers", "containers.0.securityContext.privileged", True),
    ("Capabilities (baseline)", "containers.0.securityContext.capabilities.add", ["SYS_ADMIN"]),
    ("HostPath Volumes", "volumes", [{"name": "h", "hostPath": {"path": "/"}}]),
    ("Host Ports", "containers.0.ports", [{"containerPort": 80, "hostPort": 80}]),
    ("AppArmor", "securityContext.appArmorProfile", {"type": "Unconfined"}),
    ("SELinux", "securityContext.seLinuxOptions", {"type": "spc_t"}),
    ("/proc Mount Type", "containers.0.securityContext.procMount", "Unmasked"),
    ("Seccomp (baseline)", "containers.0.securityContext.seccompProfile", {"type": "Unconfined"}),
    ("Sysctls", "securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]),
    ("Volume Types", "volumes", [{"name": "n", "nfs": {"server": "s", "path": "/"}}]),
    ("Privilege Escalation", "containers.0.securityContext.allowPrivilegeEscalation", True),
    ("Running as Non-root", "securityContext.runAsNonRoot", False),
    ("Running as Non-root user", "containers.0.securityContext.runAsUser", 0),
    ("Seccomp", "securityContext.seccompProfile", {"type": "Unconfined"}),
    ("Capabilities", "containers.0.securityContext.capabilities", {"drop": ["NET_RAW"]}),
])
def test_each_control_fails_a_pod_that_breaks_it(control: str, path: str, value: Any) -> None:
    assert restricted_violations(_GOOD) == []
    assert CONTROLS[control](_with(path, value)), control

