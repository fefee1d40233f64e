"""The deployment configs in serve_config.yaml and cluster/, checked with Ray's own schemas.

Ray's schemas are lenient in places (a misspelt deployment option or autoscaling field is
accepted and ignored), so the tests also check field names against Ray's models, the app
args against LLMConfig, and the files against each other: the cluster Serve configs are
generated from serve_config.yaml, the launcher uses the node start script, the Kubernetes
manifests (i915 and xe drivers) mount the paths their Serve config names.
tests/unit/test_kuberay_manifests.py checks the manifests against KubeRay's CRD schema.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeDeploySchema

from deployments.config import LLMConfig
from deployments.placement import CPU_SOCKET_RESOURCE

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SERVE_CONFIG = REPO / "serve_config.yaml"
LLAMA_CPP_SERVE_CONFIG = REPO / "serve_config.llama_cpp.yaml"
CLUSTER_SERVE_CONFIG = CLUSTER / "serve_config.cluster.yaml"
MULTI_MODEL_CONFIG = CLUSTER / "serve_config.multi_model.yaml"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RAYSERVICE = CLUSTER / "rayservice.yaml"
RAYSERVICE_XE = CLUSTER / "rayservice.xe.yaml"  # generated from RAYSERVICE
# The KubeRay manifests by the kernel driver of their GPU nodes (tests parametrize over them).
RAYSERVICES = {"i915": RAYSERVICE, "xe": RAYSERVICE_XE}
RENDER_SCRIPT = CLUSTER / "render_serve_configs.py"
START_NODE = CLUSTER / "start-node.sh"
# What Intel's GPU device plugin advertises per GPU device, by kernel driver.
INTEL_GPUS = {driver: f"gpu.intel.com/{driver}" for driver in RAYSERVICES}
CONTAINER_UID = 1000  # the image's user `ray` (cluster/Dockerfile.xpu)
# The deployments build_app binds (names as in server.py and ingress.py, which these tests do
# not import: a config check should not need the serving stack to import).
LLM_SERVER = "LLMServer"
APP_DEPLOYMENTS = {LLM_SERVER, "LLMRouter"}


def load_render_module() -> Any:
    spec = importlib.util.spec_from_file_location("render_serve_configs", RENDER_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def manifest_documents(path: Path = RAYSERVICE) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def rayservice(path: Path = RAYSERVICE) -> dict[str, Any]:
    services = [doc for doc in manifest_documents(path) if doc.get("kind") == "RayService"]
    assert len(services) == 1
    return services[0]


def serve_configs() -> dict[str, dict[str, Any]]:
    """Every Serve config this repository ships, by where it lives."""
    return {
        "serve_config.yaml": yaml.safe_load(SERVE_CONFIG.read_text()),
        "serve_config.llama_cpp.yaml": yaml.safe_load(LLAMA_CPP_SERVE_CONFIG.read_text()),
        "cluster/serve_config.cluster.yaml": yaml.safe_load(CLUSTER_SERVE_CONFIG.read_text()),
        "cluster/serve_config.multi_model.yaml": yaml.safe_load(MULTI_MODEL_CONFIG.read_text()),
        **{f"{path.name} serveConfigV2": yaml.safe_load(rayservice(path)["spec"]["serveConfigV2"])
           for path in RAYSERVICES.values()},
    }


def llm_server_options(app: dict[str, Any]) -> dict[str, Any]:
    (options,) = [d for d in app["deployments"] if d["name"] == LLM_SERVER]
    return options


# ---- Serve configs ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(serve_configs()))
def test_serve_config_is_valid_for_ray_and_for_the_app(name: str) -> None:
    document = serve_configs()[name]
    schema = ServeDeploySchema.model_validate(document)
    assert schema.applications
    for app in document["applications"]:
        assert app["import_path"] == "deployments.app:build_app"
        LLMConfig.model_validate(app["args"])  # extra="forbid": a misspelt arg fails here
        for deployment in app["deployments"]:
            assert deployment["name"] in APP_DEPLOYMENTS  # Serve refuses unknown names
            # DeploymentSchema ignores unknown keys: a typo would silently do nothing.
            assert set(deployment) <= set(DeploymentSchema.model_fields), deployment
            if "autoscaling_config" in deployment:
                fields = set(deployment["autoscaling_config"])
                assert fields <= set(AutoscalingConfig.model_fields), fields
                AutoscalingConfig(**deployment["autoscaling_config"])


@pytest.mark.parametrize("name", list(serve_configs()))
def test_llm_server_autoscales_for_batched_work(name: str) -> None:
    for app in serve_configs()[name]["applications"]:
        args = LLMConfig.model_validate(app["args"])
        options = llm_server_options(app)
        assert options.get("num_replicas") in (None, "auto")  # an int disables autoscaling
        scaling = AutoscalingConfig(**options["autoscaling_config"])
        assert 1 <= scaling.min_replicas < scaling.max_replicas
        # Scale on full batches, not Ray's default of 2 requests per replica...
        assert args.max_batch_size / 2 <= scaling.target_ongoing_requests <= args.max_batch_size
        # ...and replicas must accept more than they are scaled at, or batches never fill.
        assert options["max_ongoing_requests"] > scaling.target_ongoing_requests
        assert options["max_ongoing_requests"] >= args.max_batch_size
        # Starting a replica loads a model: scale down far more reluctantly than up.
        assert 0 < scaling.upscale_delay_s < scaling.downscale_delay_s
        assert options["health_check_period_s"] < options["health_check_timeout_s"]
        assert options["graceful_shutdown_timeout_s"] > 0


def test_cluster_serve_configs_are_generated_from_serve_config() -> None:
    result = subprocess.run([sys.executable, str(RENDER_SCRIPT), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_rayservice_serves_the_applications_of_serve_config() -> None:
    """Equal but for the args a cluster must set; nothing else may differ."""
    render = load_render_module()
    source = yaml.safe_load(SERVE_CONFIG.read_text())
    served = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    cluster_only = {"checkpoint_path", "local_cache_dir", "device"}

    def without_cluster_args(config: dict[str, Any]) -> list[dict[str, Any]]:
        apps = copy.deepcopy(config["applications"])
        for app in apps:
            app["args"] = {k: v for k, v in app["args"].items() if k not in cluster_only}
        return apps

    assert without_cluster_args(served) == without_cluster_args(source)
    (app,) = served["applications"]
    assert app["args"]["checkpoint_path"] == str(
        render.CHECKPOINT_ROOT / PurePosixPath(source["applications"][0]["args"]
                                               ["checkpoint_path"]).name)
    assert app["args"]["device"] != "auto"  # resolved at build time, before workers join
    assert served == yaml.safe_load(CLUSTER_SERVE_CONFIG.read_text())


def test_llama_cpp_config_differs_from_serve_config_in_the_engine_args_only() -> None:
    render = load_render_module()
    source = yaml.safe_load(SERVE_CONFIG.read_text())
    variant = yaml.safe_load(LLAMA_CPP_SERVE_CONFIG.read_text())
    changed = set(render.LLAMA_CPP_ARGS)
    for config in (source, variant):
        for app in config["applications"]:
            app["args"] = {k: v for k, v in app["args"].items() if k not in changed}
    assert variant == source
    args = LLMConfig.model_validate(
        yaml.safe_load(LLAMA_CPP_SERVE_CONFIG.read_text())["applications"][0]["args"])
    assert (args.engine, args.device) == ("llama_cpp", "auto")


def test_render_follows_serve_config_and_keeps_the_rest_of_the_manifest() -> None:
    render = load_render_module()
    source = yaml.safe_load(SERVE_CONFIG.read_text())
    source["applications"][0]["deployments"][0]["max_ongoing_requests"] = 7
    rendered = render.render_yaml(render.cluster_serve_config(source))
    assert "max_ongoing_requests: 7" in rendered

    manifest = "spec:\n  serveConfigV2: |\n    old: 1\n\n    older: 2\n\n  # kept\n  next: x\n"
    updated = render.with_block(manifest, render.RAYSERVICE_KEY, "new: 1\nnewer: 2\n")
    assert updated == "spec:\n  serveConfigV2: |\n    new: 1\n    newer: 2\n\n  # kept\n  next: x\n"
    assert yaml.safe_load(updated)["spec"]["serveConfigV2"] == "new: 1\nnewer: 2\n"


def test_multi_model_variant_runs_each_model_as_its_own_application() -> None:
    document = yaml.safe_load(MULTI_MODEL_CONFIG.read_text())
    apps = document["applications"]
    assert len(apps) >= 2
    args = [LLMConfig.model_validate(app["args"]) for app in apps]
    assert len({a.model_name for a in args}) == len(apps)
    assert len({a.checkpoint_path for a in args}) == len(apps)
    assert len({app["route_prefix"] for app in apps}) == len(apps)
    assert all(app["route_prefix"] != "/" for app in apps)  # "/" would shadow the others
    for app, config in zip(apps, args, strict=True):
        assert config.checkpoint_path.startswith("/mnt/models/")
        assert config.local_cache_dir and config.device != "auto"
        options = llm_server_options(app)
        # A replica being drained may hold a request for up to request_timeout_s.
        assert options["graceful_shutdown_timeout_s"] >= config.request_timeout_s / 2


# ---- cluster launcher ------------------------------------------------------------------


def launcher() -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_config_validates_with_ray_schema() -> None:
    config = launcher()
    schema_file = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_file.read_text()))
    # What `ray up` does: fill in the local provider's single node type, then validate.
    prepared = prepare_config(config)
    validate_config(prepared)
    (node_type,) = prepared["available_node_types"].values()
    workers = len(config["provider"]["worker_ips"])
    assert node_type["min_workers"] == node_type["max_workers"] == workers


def test_launcher_uses_local_provider_without_node_types() -> None:
    config = launcher()
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] not in config["provider"]["worker_ips"]
    assert not {"available_node_types", "head_node_type", "head_node", "worker_nodes"} & set(
        config)


def test_launcher_workers_advertise_slots_through_start_node_script() -> None:
    config = launcher()
    script = START_NODE.relative_to(REPO).as_posix()
    (start,) = [c for c in config["worker_start_ray_commands"] if script in c]
    assert "RAY_HEAD=" in start and "$RAY_HEAD_IP" in start
    assert START_NODE.is_file() and os.access(START_NODE, os.X_OK)
    text = START_NODE.read_text()
    assert "--num-gpus" in text and f'"{CPU_SOCKET_RESOURCE}"' in text
    head = " ".join(config["head_start_ray_commands"])
    assert "--head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--num-gpus=0" in head  # no replica on the head


def env_assignments(command: str, program: str) -> dict[str, str]:
    """The ``NAME=value`` words before ``program`` in the shell command list ``command``."""
    for part in command.split(";"):
        words = shlex.split(part)
        programs = [i for i, word in enumerate(words) if word.endswith(program)]
        if programs:
            return dict(word.split("=", 1) for word in words[:programs[0]])
    raise AssertionError(f"no {program} in {command!r}")


def test_launcher_keeps_the_gcs_in_redis_and_workers_wait_for_a_new_head() -> None:
    """GCS fault tolerance: the head's `ray start` gets the external Redis (Ray 2.60 reads
    RAY_REDIS_ADDRESS; `--address` on a head is deprecated) and its password, not written
    in this file; workers outwait a head restart, as KubeRay makes its workers do."""
    config = launcher()
    (head,) = [c for c in config["head_start_ray_commands"] if "--head" in c]
    host, port = env_assignments(head, "/ray")["RAY_REDIS_ADDRESS"].rsplit(":", 1)
    assert host and int(port) > 0
    (password,) = [w for w in shlex.split(head.split(";")[-1])
                   if w.startswith("--redis-password=")]
    assert password.startswith("--redis-password=$(cat ")  # read on the head, at start
    script = START_NODE.relative_to(REPO).as_posix()
    (worker,) = [c for c in config["worker_start_ray_commands"] if script in c]
    timeout = env_assignments(worker, script)["RAY_gcs_rpc_server_reconnect_timeout_s"]
    assert int(timeout) >= 300  # Ray's default of 60 s is shorter than a head restart


def test_launcher_syncs_and_installs_the_project() -> None:
    config = launcher()
    (remote,) = [path for path, local in config["file_mounts"].items() if local == "."]
    assert "**/.venv" in config["rsync_exclude"]
    def synced(arg: str) -> bool:
        return os.path.expandvars(arg.replace("~", "$HOME")).startswith(
            os.path.expandvars(remote.replace("~", "$HOME")))

    installs = [shlex.split(c) for c in config["head_setup_commands"] if " install -e " in c]
    assert installs and any(synced(arg) for arg in installs[-1])
    # GPU workers install through the one XPU install script (tests/unit/test_xpu_stack.py
    # checks the script), given the synced project.
    (install,) = [shlex.split(c) for c in config["worker_setup_commands"]
                  if "cluster/install-xpu.sh" in c]
    assert synced(install[-1]) and install[-2].endswith("cluster/install-xpu.sh")


# ---- KubeRay ---------------------------------------------------------------------------


def intel_gpus(container: dict[str, Any]) -> list[str]:
    """The Intel GPU resources (of either driver) that ``container`` limits."""
    limits = container.get("resources", {}).get("limits", {})
    return [name for name in limits if name in INTEL_GPUS.values()]


def gpu_groups(path: Path = RAYSERVICE) -> list[dict[str, Any]]:
    """The worker groups of the manifest at ``path`` whose pods get Intel GPUs."""
    groups = rayservice(path)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return [g for g in groups if any(intel_gpus(c) for c in g["template"]["spec"]["containers"])]


@pytest.mark.parametrize("driver", list(RAYSERVICES))
def test_rayservice_manifest_is_well_formed(driver: str) -> None:
    kinds = {doc["kind"]: doc for doc in manifest_documents(RAYSERVICES[driver])}
    service = kinds["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    assert service["metadata"]["name"]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay
    claim = kinds["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    assert "ReadWriteMany" in kinds["PersistentVolume"]["spec"]["accessModes"]


@pytest.mark.parametrize("driver", list(RAYSERVICES))
def test_rayservice_keeps_the_gcs_in_redis_with_a_password_from_a_secret(driver: str) -> None:
    """GCS fault tolerance on (KubeRay's gcsFaultToleranceOptions): a head pod that dies is
    replaced without losing the cluster or the Serve application."""
    cluster = rayservice(RAYSERVICES[driver])["spec"]["rayClusterConfig"]
    options = cluster["gcsFaultToleranceOptions"]
    host, port = options["redisAddress"].rsplit(":", 1)
    assert host and int(port) > 0
    password = options["redisPassword"]
    assert "value" not in password  # never in the manifest itself
    secret = password["valueFrom"]["secretKeyRef"]
    assert secret["name"] and secret["key"]
    # KubeRay refuses a password both here and in rayStartParams, and the older annotation
    # (ray.io/ft-enabled) together with these options.
    assert "redis-password" not in cluster["headGroupSpec"]["rayStartParams"]
    annotations = rayservice(RAYSERVICES[driver])["metadata"].get("annotations", {})
    assert "ray.io/ft-enabled" not in annotations
    create = f"kubectl create secret generic {secret['name']} --from-literal={secret['key']}="
    assert create in RAYSERVICE.read_text() and create in (CLUSTER / "README.md").read_text()


@pytest.mark.parametrize("driver", list(RAYSERVICES))
def test_rayservice_workers_start_ray_on_their_reserved_cores(driver: str) -> None:
    """KubeRay runs the containers' own commands (overwrite-container-cmd), which start its
    generated `ray start` through the core reservation on workers, as is on the head."""
    service = rayservice(RAYSERVICES[driver])
    assert service["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        assert container["command"] == ["/bin/bash", "-lc", "--"]
        (script,) = container["args"]
        assert script.startswith("ulimit -n 65536; exec ")  # KubeRay's own ulimit, kept
        assert script.endswith("$KUBERAY_GEN_RAY_START_CMD")
        reserved = "python -m deployments.core_reservation --cores ${RESERVED_CORES:-auto} --"
        assert (reserved in script) == (group is not cluster["headGroupSpec"])
    assert (REPO / "deployments" / "core_reservation.py").is_file()  # in the image
    assert "COPY deployments ./deployments" in (CLUSTER / "Dockerfile.xpu").read_text()
    # the launcher's workers: start-node.sh reserves them
    start = " ".join(launcher()["worker_start_ray_commands"])
    assert "RESERVED_CORES=" in start and "deployments.core_reservation" in \
        START_NODE.read_text()


@pytest.mark.parametrize("driver", list(RAYSERVICES))
def test_rayservice_gpu_workers_request_intel_gpus_and_advertise_tiles(driver: str) -> None:
    groups = gpu_groups(RAYSERVICES[driver])
    assert groups
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        assert intel_gpus(container) == [INTEL_GPUS[driver]]  # this driver's nodes only
        resources = container["resources"]
        cards = resources["limits"][INTEL_GPUS[driver]]
        assert cards >= 1 and resources["requests"][INTEL_GPUS[driver]] == cards  # extended
        # KubeRay makes Ray GPUs only of resource names ending in "gpu" (IsGPUResourceKey):
        # not of these, so num-gpus is explicit. Tiles are whole multiples of cards.
        assert not INTEL_GPUS[driver].endswith("gpu")
        tiles = int(group["rayStartParams"]["num-gpus"])
        assert tiles >= cards and tiles % cards == 0
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("ZE_FLAT_DEVICE_HIERARCHY") == "FLAT"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@pytest.mark.parametrize("driver", list(RAYSERVICES))
def test_rayservice_gpu_pods_run_as_the_image_user_with_the_render_group(driver: str) -> None:
    """uid 1000 opens /dev/dri/renderD* (mode 0660, group render) only as a member of the
    host's render group: its id, one number, goes in supplementalGroups. No fsGroup."""
    for group in gpu_groups(RAYSERVICES[driver]):
        pod = group["template"]["spec"]
        context = pod["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (CONTAINER_UID, CONTAINER_UID)
        assert "fsGroup" not in context
        (render_gid,) = context["supplementalGroups"]
        assert isinstance(render_gid, int) and render_gid > 0  # not root's group
        for container in pod["containers"]:  # no container overrides the pod's user
            assert container.get("securityContext", {}).get("runAsUser", CONTAINER_UID) == (
                CONTAINER_UID)
    assert "getent group render | cut -d: -f3" in RAYSERVICES[driver].read_text()


def volume_holding(mounts: dict[str, dict[str, Any]], path: str) -> dict[str, Any]:
    """The volume mounted deepest above ``path``, from ``{mount path: volume}``."""
    matches = [mount for mount in mounts if PurePosixPath(path).is_relative_to(mount)]
    assert matches, f"{path} is on no mounted volume"
    return mounts[max(matches, key=len)]


@pytest.mark.parametrize("driver", list(RAYSERVICES))
def test_rayservice_mounts_what_its_serve_config_names(driver: str) -> None:
    path = RAYSERVICES[driver]
    served = yaml.safe_load(rayservice(path)["spec"]["serveConfigV2"])
    (app,) = served["applications"]
    claim = next(d for d in manifest_documents(path) if d["kind"] == "PersistentVolumeClaim")
    for group in gpu_groups(path):
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        checkpoints = volume_holding(mounts, app["args"]["checkpoint_path"])
        assert checkpoints["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert "emptyDir" in volume_holding(mounts, app["args"]["local_cache_dir"])  # node-local


@pytest.mark.parametrize("driver", list(RAYSERVICES))
def test_rayservice_can_grow_to_max_replicas(driver: str) -> None:
    path = RAYSERVICES[driver]
    served = yaml.safe_load(rayservice(path)["spec"]["serveConfigV2"])
    scaling = llm_server_options(served["applications"][0])["autoscaling_config"]
    groups = gpu_groups(path)
    slots = sum(int(g["rayStartParams"]["num-gpus"]) * g["maxReplicas"] for g in groups)
    min_slots = sum(int(g["rayStartParams"]["num-gpus"]) * g["minReplicas"] for g in groups)
    assert scaling["max_replicas"] <= slots
    assert scaling["min_replicas"] <= min_slots  # min_replicas never waits for a new pod
