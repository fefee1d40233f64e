"""Derive the cluster Serve configs from serve_config.yaml, so the two cannot drift.

serve_config.yaml is the one source of the ``llm`` application: its args, autoscaling,
health checks and graceful shutdown. A cluster differs from one machine in three args only
(``CLUSTER_ARGS``): the checkpoint lives on the shared NFS mount, replicas copy it to a
node-local cache, and ``device`` is named, because ``auto`` is resolved when the application
is built, against the resources of the nodes that have joined by then (a worker that joins
later would not count, and replicas would be placed as on a GPU-less host).

Writes:

- ``cluster/serve_config.cluster.yaml``: for bare metal and the cluster launcher
  (``serve deploy cluster/serve_config.cluster.yaml``);
- the ``serveConfigV2`` block of ``cluster/rayservice.yaml``: for KubeRay on GPU nodes of the
  i915 kernel driver (the rest of that manifest is written by hand and left as it is);
- ``cluster/rayservice.xe.yaml``: that manifest, whole, for GPU nodes of the ``xe`` kernel
  driver, whose device plugin advertises ``gpu.intel.com/xe`` instead of
  ``gpu.intel.com/i915`` (``xe_manifest``), so the two manifests cannot drift;
- ``serve_config.llama_cpp.yaml``: the same single-machine service on engine llama_cpp and
  the GGUF demo checkpoint (``make serve-llama-cpp``; ``LLAMA_CPP_ARGS``).

Usage, from anywhere::

    python cluster/render_serve_configs.py           # rewrite them after editing serve_config.yaml
                                                     # or cluster/rayservice.yaml
    python cluster/render_serve_configs.py --check   # exit 1 if one is stale (the tests run it)
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "serve_config.yaml"
CLUSTER_CONFIG = REPO / "cluster" / "serve_config.cluster.yaml"
RAYSERVICE = REPO / "cluster" / "rayservice.yaml"
RAYSERVICE_XE = REPO / "cluster" / "rayservice.xe.yaml"
LLAMA_CPP_CONFIG = REPO / "serve_config.llama_cpp.yaml"
APP_NAME = "llm"

# Where every node mounts the checkpoint root (NFS; cluster/README.md) and keeps its cache.
CHECKPOINT_ROOT = PurePosixPath("/mnt/models")
LOCAL_CACHE_DIR = "/var/cache/ipex-llm-serve/checkpoints"
# Intel GPU nodes. For a cluster of CPU-socket nodes, set "cpu" and run this script again.
CLUSTER_DEVICE = "xpu"
# The llama.cpp variant, reading the checkpoint `llm-checkpoint demo --format gguf` makes
# (`device: auto` places a CPU-only engine on CPU sockets or the whole host, never a GPU).
# Every slot holds the demo model's whole context (8192 tokens), as engine ipex_llm's rows
# may: a long prompt is served by both engines alike. llama.cpp allocates the cells of all
# max_batch_size slots up front (for this model's 23 KB per cell, about 3 GB at 16 slots).
LLAMA_CPP_ARGS = {"engine": "llama_cpp",
                  "checkpoint_path": "checkpoints/smollm2-135m-instruct-gguf",
                  "engine_options": {"context_tokens": 8192}}

HEADER = ("# Generated from serve_config.yaml by cluster/render_serve_configs.py: edit those, not "
          "this.\n")
RAYSERVICE_KEY = "serveConfigV2: |"

# The xe manifest: rayservice.yaml with the other device plugin resource, and these renames
# (each must match: an edit of rayservice.yaml that breaks one fails the render).
I915_RESOURCE = "gpu.intel.com/i915"
XE_RESOURCE = "gpu.intel.com/xe"
XE_RENAMES = (("groupName: xpu-max1550\n", "groupName: xpu-max1550-xe\n"),)
XE_HEADER = """\
# Generated from cluster/rayservice.yaml by cluster/render_serve_configs.py: edit that, not this.
#
# KubeRay (ray.io/v1): cluster/rayservice.yaml for GPU nodes on the `xe` kernel driver, where
# Intel's GPU device plugin advertises `gpu.intel.com/xe` rather than `gpu.intel.com/i915`.
# Otherwise the same objects: apply this file or rayservice.yaml, not both.
#
#   kubectl apply -f cluster/rayservice.xe.yaml -l app.kubernetes.io/component=checkpoints
#   kubectl apply -f cluster/convert-job.yaml      # once: publishes the checkpoint
#   kubectl wait --for=condition=complete --timeout=30m job/ipex-llm-checkpoint-convert
#   kubectl apply -f cluster/rayservice.xe.yaml
#   kubectl port-forward svc/ipex-llm-serve-serve-svc 8000   # KubeRay's Serve service
#
# The worker group keeps rayservice.yaml's two tiles per card (num-gpus "2", a Data Center GPU
# Max 1550). xe is the driver Intel supports for newer GPUs (Battlemage, Lunar Lake and
# later), which show one device per unit of gpu.intel.com/xe: for those, set num-gpus to the
# devices per pod ("1") in the copy you apply, as you set the image, the NFS server and the
# render group id there. Prerequisites and steps: rayservice.yaml's header, cluster/README.md.
"""


def _llm_args(config: dict[str, Any]) -> dict[str, Any]:
    apps = [app for app in config.get("applications", []) if app.get("name") == APP_NAME]
    if len(apps) != 1:
        raise ValueError(f"{SOURCE}: expected one application named {APP_NAME!r}")
    return apps[0].setdefault("args", {})


def llama_cpp_serve_config(source: dict[str, Any]) -> dict[str, Any]:
    """``source`` with the llama.cpp engine's args in the ``llm`` app."""
    config = copy.deepcopy(source)
    _llm_args(config).update(LLAMA_CPP_ARGS)
    return config


def cluster_serve_config(source: dict[str, Any]) -> dict[str, Any]:
    """``source`` (a parsed serve_config.yaml) with the cluster's args in the ``llm`` app."""
    config = copy.deepcopy(source)
    args = _llm_args(config)
    checkpoint_name = PurePosixPath(args.get("checkpoint_path", "")).name
    if not checkpoint_name:
        raise ValueError(f"{SOURCE}: application {APP_NAME!r} names no checkpoint_path")
    args.update(checkpoint_path=str(CHECKPOINT_ROOT / checkpoint_name),
                local_cache_dir=LOCAL_CACHE_DIR, device=CLUSTER_DEVICE)
    return config


def render_yaml(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100)


def with_block(manifest: str, key: str, body: str) -> str:
    """``manifest`` with the literal block under the line ``key`` replaced by ``body``.

    The block is every following line indented deeper than ``key`` (blank lines inside it
    included); text after it, comments included, is kept.
    """
    lines = manifest.splitlines(keepends=True)
    for start, line in enumerate(lines):
        if line.strip() != key:
            continue
        indent = len(line) - len(line.lstrip())
        end = start + 1
        while end < len(lines) and (not lines[end].strip()
                                    or len(lines[end]) - len(lines[end].lstrip()) > indent):
            end += 1
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1  # blank lines before the next key belong to the layout, not the block
        pad = " " * (indent + 2)
        block = [pad + text if text.strip() else "\n" for text in body.splitlines(keepends=True)]
        return "".join([*lines[: start + 1], *block, *lines[end:]])
    raise ValueError(f"no line `{key}` in the manifest")


def without_header(manifest: str) -> str:
    """``manifest`` from its first line that is neither a comment nor blank."""
    lines = manifest.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines)
                  if line.strip() and not line.lstrip().startswith("#")), len(lines))
    return "".join(lines[start:])


def xe_manifest(i915_manifest: str) -> str:
    """The xe manifest: ``i915_manifest`` (rayservice.yaml's text) for nodes on the xe driver.

    Its header comment gives way to ``XE_HEADER``; below it every ``I915_RESOURCE`` becomes
    ``XE_RESOURCE`` and each of ``XE_RENAMES`` is applied. Raises ValueError when a rename
    matches nothing or "i915" is left below the header, so that an edit of rayservice.yaml the
    mapping does not cover stops the render instead of yielding pods that ask for the wrong
    driver's resource.
    """
    body = without_header(i915_manifest)
    if I915_RESOURCE not in body:
        raise ValueError(f"{RAYSERVICE.name} requests no {I915_RESOURCE}")
    body = body.replace(I915_RESOURCE, XE_RESOURCE)
    for old, new in XE_RENAMES:
        if old not in body:
            raise ValueError(f"no {old.strip()!r} in {RAYSERVICE.name}: update XE_RENAMES")
        body = body.replace(old, new)
    left = [line.strip() for line in body.splitlines() if "i915" in line]
    if left:
        raise ValueError(f"{RAYSERVICE.name} names i915 where XE_RENAMES does not reach: {left}")
    return XE_HEADER + body


def rendered() -> dict[Path, str]:
    """The up-to-date text of every file this script owns (in part)."""
    source = yaml.safe_load(SOURCE.read_text())
    body = render_yaml(cluster_serve_config(source))
    rayservice = with_block(RAYSERVICE.read_text(), RAYSERVICE_KEY, body)
    return {
        CLUSTER_CONFIG: HEADER + body,
        RAYSERVICE: rayservice,
        RAYSERVICE_XE: xe_manifest(rayservice),
        LLAMA_CPP_CONFIG: HEADER.replace("those", "that") + "# `make serve-llama-cpp` runs it.\n"
        + render_yaml(llama_cpp_serve_config(source)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a file is not up to date")
    options = parser.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not options.check:
            path.write_text(text)
    for path in stale:
        verb = "is stale" if options.check else "rewritten"
        print(f"{path.relative_to(REPO)}: {verb}", file=sys.stderr)
    if options.check and stale:
        print("run: python cluster/render_serve_configs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
