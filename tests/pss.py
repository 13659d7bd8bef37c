"""The Pod Security Standards' "restricted" profile as plain functions over a pod spec.

Written from the standard (kubernetes.io/docs/concepts/security/pod-security-standards, policy version "latest",
Kubernetes 1.27+): the restricted profile is the baseline controls plus five of its own. No cluster runs here, so
the admission controller that enforces it cannot check what the chart and the operator build; these functions do,
one per control, each returning what violates it ("" paths name the pod or the container).
"""

from collections.abc import Callable, Iterator
from typing import Any

Pod = dict[str, Any]

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def containers(pod: Pod) -> Iterator[dict[str, Any]]:
    """Every container the controls apply to: init, regular and ephemeral."""
    for field in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod.get(field) or []


def _sc(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("securityContext") or {}


# -- baseline -------------------------------------------------------------------------------------------------------

def host_process(pod: Pod) -> list[str]:
    objs = [("pod", pod), *((c["name"], c) for c in containers(pod))]
    return [f"{n}: windowsOptions.hostProcess" for n, o in objs if (_sc(o).get("windowsOptions") or {}).get(
        "hostProcess")]


def host_namespaces(pod: Pod) -> list[str]:
    return [f"pod: {f}" for f in ("hostNetwork", "hostPID", "hostIPC") if pod.get(f)]


def privileged(pod: Pod) -> list[str]:
    return [f"{c['name']}: privileged" for c in containers(pod) if _sc(c).get("privileged")]


def baseline_capabilities(pod: Pod) -> list[str]:
    return [f"{c['name']}: adds {cap}" for c in containers(pod)
            for cap in (_sc(c).get("capabilities") or {}).get("add") or [] if cap not in BASELINE_CAPABILITIES]


def host_path_volumes(pod: Pod) -> list[str]:
    return [f"volume {v['name']}: hostPath" for v in pod.get("volumes") or [] if "hostPath" in v]


def host_ports(pod: Pod) -> list[str]:
    return [f"{c['name']}: hostPort {p['hostPort']}" for c in containers(pod) for p in c.get("ports") or []
            if p.get("hostPort")]


def app_armor(pod: Pod) -> list[str]:
    objs = [("pod", pod), *((c["name"], c) for c in containers(pod))]
    out = [f"{n}: appArmorProfile {t}" for n, o in objs
           if (t := (_sc(o).get("appArmorProfile") or {}).get("type")) not in (None, "RuntimeDefault", "Localhost")]
    annotations = ((pod.get("metadata") or {}).get("annotations") or {})
    out += [f"annotation {k}: {v}" for k, v in annotations.items()
            if k.startswith("container.apparmor.security.beta.kubernetes.io/")
            and v != "runtime/default" and not v.startswith("localhost/")]
    return out


def se_linux(pod: Pod) -> list[str]:
    out = []
    for n, o in [("pod", pod), *((c["name"], c) for c in containers(pod))]:
        opts = _sc(o).get("seLinuxOptions") or {}
        if opts.get("type", "") not in SELINUX_TYPES:
            out.append(f"{n}: seLinuxOptions.type {opts['type']}")
        out += [f"{n}: seLinuxOptions.{k}" for k in ("user", "role") if opts.get(k)]
    return out


def proc_mount(pod: Pod) -> list[str]:
    return [f"{c['name']}: procMount {m}" for c in containers(pod)
            if (m := _sc(c).get("procMount")) not in (None, "Default")]


def baseline_seccomp(pod: Pod) -> list[str]:
    objs = [("pod", pod), *((c["name"], c) for c in containers(pod))]
    return [f"{n}: seccompProfile Unconfined" for n, o in objs
            if (_sc(o).get("seccompProfile") or {}).get("type") == "Unconfined"]


def sysctls(pod: Pod) -> list[str]:
    return [f"pod: sysctl {s['name']}" for s in _sc(pod).get("sysctls") or [] if s["name"] not in SAFE_SYSCTLS]


# -- restricted -----------------------------------------------------------------------------------------------------

def volume_types(pod: Pod) -> list[str]:
    out = []
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        out += [f"volume {v['name']}: {k}" for k in sorted(kinds - RESTRICTED_VOLUMES)]
    return out


def privilege_escalation(pod: Pod) -> list[str]:
    return [f"{c['name']}: allowPrivilegeEscalation not false" for c in containers(pod)
            if _sc(c).get("allowPrivilegeEscalation") is not False]


def run_as_non_root(pod: Pod) -> list[str]:
    pod_level = _sc(pod).get("runAsNonRoot") is True
    out = [f"{c['name']}: runAsNonRoot false" for c in containers(pod) if _sc(c).get("runAsNonRoot") is False]
    out += [f"{c['name']}: runAsNonRoot unset (and unset on the pod)" for c in containers(pod)
            if not pod_level and _sc(c).get("runAsNonRoot") is not True]
    return out


def run_as_user(pod: Pod) -> list[str]:
    objs = [("pod", pod), *((c["name"], c) for c in containers(pod))]
    return [f"{n}: runAsUser 0" for n, o in objs if _sc(o).get("runAsUser") == 0]


def restricted_seccomp(pod: Pod) -> list[str]:
    allowed = ("RuntimeDefault", "Localhost")
    pod_level = (_sc(pod).get("seccompProfile") or {}).get("type")
    out = [] if pod_level in (None, *allowed) else [f"pod: seccompProfile {pod_level}"]
    for c in containers(pod):
        own = (_sc(c).get("seccompProfile") or {}).get("type")
        if own not in (None, *allowed) or (own is None and pod_level is None):
            out.append(f"{c['name']}: seccompProfile {own or 'unset (and unset on the pod)'}")
    return out


def restricted_capabilities(pod: Pod) -> list[str]:
    out = []
    for c in containers(pod):
        caps = _sc(c).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{c['name']}: capabilities.drop lacks ALL")
        out += [f"{c['name']}: adds {cap}" for cap in caps.get("add") or [] if cap != "NET_BIND_SERVICE"]
    return out


CONTROLS: dict[str, Callable[[Pod], list[str]]] = {
    "HostProcess": host_process, "Host Namespaces": host_namespaces, "Privileged Containers": privileged,
    "Capabilities (baseline)": baseline_capabilities, "HostPath Volumes": host_path_volumes,
    "Host Ports": host_ports, "AppArmor": app_armor, "SELinux": se_linux, "/proc Mount Type": proc_mount,
    "Seccomp (baseline)": baseline_seccomp, "Sysctls": sysctls,
    "Volume Types": volume_types, "Privilege Escalation": privilege_escalation,
    "Running as Non-root": run_as_non_root, "Running as Non-root user": run_as_user,
    "Seccomp": restricted_seccomp, "Capabilities": restricted_capabilities,
}


def restricted_violations(pod: Pod) -> list[str]:
    """Every violation of the restricted profile, "control: detail"; [] when the pod passes."""
    return [f"{name}: {v}" for name, control in CONTROLS.items() for v in control(pod)]


def pod_specs(obj: dict[str, Any]) -> list[Pod]:
    """The pod spec (with its template's metadata, for annotations) of a workload object; [] for other kinds."""
    if obj.get("kind") == "Pod":
        return [{**obj["spec"], "metadata": obj.get("metadata") or {}}]
    template = (obj.get("spec") or {}).get("template")
    if obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet") and template:
        return [{**template["spec"], "metadata": template.get("metadata") or {}}]
    return []
