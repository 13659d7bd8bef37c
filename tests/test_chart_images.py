"""The chart, the operator and the Dockerfiles agree on image names and entry commands (Docker cannot run here:
the files are read). docker/docker-bake.json names the images each Dockerfile builds."""

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from tide_operator import builders
from tide_operator.models import TideDeploymentSpec, TrainingSpec

from tests.chart_tools import CHART, ROOT, VALUES_FILES, by_kind, render

BAKE = json.loads((ROOT / "docker/docker-bake.json").read_text())


def _var(name: str) -> str:
    return BAKE["variable"][name]["default"]


def bake_images() -> dict[str, tuple[str, str]]:
    """target -> (repository, tag) with the variables' defaults."""
    out = {}
    for target, spec in BAKE["target"].items():
        (tag,) = spec["tags"]
        tag = re.sub(r"\$\{(\w+)\}", lambda m: _var(m.group(1)), tag)
        repo, _, version = tag.rpartition(":")
        out[target] = (repo, version)
    return out


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined; comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def entrypoint(dockerfile: Path) -> list[str]:
    (value,) = [a for i, a in instructions(dockerfile) if i == "ENTRYPOINT"]
    return json.loads(value)  # exec form only: a shell-form ENTRYPOINT would swallow the pod's args


def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_bake_targets_build_existing_dockerfiles() -> None:
    assert set(BAKE["target"]) == {"operator", "trainer", "trainer-rocm", "inference"}
    for spec in BAKE["target"].values():
        assert spec["context"] == "."
        assert (ROOT / spec["dockerfile"]).is_file(), spec["dockerfile"]


def test_chart_default_images_are_the_ones_bake_builds() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = chart_values()
    images = bake_images()
    assert images["operator"] == (values["operator"]["image"]["repository"], chart["appVersion"])
    assert images["inference"] == (values["images"]["inference"]["repository"], chart["appVersion"])
    assert images["trainer"] == (values["images"]["trainer"]["repository"], chart["appVersion"])
    assert images["trainer-rocm"] == (values["images"]["trainer"]["repository"], chart["appVersion"] + "-rocm")
    assert _var("TAG") == chart["appVersion"]


def test_every_image_in_the_examples_is_built_here() -> None:
    """Helm values and docs/examples name only images docker/ builds: the inference image is SGLang inside the
    supported range with the plugin installed (a plain SGLang image would serve without TIDE)."""
    built = {f"{r}:{t}" for r, t in bake_images().values()}
    examples = [(p.name, yaml.safe_load(p.read_text())) for p in sorted((ROOT / "docs/examples").glob("tide*.yaml"))]
    rendered = [(values.name, td) for values in VALUES_FILES for td in by_kind(render([values]), "TideDeployment")]
    assert len(examples) == 3
    for where, td in [*rendered, *examples]:
        for pool in ("inference", "training"):
            image = td["spec"].get(pool, {}).get("image")
            assert image is None or image in built, f"{where}: {td['metadata']['name']}.{pool} uses unbuilt {image}"


def test_operator_entrypoint_is_the_chart_command() -> None:
    dep = by_kind(render(), "Deployment")[0]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert entrypoint(ROOT / "docker/operator.Dockerfile") == container["command"] == ["python", "-m", "tide_operator"]
    # The image's default CMD is a valid argument list for the same entry point (what `docker run` gets).
    (cmd,) = [json.loads(a) for i, a in instructions(ROOT / "docker/operator.Dockerfile") if i == "CMD"]
    assert "--all-namespaces" in cmd and any(a.startswith("--liveness=") for a in cmd)
    port = dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert ("EXPOSE", str(port)) in instructions(ROOT / "docker/operator.Dockerfile")


def test_operator_image_runs_as_the_chart_user() -> None:
    pod = by_kind(render(), "Deployment")[0]["spec"]["template"]["spec"]
    uid = pod["securityContext"]["runAsUser"]
    assert ("USER", f"{uid}:{uid}") in instructions(ROOT / "docker/operator.Dockerfile")


def test_workload_images_run_as_the_uid_the_operator_sets() -> None:
    """The inference and trainer images run as builders.RUN_AS, the uid of every pod the operator builds."""
    spec = TideDeploymentSpec.model_validate({"model": {"path": "m"}, "draft": {"initialPath": "d"},
                                              "inference": {"image": "i"}, "redis": {"url": "redis://r:6379"},
                                              "registry": {"claimName": "c"}})
    for dep in (builders.inference_deployment("a", "ns", spec), builders.trainer_deployment("a", "ns", spec)):
        assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == builders.RUN_AS
    for name in ("inference", "trainer"):
        users = [a for i, a in instructions(ROOT / f"docker/{name}.Dockerfile") if i == "USER"]
        assert users[-1:] == [f"{builders.RUN_AS}:{builders.RUN_AS}"], name  # the final image's user


def test_trainer_entrypoint_is_the_crd_default_command() -> None:
    default = TrainingSpec.model_fields["command"].default
    assert entrypoint(ROOT / "docker/trainer.Dockerfile") == default == ["tide", "train"]


def test_inference_entrypoint_is_what_the_operator_runs() -> None:
    spec = TideDeploymentSpec.model_validate({"model": {"path": "m"}, "draft": {"initialPath": "d"},
                                              "inference": {"image": "i"}})
    dep = builders.inference_deployment("a", "ns", spec)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert entrypoint(ROOT / "docker/inference.Dockerfile") == container["command"] == ["tide", "serve"]
    port = container["ports"][0]["containerPort"]
    assert ("EXPOSE", str(port)) in instructions(ROOT / "docker/inference.Dockerfile")


def test_inference_image_is_official_sglang_with_the_plugin() -> None:
    steps = instructions(ROOT / "docker/inference.Dockerfile")
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    assert args["SGLANG_IMAGE"] == "lmsysorg/sglang"
    assert args["SGLANG_TAG"] == _var("SGLANG_TAG") == BAKE["target"]["inference"]["args"]["SGLANG_TAG"].replace(
        "${SGLANG_TAG}", _var("SGLANG_TAG"))
    froms = [a for i, a in steps if i == "FROM"]
    assert froms[-1] == "${SGLANG_IMAGE}:${SGLANG_TAG}"
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert "sglang.srt.plugins" in runs and "versions.check" in runs  # the build fails without the plugin
    # The entry point group the build checks is the one the package declares.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '[project.entry-points."sglang.srt.plugins"]' in pyproject and "tide = " in pyproject


def test_dockerfiles_copy_only_the_package_sources() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv*" in ignored and ".git" in ignored
    for name in ("operator", "trainer", "inference"):
        copies = [shlex.split(a)[0] for i, a in instructions(ROOT / f"docker/{name}.Dockerfile")
                  if i == "COPY" and not a.startswith("--from")]
        assert set(copies) <= {"pyproject.toml", "tide_sglang", "operator"}, (name, copies)
