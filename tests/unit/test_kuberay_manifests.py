"""The KubeRay manifests against KubeRay's own RayService CRD, and the checkpoint conversion
Job (cluster/convert-job.yaml) against the manifests whose checkpoint it publishes.

The API server validates a RayService with the CRD's ``openAPIV3Schema`` (vendored in
tests/data/kuberay: KubeRay v1.7.0). That is JSON Schema plus Kubernetes' own rules, which
jsonschema skips as unknown keywords. ``KubernetesValidator`` adds the rules that can turn
one of these manifests down:

- a field that an object's ``properties`` do not name is unknown (unless the object has
  ``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields``): kubectl's default,
  strict, field validation rejects it, and without it the API server drops it silently, so a
  misspelt field never takes effect;
- ``x-kubernetes-int-or-string``: an integer or a string;
- ``x-kubernetes-list-type: map``: items unique by their ``x-kubernetes-list-map-keys``, with
  the keys' defaults filled in (``set``: items unique);
- ``nullable``: null only where it is true (elsewhere Kubernetes drops the field, a silent
  no-op like an unknown field, so it is flagged as one);
- ``format: int32`` and ``int64``: the integer fits (KubeRay decodes into Go integers of
  that size).

``x-kubernetes-validations`` (CEL) rules are not evaluated; a test checks that the manifests
set none of the fields that carry one. The Job, PersistentVolume and claim are core kinds
with no CRD here: their structure is checked field by field, and the Job's pod template
against the PodTemplateSpec schema the CRD embeds (Kubernetes' own, k8s.io/api v0.36).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import click
import jsonschema
import pytest
import yaml
from jsonschema import ValidationError

from deployments.config import LLMConfig
from tests.unit.test_cluster_configs import (
    CLUSTER,
    CONTAINER_UID,
    INTEL_GPUS,
    RAYSERVICE,
    RAYSERVICE_XE,
    RAYSERVICES,
    REPO,
    load_render_module,
    manifest_documents,
    rayservice,
)

KUBERAY = REPO / "tests" / "data" / "kuberay"
CRD = KUBERAY / "ray.io_rayservices.yaml"
CRD_TAG = "v1.7.0"
SERVED_VERSION = "v1"
CONVERT_JOB = CLUSTER / "convert-job.yaml"
# The label that `kubectl apply -l` selects to create the checkpoint volume before the Job.
CHECKPOINTS_LABEL = ("app.kubernetes.io/component", "checkpoints")
# KubeRay v1.7.0 (utils/validation.go, constant.go): a RayService name is a DNS-1035 label of
# at most 47 characters (MaxRayServiceNameLength: its RayClusters' names append 6).
RAYSERVICE_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_RAYSERVICE_NAME = 47
# batch/v1 JobSpec's fields (Kubernetes 1.36): a misspelt one would be dropped.
JOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "backoffLimitPerIndex", "completionMode",
    "completions", "managedBy", "manualSelector", "maxFailedIndexes", "parallelism",
    "podFailurePolicy", "podReplacementPolicy", "selector", "successPolicy", "suspend",
    "template", "ttlSecondsAfterFinished",
}


# ---- a validator with Kubernetes' rules ------------------------------------------------

_DRAFT = jsonschema.Draft4Validator


def _known_properties(validator: Any, properties: dict[str, Any], instance: Any,
                      schema: dict[str, Any]) -> Iterator[ValidationError]:
    """``properties``, and no field beside them unless the object is declared open."""
    yield from _DRAFT.VALIDATORS["properties"](validator, properties, instance, schema)
    open_object = ("additionalProperties" in schema
                   or schema.get("x-kubernetes-preserve-unknown-fields"))
    if validator.is_type(instance, "object") and not open_object:
        for name in sorted(set(instance) - set(properties)):
            yield ValidationError(f"unknown field {name!r}")


def _nullable_type(validator: Any, types: Any, instance: Any,
                   schema: dict[str, Any]) -> Iterator[ValidationError]:
    if instance is None and schema.get("nullable"):
        return
    yield from _DRAFT.VALIDATORS["type"](validator, types, instance, schema)


def _int_or_string(validator: Any, enabled: bool, instance: Any,
                   schema: dict[str, Any]) -> Iterator[ValidationError]:
    if enabled and (isinstance(instance, bool) or not isinstance(instance, int | str)):
        yield ValidationError(f"{instance!r} is neither an integer nor a string")


def _list_key(item: Any, schema: dict[str, Any], list_type: str) -> str:
    """What makes ``item`` unique in a list of ``list_type`` (map: its keys, defaulted)."""
    if list_type == "set" or not isinstance(item, dict):
        return json.dumps(item, sort_keys=True)
    defaults = schema.get("items", {}).get("properties", {})
    return json.dumps([item.get(key, defaults.get(key, {}).get("default"))
                       for key in schema["x-kubernetes-list-map-keys"]])


def _unique_list_items(validator: Any, list_type: str, instance: Any,
                       schema: dict[str, Any]) -> Iterator[ValidationError]:
    if list_type not in ("map", "set") or not validator.is_type(instance, "array"):
        return  # "atomic": any items
    keys = [_list_key(item, schema, list_type) for item in instance]
    for key in sorted({key for key in keys if keys.count(key) > 1}):
        yield ValidationError(f"duplicate {list_type}-list entries for {key}")


def _fits(bits: int) -> Callable[[Any], bool]:
    def check(instance: Any) -> bool:
        if isinstance(instance, bool) or not isinstance(instance, int):
            return True  # formats constrain their own type only
        return -(2 ** (bits - 1)) <= instance < 2 ** (bits - 1)
    return check


FORMATS = jsonschema.FormatChecker(formats=())
for _bits in (32, 64):
    FORMATS.checks(f"int{_bits}")(_fits(_bits))

KubernetesValidator = jsonschema.validators.extend(_DRAFT, {
    "properties": _known_properties,
    "type": _nullable_type,
    "x-kubernetes-int-or-string": _int_or_string,
    "x-kubernetes-list-type": _unique_list_items,
})


@functools.cache
def crd() -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 1 MB of YAML
    return yaml.load(CRD.read_text(), Loader=loader)


def served_schema() -> dict[str, Any]:
    """The ``openAPIV3Schema`` of the CRD's ``v1`` version (which must be served)."""
    (version,) = [v for v in crd()["spec"]["versions"] if v["name"] == SERVED_VERSION]
    assert version["served"]
    return version["schema"]["openAPIV3Schema"]


def pod_template_schema() -> dict[str, Any]:
    """Kubernetes' PodTemplateSpec schema, as the CRD embeds it for the head group."""
    cluster = served_schema()["properties"]["spec"]["properties"]["rayClusterConfig"]
    return cluster["properties"]["headGroupSpec"]["properties"]["template"]


def schema_errors(document: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Every violation of ``schema`` (default: the RayService's) as "path: message"."""
    validator = KubernetesValidator(schema or served_schema(), format_checker=FORMATS)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in validator.iter_errors(document))


# ---- the vendored CRD --------------------------------------------------------------------


def test_vendored_crd_is_kuberays_file_byte_for_byte() -> None:
    record = dict(re.findall(r"^(repository|path|tag|commit|blob): (\S+)$",
                             (KUBERAY / "README.md").read_text(), re.MULTILINE))
    assert record["repository"] == "https://github.com/ray-project/kuberay"
    assert record["tag"] == CRD_TAG and re.fullmatch(r"[0-9a-f]{40}", record["commit"])
    assert PurePosixPath(record["path"]).name == CRD.name
    data = CRD.read_bytes()  # git's blob id: sha1 of "blob <size>\0<content>"
    assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == record["blob"]
    assert crd()["kind"] == "CustomResourceDefinition"
    assert crd()["spec"]["names"]["kind"] == "RayService"
    _DRAFT.check_schema(served_schema())


# ---- RayService against the CRD ------------------------------------------------------------


@pytest.mark.parametrize("driver", list(RAYSERVICES))
def test_rayservice_is_valid_for_kuberays_crd(driver: str) -> None:
    service = rayservice(RAYSERVICES[driver])
    assert service["apiVersion"] == f"{crd()['spec']['group']}/{SERVED_VERSION}"
    assert service["kind"] == crd()["spec"]["names"]["kind"]
    assert schema_errors(service) == []


def _worker(service: dict[str, Any]) -> dict[str, Any]:
    return service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def _worker_pod(service: dict[str, Any]) -> dict[str, Any]:
    return _worker(service)["template"]["spec"]


def _head_container(service: dict[str, Any]) -> dict[str, Any]:
    return service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]


def _break_quantity(service: dict[str, Any]) -> None:
    _worker_pod(service)["containers"][0]["resources"]["limits"]["memory"] = "64 GB"


def _duplicate_port(service: dict[str, Any]) -> None:
    """A second port 8000: the same list-map key (containerPort, protocol), TCP by default."""
    _head_container(service)["ports"].append({"containerPort": 8000, "protocol": "TCP"})


# name: (how to break a RayService, where the error must point, caught by plain jsonschema)
BREAKAGES: dict[str, tuple[Callable[[dict[str, Any]], None], str, bool]] = {
    "rayStartParams value as an int": (
        lambda s: _worker(s)["rayStartParams"].update({"num-gpus": 2}),
        "workerGroupSpecs.0.rayStartParams.num-gpus", True),
    "replicas as a string": (
        lambda s: _worker(s).update(replicas="1"), "workerGroupSpecs.0.replicas", True),
    "group without a groupName": (
        lambda s: _worker(s).pop("groupName"), "workerGroupSpecs.0", True),
    "supplementalGroups holding a group name": (
        lambda s: _worker_pod(s)["securityContext"].update(supplementalGroups=["render"]),
        "securityContext.supplementalGroups.0", True),
    "memory quantity with a space": (_break_quantity, "resources.limits.memory", True),
    "misspelt group field (rayStartParam)": (
        lambda s: _worker(s).update(rayStartParam={"num-gpus": "2"}), "workerGroupSpecs.0",
        False),
    "unknown pod field (nodeSelectors)": (
        lambda s: _worker_pod(s).update(nodeSelectors={}), "template.spec", False),
    "volume names not unique": (
        lambda s: _worker_pod(s)["volumes"].append(dict(_worker_pod(s)["volumes"][0])),
        "template.spec.volumes", False),
    "container port listed twice": (_duplicate_port, "containers.0.ports", False),
    "maxReplicas beyond int32": (
        lambda s: _worker(s).update(maxReplicas=2 ** 31), "workerGroupSpecs.0.maxReplicas",
        False),
    "misspelt GCS fault tolerance field (redisAdress)": (
        lambda s: s["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"].update(
            redisAdress="redis:6379"), "rayClusterConfig.gcsFaultToleranceOptions", False),
    "Redis password as a plain string": (
        lambda s: s["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"].update(
            redisPassword="secret"), "gcsFaultToleranceOptions.redisPassword", True),
    "minReplicas null (dropped: a no-op)": (
        lambda s: _worker(s).update(minReplicas=None), "workerGroupSpecs.0.minReplicas",
        True),
}


def broken(name: str) -> dict[str, Any]:
    service = copy.deepcopy(rayservice(RAYSERVICE))
    BREAKAGES[name][0](service)
    return service


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_crd_validation_rejects_a_broken_rayservice(name: str) -> None:
    """The check can fail: each breakage gives an error at the place it broke."""
    errors = schema_errors(broken(name))
    assert errors, name
    assert any(BREAKAGES[name][1] in error for error in errors), errors


@pytest.mark.parametrize("name", [n for n, (_, _, plain) in BREAKAGES.items() if not plain])
def test_plain_jsonschema_misses_what_kubernetes_rules_catch(name: str) -> None:
    """These pass plain JSON Schema: without KubernetesValidator's rules they would slip by."""
    assert _DRAFT(served_schema()).is_valid(broken(name))
    assert schema_errors(broken(name))


def cel_rule_paths(schema: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[
        tuple[str, ...]]:
    """Where ``schema`` has CEL rules (``*``: any list item or map value)."""
    if "x-kubernetes-validations" in schema:
        yield path
    for name, child in schema.get("properties", {}).items():
        yield from cel_rule_paths(child, (*path, name))
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from cel_rule_paths(schema[key], (*path, "*"))


def values_at(node: Any, path: tuple[str, ...]) -> list[Any]:
    if not path:
        return [node]
    head, *rest = path
    if head == "*":
        children = node.values() if isinstance(node, dict) else node if isinstance(
            node, list) else []
    else:
        children = [node[head]] if isinstance(node, dict) and head in node else []
    return [value for child in children for value in values_at(child, tuple(rest))]


@pytest.mark.parametrize("driver", list(RAYSERVICES))
def test_rayservice_sets_no_field_whose_cel_rules_go_unchecked(driver: str) -> None:
    paths = list(cel_rule_paths(served_schema()))
    assert paths  # the walk finds the CRD's rules (managedBy's, for one)
    service = rayservice(RAYSERVICES[driver])
    assert [p for p in paths if values_at(service, p)] == []


@pytest.mark.parametrize("driver", list(RAYSERVICES))
def test_rayservice_name_is_valid_for_kuberay_and_names_its_serve_service(driver: str) -> None:
    name = rayservice(RAYSERVICES[driver])["metadata"]["name"]
    assert RAYSERVICE_NAME.fullmatch(name) and len(name) <= MAX_RAYSERVICE_NAME
    # KubeRay names the Serve service <name>-serve-svc (GenerateServeServiceName).
    assert f"kubectl port-forward svc/{name}-serve-svc 8000" in RAYSERVICES[driver].read_text()


# ---- the xe manifest ---------------------------------------------------------------------


def all_keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node).union(*(all_keys(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(all_keys(v) for v in node))
    return set()


def test_xe_manifest_requests_xe_and_never_i915() -> None:
    documents = manifest_documents(RAYSERVICE_XE)
    assert INTEL_GPUS["xe"] in all_keys(documents)
    assert "i915" not in json.dumps(documents)  # no resource, group name or label
    assert RAYSERVICE_XE.read_text().startswith(
        "# Generated from cluster/rayservice.yaml by cluster/render_serve_configs.py")


def driver_neutral(path: Path) -> list[dict[str, Any]]:
    """The documents at ``path`` without what names the driver: resources, group names."""
    text = json.dumps(manifest_documents(path))
    for resource in INTEL_GPUS.values():
        text = text.replace(json.dumps(resource), json.dumps("<intel gpu>"))
    documents = json.loads(text)
    for document in documents:
        if document["kind"] == "RayService":
            for group in document["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
                group.pop("groupName")
    return documents


def group_names(path: Path) -> set[str]:
    groups = rayservice(path)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return {g["groupName"] for g in groups}


def test_xe_manifest_is_the_i915_manifest_on_the_xe_resource() -> None:
    assert driver_neutral(RAYSERVICE_XE) == driver_neutral(RAYSERVICE)
    assert group_names(RAYSERVICE).isdisjoint(group_names(RAYSERVICE_XE))  # pods tell apart


def test_xe_render_refuses_i915_text_its_mapping_does_not_cover() -> None:
    render = load_render_module()
    i915 = RAYSERVICE.read_text()
    assert render.xe_manifest(i915) == RAYSERVICE_XE.read_text()
    with pytest.raises(ValueError, match="i915"):
        render.xe_manifest(i915 + "# pin the kernel.i915 module\n")
    with pytest.raises(ValueError, match="XE_RENAMES"):
        render.xe_manifest(i915.replace("groupName: xpu-max1550\n", "groupName: xpu-pvc\n"))


RENDERED_FILES = ("serve_config.yaml", "serve_config.llama_cpp.yaml",
                  "cluster/render_serve_configs.py", "cluster/serve_config.cluster.yaml",
                  "cluster/rayservice.yaml", "cluster/rayservice.xe.yaml")


def run_render(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = root / "cluster" / "render_serve_configs.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True,
                          text=True, timeout=60)


def test_render_check_fails_while_the_xe_manifest_is_stale(tmp_path: Path) -> None:
    """On a copy of the repository's files: --check reports a hand-edited xe manifest and
    leaves it; a plain run rewrites it."""
    for name in RENDERED_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    xe = tmp_path / "cluster" / "rayservice.xe.yaml"
    stale = xe.read_text().replace(INTEL_GPUS["xe"], INTEL_GPUS["i915"])
    xe.write_text(stale)
    check = run_render(tmp_path, "--check")
    assert check.returncode == 1 and "cluster/rayservice.xe.yaml: is stale" in check.stderr
    assert xe.read_text() == stale
    assert run_render(tmp_path).returncode == 0
    assert INTEL_GPUS["i915"] not in all_keys(list(yaml.safe_load_all(xe.read_text())))
    assert run_render(tmp_path, "--check").returncode == 0


# ---- the conversion Job, the volume and the claim ------------------------------------------


def job() -> dict[str, Any]:
    (document,) = [d for d in yaml.safe_load_all(CONVERT_JOB.read_text()) if d]
    return document


def job_container() -> dict[str, Any]:
    (container,) = job()["spec"]["template"]["spec"]["containers"]
    return container


def one_of_kind(path: Path, kind: str) -> dict[str, Any]:
    (document,) = [d for d in manifest_documents(path) if d["kind"] == kind]
    return document


def ray_pods(service: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def claim_mounts(pod: dict[str, Any], claim: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(volume, mount) for each mount in ``pod`` of the persistent volume claim ``claim``."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])
               if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
    return [(volumes[m["name"]], m) for c in pod["containers"]
            for m in c.get("volumeMounts", []) if m["name"] in volumes]


def checkpoint_root() -> str:
    return str(load_render_module().CHECKPOINT_ROOT)


def test_convert_job_is_a_job_that_runs_once() -> None:
    document = job()
    assert (document["apiVersion"], document["kind"]) == ("batch/v1", "Job")
    spec = document["spec"]
    assert set(spec) <= JOB_SPEC_FIELDS
    assert 0 <= spec["backoffLimit"] <= 3
    assert spec["ttlSecondsAfterFinished"] >= 3600  # long enough to `kubectl wait` for it
    assert spec.get("completions", 1) == spec.get("parallelism", 1) == 1
    assert spec["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    assert schema_errors(spec["template"], pod_template_schema()) == []


def test_pod_template_schema_rejects_a_broken_job_pod() -> None:
    template = copy.deepcopy(job()["spec"]["template"])
    template["spec"]["containers"][0]["volumeMount"] = []  # misspelt volumeMounts
    template["spec"]["securityContext"]["runAsUser"] = "1000"
    errors = schema_errors(template, pod_template_schema())
    assert any("unknown field 'volumeMount'" in e for e in errors), errors
    assert any(e.startswith("spec.securityContext.runAsUser") for e in errors), errors


def test_convert_job_runs_as_the_image_user_without_a_gpu() -> None:
    pod = job()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == CONTAINER_UID
    for container in pod["containers"]:
        requested = all_keys(container.get("resources", {}))
        assert not [name for name in requested if name.startswith("gpu.intel.com/")]
        assert container.get("securityContext", {}).get("runAsUser", CONTAINER_UID) == (
            CONTAINER_UID)


@pytest.mark.parametrize("driver", list(RAYSERVICES))
def test_convert_job_writes_the_claim_that_every_ray_pod_reads(driver: str) -> None:
    path = RAYSERVICES[driver]
    claim = one_of_kind(path, "PersistentVolumeClaim")
    name = claim["metadata"]["name"]
    ((volume, mount),) = claim_mounts(job()["spec"]["template"]["spec"], name)
    assert mount["mountPath"] == checkpoint_root()
    assert not mount.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly")
    service = rayservice(path)
    for pod in ray_pods(service):
        mounts = claim_mounts(pod, name)
        assert mounts, "a Ray pod without the checkpoint volume"
        for volume, mount in mounts:
            assert mount["mountPath"] == checkpoint_root()
            assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"]
        assert {c["image"] for c in pod["containers"]} == {job_container()["image"]}


@pytest.mark.parametrize("driver", list(RAYSERVICES))
def test_claim_binds_the_nfs_volume_for_many_writers(driver: str) -> None:
    volume = one_of_kind(RAYSERVICES[driver], "PersistentVolume")
    claim = one_of_kind(RAYSERVICES[driver], "PersistentVolumeClaim")
    assert volume["apiVersion"] == claim["apiVersion"] == "v1"
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"]  # static binding
    assert claim["spec"]["storageClassName"] == volume["spec"]["storageClassName"] == ""
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    assert set(claim["spec"]["accessModes"]) <= set(volume["spec"]["accessModes"])
    assert claim["spec"]["resources"]["requests"]["storage"] == volume["spec"]["capacity"][
        "storage"]


def parse_checkpoint_command(args: list[str]) -> dict[str, Any]:
    """The parameters ``llm-checkpoint ARGS`` would run with: click parses, nothing runs.

    Raises click's UsageError for an unknown subcommand or option.
    """
    from deployments.convert import cli  # click only; torch loads when a model does

    name, *rest = args
    command = cli.get_command(click.Context(cli), name)
    if command is None:
        raise click.UsageError(f"no llm-checkpoint command {name!r}")
    return command.make_context(name, rest).params


def test_convert_job_publishes_the_checkpoint_the_rayservices_serve() -> None:
    command = job_container()["command"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert command[0] in scripts
    params = parse_checkpoint_command(command[1:])
    output = str(params["output"])
    for path in RAYSERVICES.values():
        (app,) = yaml.safe_load(rayservice(path)["spec"]["serveConfigV2"])["applications"]
        assert app["args"]["checkpoint_path"] == output
        engine = LLMConfig.model_validate(app["args"]).engine
        assert params.get("checkpoint_format", engine) == engine  # the format it reads
    assert PurePosixPath(output).parent == PurePosixPath(checkpoint_root())


def commented_command(text: str) -> list[str]:
    """The ``# command: [...]`` in ``text``'s comments, parsed as if uncommented."""
    comments = "\n".join(line.strip().removeprefix("#").strip() for line in text.splitlines()
                         if line.strip().startswith("#"))
    match = re.search(r"^command: (\[[^\]]*\])", comments, re.MULTILINE)
    assert match, "no commented-out command"
    return yaml.safe_load(match.group(1))


def test_convert_job_alternative_for_a_real_model_is_a_valid_command() -> None:
    command = commented_command(CONVERT_JOB.read_text())
    filled = [arg.replace("<hub id or folder>", "Org/Model").replace("<name>", "model")
              for arg in command]
    assert filled[0] == job_container()["command"][0] and filled[1] == "convert"
    params = parse_checkpoint_command(filled[1:])
    assert (params["source"], params["low_bit"]) == ("Org/Model", "sym_int4")
    assert PurePosixPath(str(params["output"])).parent == PurePosixPath(checkpoint_root())


def test_convert_job_documents_the_order_and_the_claim_comes_first() -> None:
    """Claim, Job, `kubectl wait` for this Job's name, RayService: in that order."""
    text = CONVERT_JOB.read_text()
    key, value = CHECKPOINTS_LABEL
    wait = f"kubectl wait --for=condition=complete --timeout=30m job/{job()['metadata']['name']}"
    steps = [f"kubectl apply -f cluster/rayservice.yaml -l {key}={value}",
             "kubectl apply -f cluster/convert-job.yaml", wait,
             "kubectl apply -f cluster/rayservice.yaml"]
    position = -1
    for step in steps:
        position = text.find(step, position + 1)
        assert position >= 0, f"{step!r} missing, or before the step it should follow"
    for path in RAYSERVICES.values():  # `-l` selects only the volume and its claim
        labelled = {d["kind"] for d in manifest_documents(path)
                    if d["metadata"].get("labels", {}).get(key) == value}
        assert labelled == {"PersistentVolume", "PersistentVolumeClaim"}
        assert f"kubectl apply -f cluster/{path.name} -l {key}={value}" in path.read_text()
