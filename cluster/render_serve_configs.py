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
- the ``serveConfigV2`` block of ``cluster/rayservice.yaml``: for KubeRay (the rest of that
  manifest is written by hand and left as it is);
- ``serve_config.llama_cpp.yaml``: the same single-machine service on engine llama_cpp and
  the GGUF demo checkpoint (``make serve-llama-cpp``; ``LLAMA_CPP_ARGS``).

Usage, from anywhere::

    python cluster/render_serve_configs.py           # rewrite both after editing serve_config.yaml
    python cluster/render_serve_configs.py --check   # exit 1 if either is stale (the tests run it)
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
LLAMA_CPP_CONFIG = REPO / "serve_config.llama_cpp.yaml"
APP_NAME = "llm"

# Where every node mounts the checkpoint root (NFS; cluster/README.md) and keeps its cache.
CHECKPOINT_ROOT = PurePosixPath("/mnt/models")
LOCAL_CACHE_DIR = "/var/cache/ipex-llm-serve/checkpoints"
# Intel GPU nodes. For a cluster of CPU-socket nodes, set "cpu" and run this script again.
CLUSTER_DEVICE = "xpu"
# The llama.cpp variant, reading the checkpoint `llm-checkpoint demo --format gguf` makes
# (`device: auto` places a CPU-only engine on CPU sockets or the whole host, never a GPU).
LLAMA_CPP_ARGS = {"engine": "llama_cpp",
                  "checkpoint_path": "checkpoints/smollm2-135m-instruct-gguf"}

HEADER = ("# Generated from serve_config.yaml by cluster/render_serve_configs.py: edit those, not "
          "this.\n")
RAYSERVICE_KEY = "serveConfigV2: |"


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


def rendered() -> dict[Path, str]:
    """The up-to-date text of every file this script owns (in part)."""
    source = yaml.safe_load(SOURCE.read_text())
    body = render_yaml(cluster_serve_config(source))
    return {
        CLUSTER_CONFIG: HEADER + body,
        RAYSERVICE: with_block(RAYSERVICE.read_text(), RAYSERVICE_KEY, body),
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
