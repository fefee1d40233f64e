"""Placement slots: the CPU socket or Intel GPU tile an LLM replica runs on, and pinning to it.

A *slot* is one unit of hardware that one replica owns: a CPU socket (its logical CPUs,
hyper-threads included, and its NUMA node) or an Intel GPU tile (one Level Zero device).
Ray has no NUMA binding of its own, so scheduling and pinning are split in two:

1. The application (``build_app``) decides how replicas are scheduled, from the config's
   ``device`` and the cluster's resources (``ray.cluster_resources()``)::

       placement = resolve_placement(cfg.device, ray.cluster_resources())
       options = replica_ray_options(cfg.device, ray.cluster_resources(), cfg.accelerator_type)

   XPU replicas ask for one Ray ``GPU`` each. CPU-socket replicas ask for
   one unit of the custom resource ``cpu_socket`` (:data:`CPU_SOCKET_RESOURCE`), which node
   start scripts advertise (``cluster/start-node.sh``). With neither resource in the cluster,
   ``device: auto`` asks for nothing extra and the replica takes its whole host as one slot,
   so the default config works on a plain ``serve run``.

2. The replica, in its constructor and before anything touches the XPU runtime, restricts
   itself to the GPUs Ray assigned it (XPU only), claims a slot and pins itself to it::

       if placement == "xpu":
           restrict_to_gpus(ray.get_runtime_context().get_accelerator_ids()["GPU"])
       self._claim = claim_slot(placement, node_id=ray.get_runtime_context().get_node_id())
       report = pin_to_slot(self._claim.slot, xmx_disabled=cfg.xmx_disabled)

   Ray sets ``ZE_AFFINITY_MASK`` itself only when it chose its Intel GPU manager, which needs
   ``dpctl`` to import and find GPUs; otherwise its NVIDIA manager hands out the same ids as
   ``CUDA_VISIBLE_DEVICES``, which Level Zero ignores. The ids are the replica's either way,
   so ``restrict_to_gpus`` sets the Level Zero mask from them, whichever manager Ray picked.

   The claim holds a file lock per (node, slot) for the replica's lifetime, so two replicas
   on a raylet that advertises two sockets take different sockets.

Public API
----------
- ``CPU_SOCKET_RESOURCE``: the custom Ray resource name, ``"cpu_socket"``.
- ``DEFAULT_LOCK_DIR``: where slot claims keep their lock files (node-local ``/tmp``).
- ``Slot``: one slot (frozen); ``to_dict()``, ``describe()``, ``labels()`` for metrics.
- ``discover_cpu_sockets(sysfs_root="/sys") -> list[Slot]``: the host's sockets.
- ``host_slot(affinity, sysfs_root="/sys") -> Slot``: the given CPUs as one slot.
- ``discover_xpu_tiles(env=os.environ, xpu_module=None, sysfs_root="/sys") -> list[Slot]``:
  the Intel GPU devices this process sees (tiles, when ``ZE_FLAT_DEVICE_HIERARCHY=FLAT``).
- ``discover_slots(sysfs_root="/sys", env=os.environ, xpu_module=None) -> list[Slot]``.
- ``sysfs_xpu_tiles(sysfs_root="/sys") -> int``: the host's Intel GPU tiles, from the kernel
  drivers (i915, xe), for nodes that count their tiles without the GPU stack.
- ``restrict_to_gpus(gpu_ids, env=os.environ) -> dict``: ``ZE_AFFINITY_MASK`` and
  ``ONEAPI_DEVICE_SELECTOR`` for the GPU ids Ray assigned this process.
- ``resolve_placement(device, cluster_resources, cpu_only=False) -> "xpu" | "cpu_socket" |
  "host"``.
- ``replica_ray_options(device, cluster_resources, accelerator_type=None, cpu_only=False)
  -> dict``.
- ``claim_slot(placement, *, node_id, lock_dir, sysfs_root, env, affinity, xpu_module)
  -> SlotClaim``; raises ``SlotUnavailableError`` when every candidate slot is taken.
- ``pin_to_slot(slot, *, xmx_disabled, proc_root, set_affinity, set_membind, torch_module,
  xpu_module, env) -> PinningReport``.
- ``bind_memory(numa_nodes)``: ``set_mempolicy(MPOL_BIND)`` through libnuma.
- ``python -m deployments.placement [--sysfs-root DIR] [--count cpu|xpu]``: the host's slots
  as JSON, or how many of one kind (for node start scripts).

Every function takes its inputs (sysfs root, proc root, environment, affinity, torch module,
affinity and memory-policy setters) as parameters, so tests can fake a 2-socket host or a
4-tile GPU node. torch is imported lazily, and only when no fake is given.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import importlib
import json
import logging
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import filelock

logger = logging.getLogger(__name__)

CPU_SOCKET_RESOURCE = "cpu_socket"
GPU_RESOURCE = "GPU"
DEFAULT_LOCK_DIR = Path(tempfile.gettempdir()) / "ipex-llm-serve-slots"

DeviceChoice = Literal["xpu", "cpu", "auto"]
Placement = Literal["xpu", "cpu_socket", "host"]
SlotKind = Literal["cpu", "xpu"]

# Linux <numaif.h>: bind allocations strictly to the given nodes.
MPOL_BIND = 2
# A thread can start threads while we pin; each pass pins the ones the previous listing missed.
_MAX_PIN_PASSES = 10
_WILDCARD_SELECTORS = frozenset({"*", "gpu"})
_INTEL_PCI_VENDOR = "0x8086"
# Data Center GPU Max (Ponte Vecchio) PCI device ids: the only Intel GPUs with several tiles.
# Under i915 every other card counts as one tile, since i915 lists a Meteor Lake iGPU's
# media engine as a second GT directory too; the xe driver lists tiles as such.
_MULTI_TILE_DEVICE_IDS = frozenset({
    "0x0b69", "0x0b6e", "0x0bd0", "0x0bd4", "0x0bd5", "0x0bd6", "0x0bd7", "0x0bd8", "0x0bd9",
    "0x0bda", "0x0bdb"})


@dataclass(frozen=True)
class Slot:
    """One unit of hardware that one replica owns.

    ``index`` is the socket's ``physical_package_id``, or the Level Zero device id that
    ``ZE_AFFINITY_MASK`` names; ``device`` is the torch device the replica uses (``"cpu"``,
    or ``"xpu:N"`` where N is the tile's ordinal among the devices this process sees, so
    ``"xpu:0"`` inside a replica that Ray gave one GPU). ``cpus`` are logical CPU ids,
    hyper-threads included; ``physical_cores`` counts distinct cores among them.
    ``numa_nodes`` are the NUMA nodes holding those CPUs (several under sub-NUMA clustering).
    """

    kind: SlotKind
    index: int
    device: str
    cpus: tuple[int, ...] = ()
    physical_cores: int = 0
    numa_nodes: tuple[int, ...] = ()
    node_id: str | None = None
    name: str | None = None

    @property
    def numa_node(self) -> int | None:
        """The slot's NUMA node when it has exactly one, else None."""
        return self.numa_nodes[0] if len(self.numa_nodes) == 1 else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the CLI and the replica's status report."""
        return {
            "kind": self.kind,
            "index": self.index,
            "device": self.device,
            "cpus": list(self.cpus),
            "physical_cores": self.physical_cores,
            "numa_node": self.numa_node,
            "numa_nodes": list(self.numa_nodes),
            "node_id": self.node_id,
            "name": self.name,
        }

    def describe(self) -> str:
        """One line for logs, e.g. ``cpu slot 1: cpus 2-3,6-7 (2 cores), NUMA node 1``."""
        if self.kind == "xpu":
            text = f"xpu tile {self.index} as {self.device}"
            if self.name:
                text += f" ({self.name})"
        else:
            nodes = ",".join(map(str, self.numa_nodes)) or "unknown"
            text = (
                f"cpu slot {self.index}: cpus {format_cpulist(self.cpus)} "
                f"({self.physical_cores} cores), NUMA node {nodes}"
            )
        return f"{text} on node {self.node_id}" if self.node_id else text

    def labels(self) -> dict[str, str]:
        """Prometheus labels that tell replicas on different slots apart."""
        return {"device": self.kind, "slot": str(self.index)}


@dataclass(frozen=True)
class PinningReport:
    """What ``pin_to_slot`` applied; a replica logs it and exposes it in its status.

    ``cpus`` are the slot's CPUs the model computes on; ``reserved_cpus`` the node's CPUs
    kept for the serving stack, where the replica's other threads run (empty: none kept,
    and every thread runs on ``cpus``).

    ``membind_error`` says why memory binding was not applied (no libnuma, a container that
    forbids ``set_mempolicy``, a slot with no known NUMA node); it is never raised.
    """

    slot: Slot
    cpus: tuple[int, ...]
    reserved_cpus: tuple[int, ...]
    threads_pinned: int
    torch_threads: int | None
    membind: bool
    membind_error: str | None
    env: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "slot": self.slot.to_dict(), "cpus": list(self.cpus),
                "reserved_cpus": list(self.reserved_cpus)}


class SlotUnavailableError(RuntimeError):
    """No slot is left for this replica on its node."""


class SlotClaim:
    """A slot held by this process, with the file lock that keeps other replicas off it.

    Keep the claim for the replica's lifetime (store it on the replica). The lock is an
    ``flock``: the kernel drops it when the process dies, so a crashed replica leaves no
    stale claim behind. Usable as a context manager; ``release()`` is idempotent.
    """

    def __init__(self, slot: Slot, lock: filelock.BaseFileLock | None) -> None:
        self.slot = slot
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> SlotClaim:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


# ---------------------------------------------------------------------------- CPU sockets


def parse_cpulist(text: str) -> list[int]:
    """Parse the kernel's CPU/node list format (``"0-3,8-11"``; empty means none)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def format_cpulist(cpus: Iterable[int]) -> str:
    """The inverse of ``parse_cpulist``: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    ranges: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _cpu_dir(sysfs_root: str | Path) -> Path:
    return Path(sysfs_root) / "devices" / "system" / "cpu"


def _online_cpus(sysfs_root: str | Path) -> list[int]:
    return parse_cpulist((_cpu_dir(sysfs_root) / "online").read_text())


def _core_of(sysfs_root: str | Path, cpu: int) -> tuple[int, frozenset[int]]:
    """(package id, hyper-thread siblings) of one CPU.

    The sibling set identifies the physical core: ``core_id`` alone repeats across sockets
    (and across dies on some packages). A CPU without topology files (some VMs and sandboxes
    expose none) counts as package 0 and a core of its own.
    """
    topology = _cpu_dir(sysfs_root) / f"cpu{cpu}" / "topology"
    try:
        package = int((topology / "physical_package_id").read_text())
        siblings = frozenset(parse_cpulist((topology / "thread_siblings_list").read_text()))
    except FileNotFoundError:
        return 0, frozenset({cpu})
    return package, siblings


def core_groups(cpus: Iterable[int], sysfs_root: str | Path = "/sys") -> list[tuple[int, ...]]:
    """``cpus`` grouped by physical core (hyper-thread siblings together), lowest CPU first."""
    chosen = set(cpus)
    groups = {tuple(sorted(chosen & _core_of(sysfs_root, cpu)[1] | {cpu})) for cpu in chosen}
    return sorted(groups)


def _numa_node_of_cpus(sysfs_root: str | Path) -> dict[int, int]:
    """CPU id -> NUMA node, from ``node/nodeN/cpulist``; empty on kernels without NUMA."""
    node_dir = Path(sysfs_root) / "devices" / "system" / "node"
    mapping: dict[int, int] = {}
    for path in node_dir.glob("node[0-9]*/cpulist"):
        node = int(path.parent.name.removeprefix("node"))
        mapping.update(dict.fromkeys(parse_cpulist(path.read_text()), node))
    return mapping


def _cpu_slot(index: int, cpus: Iterable[int], sysfs_root: str | Path) -> Slot:
    ordered = tuple(sorted(set(cpus)))
    numa_of = _numa_node_of_cpus(sysfs_root)
    cores = {_core_of(sysfs_root, cpu) for cpu in ordered}
    return Slot(
        kind="cpu",
        index=index,
        device="cpu",
        cpus=ordered,
        physical_cores=len(cores),
        numa_nodes=tuple(sorted({numa_of[cpu] for cpu in ordered if cpu in numa_of})),
    )


def discover_cpu_sockets(sysfs_root: str | Path = "/sys") -> list[Slot]:
    """One slot per CPU socket of the host, ordered by package id, online CPUs only."""
    packages: dict[int, list[int]] = {}
    for cpu in _online_cpus(sysfs_root):
        package, _ = _core_of(sysfs_root, cpu)
        packages.setdefault(package, []).append(cpu)
    return [_cpu_slot(package, cpus, sysfs_root) for package, cpus in sorted(packages.items())]


def host_slot(affinity: Iterable[int], sysfs_root: str | Path = "/sys") -> Slot:
    """The given CPUs (normally the process's whole affinity) as one slot, index 0.

    This is the slot of ``placement="host"``: no socket resource in the cluster, so the
    replica takes what it was given rather than guessing at a socket.
    """
    return _cpu_slot(0, affinity, sysfs_root)


# ---------------------------------------------------------------------------- Intel GPUs


def _parse_device_ids(variable: str, value: str) -> list[int] | None:
    """Integer device ids of a selector value; None when it selects every device."""
    entries = [entry.strip() for entry in value.split(",") if entry.strip()]
    if any(entry in _WILDCARD_SELECTORS for entry in entries):
        return None
    if not all(entry.isdigit() for entry in entries):
        raise ValueError(
            f"{variable}={value!r}: expected comma-separated device ids such as '0,1'. "
            "Sub-device ids ('0.1') mean ZE_FLAT_DEVICE_HIERARCHY is not FLAT; set "
            "ZE_FLAT_DEVICE_HIERARCHY=FLAT on the node so every tile is a device of its own."
        )
    return [int(entry) for entry in entries]


def visible_xpu_ids(env: Mapping[str, str] = os.environ) -> list[int] | None:
    """Device ids this process may use, as Ray's Intel GPU accelerator manager sets them.

    ``ZE_AFFINITY_MASK`` first (what Ray 2.60 sets when it assigns GPUs), else
    ``ONEAPI_DEVICE_SELECTOR`` (``level_zero:2`` or bare ids). None means no restriction.
    """
    if "ZE_AFFINITY_MASK" in env:
        return _parse_device_ids("ZE_AFFINITY_MASK", env["ZE_AFFINITY_MASK"])
    selector = env.get("ONEAPI_DEVICE_SELECTOR")
    if selector is None:
        return None
    backend, _, ids = selector.rpartition(":")
    if backend not in ("", "level_zero"):
        raise ValueError(
            f"ONEAPI_DEVICE_SELECTOR={selector!r}: only the level_zero backend is supported"
        )
    return _parse_device_ids("ONEAPI_DEVICE_SELECTOR", ids)


def _torch_xpu() -> Any | None:
    """``torch.xpu`` when torch is installed and sees an Intel GPU, else None."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return None
    xpu = getattr(torch, "xpu", None)
    return xpu if xpu is not None and xpu.is_available() else None


def _warn_unless_flat(env: Mapping[str, str]) -> None:
    hierarchy = env.get("ZE_FLAT_DEVICE_HIERARCHY", "FLAT")
    if hierarchy != "FLAT":
        logger.warning(
            "ZE_FLAT_DEVICE_HIERARCHY=%s: a multi-tile GPU counts as one device, so one "
            "slot spans all its tiles; set ZE_FLAT_DEVICE_HIERARCHY=FLAT on the node (before "
            "`ray start`) for one replica per tile",
            hierarchy,
        )


def discover_xpu_tiles(env: Mapping[str, str] = os.environ, xpu_module: Any = None,
                       sysfs_root: str | Path = "/sys") -> list[Slot]:
    """The Intel GPU devices this process sees, one slot each (tiles under FLAT hierarchy).

    ``xpu_module`` is ``torch.xpu`` or an object like it (``device_count()``,
    ``get_device_properties(i).name``). Without one, a process whose devices are already
    restricted (``ZE_AFFINITY_MASK``) trusts the mask and imports nothing, so a replica can
    set the XPU runtime variables before torch loads; otherwise torch.xpu is probed, then
    the kernel drivers' sysfs (``sysfs_xpu_tiles``).
    """
    _warn_unless_flat(env)
    ids = visible_xpu_ids(env)
    if xpu_module is None and ids is None:
        xpu_module = _torch_xpu()
    if xpu_module is not None:
        count = xpu_module.device_count()
    elif ids is not None:
        count = len(ids)
    else:
        count = sysfs_xpu_tiles(sysfs_root)
    ids = list(range(count)) if ids is None else ids[:count]
    return [
        Slot(
            kind="xpu",
            index=device_id,
            device=f"xpu:{ordinal}",
            name=xpu_module.get_device_properties(ordinal).name if xpu_module else None,
        )
        for ordinal, device_id in enumerate(ids)
    ]


def discover_slots(
    sysfs_root: str | Path = "/sys",
    env: Mapping[str, str] = os.environ,
    xpu_module: Any = None,
) -> list[Slot]:
    """Every slot of this host: its CPU sockets, then the Intel GPU devices it sees."""
    return discover_cpu_sockets(sysfs_root) + discover_xpu_tiles(env, xpu_module, sysfs_root)


def _sysfs_card_tiles(card: Path) -> int:
    """Tiles of one DRM card: 0 unless it is an Intel GPU under the i915 or xe driver."""
    device = card / "device"
    try:
        vendor = (device / "vendor").read_text().strip()
        driver = (device / "driver").resolve().name
        device_id = (device / "device").read_text().strip().lower()
    except OSError:
        return 0
    if vendor != _INTEL_PCI_VENDOR:
        return 0
    if driver == "xe":
        return max(len(list(device.glob("tile[0-9]*"))), 1)
    if driver == "i915":
        if device_id in _MULTI_TILE_DEVICE_IDS:
            return max(len(list((card / "gt").glob("gt[0-9]*"))), 1)
        return 1
    return 0


def sysfs_xpu_tiles(sysfs_root: str | Path = "/sys") -> int:
    """Intel GPU tiles on this host, read from the kernel drivers' sysfs (no GPU runtime).

    One entry per ``class/drm/cardN`` (connectors such as ``card0-DP-1`` are skipped): the
    xe driver lists a card's tiles as ``device/tileN``; i915 lists GTs as ``gt/gtN``, which
    are tiles on a Data Center GPU Max only. Under ``ZE_FLAT_DEVICE_HIERARCHY=FLAT`` every
    tile is a Level Zero device: what one LLM replica owns.
    """
    cards = Path(sysfs_root) / "class" / "drm"
    return sum(_sysfs_card_tiles(card) for card in cards.glob("card[0-9]*")
               if card.name[4:].isdigit())


def restrict_to_gpus(gpu_ids: Sequence[str | int],
                     env: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Make this process see exactly the Intel GPU devices Ray assigned it; returns what it set.

    Call before anything in the process touches the XPU runtime (ipex-llm's XPU kernels,
    any ``torch.xpu`` call): Level Zero reads its mask once, when it initialises.
    ``ZE_AFFINITY_MASK`` names the devices by their node-wide ids (FLAT hierarchy: one tile
    each); the SYCL runtime then numbers the ones left from 0, so ``ONEAPI_DEVICE_SELECTOR``
    selects those on the Level Zero backend (not the same GPU again through OpenCL) and the
    replica's first device is ``xpu:0``. Raises SlotUnavailableError when Ray assigned none.
    """
    ids = [str(gpu_id).strip() for gpu_id in gpu_ids]
    if not ids:
        raise SlotUnavailableError(
            "Ray assigned this replica no GPU: an XPU replica must ask for one "
            "(ray_actor_options num_gpus=1, as build_app sets unless serve_config.yaml "
            "replaces ray_actor_options)")
    if not all(gpu_id.isdigit() for gpu_id in ids):
        raise SlotUnavailableError(f"Ray assigned GPU ids {ids}: expected device numbers")
    applied = {"ZE_AFFINITY_MASK": ",".join(ids),
               "ONEAPI_DEVICE_SELECTOR": "level_zero:" + ",".join(map(str, range(len(ids))))}
    env.update(applied)
    logger.info("restricted to Intel GPU device(s) %s", applied["ZE_AFFINITY_MASK"])
    return applied


# ---------------------------------------------------------------------------- scheduling


def resolve_placement(device: DeviceChoice, cluster_resources: Mapping[str, float], *,
                      cpu_only: bool = False) -> Placement:
    """Where replicas go for the config's ``device``, given ``ray.cluster_resources()``.

    ``auto`` prefers GPUs (unless the engine is ``cpu_only``), then advertised CPU sockets,
    then the whole host: the last keeps the default config working on a plain ``serve
    run``, where nobody advertised sockets.
    """
    if device == "xpu":
        return "xpu"
    if device == "cpu":
        return "cpu_socket"
    if device != "auto":
        raise ValueError(f"device must be 'xpu', 'cpu' or 'auto', not {device!r}")
    if cluster_resources.get(GPU_RESOURCE, 0) > 0 and not cpu_only:
        return "xpu"
    if cluster_resources.get(CPU_SOCKET_RESOURCE, 0) > 0:
        return "cpu_socket"
    return "host"


def replica_ray_options(
    device: DeviceChoice,
    cluster_resources: Mapping[str, float],
    accelerator_type: str | None = None,
    *,
    cpu_only: bool = False,
) -> dict[str, Any]:
    """The placement part of one LLM replica's ``ray_actor_options``.

    XPU: one Ray GPU (plus ``accelerator_type``, e.g. ``"Intel-GPU-Max-1550"``, when given).
    CPU socket: one unit of ``cpu_socket``. Host: nothing. The caller merges these into the
    rest of the actor options (``num_cpus`` is left to it). A request that no node can meet
    is logged, not refused: an autoscaling cluster may still add such nodes.
    """
    placement = resolve_placement(device, cluster_resources, cpu_only=cpu_only)
    if placement == "host":
        return {}
    resource = GPU_RESOURCE if placement == "xpu" else CPU_SOCKET_RESOURCE
    if cluster_resources.get(resource, 0) <= 0:
        logger.warning(
            "device=%s needs the Ray resource %r, which no node advertises yet; replicas stay "
            "pending until a node started by cluster/start-node.sh joins",
            device,
            resource,
        )
    if placement == "cpu_socket":
        return {"resources": {CPU_SOCKET_RESOURCE: 1}}
    options: dict[str, Any] = {"num_gpus": 1}
    if accelerator_type:
        options["accelerator_type"] = accelerator_type
    return options


# ---------------------------------------------------------------------------- claiming


def _lock_path(lock_dir: Path, node: str, slot: Slot) -> Path:
    safe_node = re.sub(r"[^A-Za-z0-9_.-]", "_", node)
    return lock_dir / f"{safe_node}-{slot.kind}-{slot.index}.lock"


def _socket_candidates(sysfs_root: str | Path, affinity: set[int]) -> list[Slot]:
    """Sockets restricted to the CPUs this process may use, dropping those it may not use.

    A raylet started under ``numactl --cpunodebind=N`` leaves exactly one candidate.
    """
    candidates = []
    for socket_slot in discover_cpu_sockets(sysfs_root):
        allowed = [cpu for cpu in socket_slot.cpus if cpu in affinity]
        if allowed:
            candidates.append(_cpu_slot(socket_slot.index, allowed, sysfs_root))
    return candidates


def _lock_first_free(candidates: Sequence[Slot], node: str, lock_dir: Path) -> SlotClaim | None:
    lock_dir.mkdir(parents=True, exist_ok=True)
    for slot in candidates:
        lock = filelock.FileLock(_lock_path(lock_dir, node, slot))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            continue
        return SlotClaim(slot, lock)
    return None


def claim_slot(
    placement: Placement,
    *,
    node_id: str | None = None,
    lock_dir: str | Path = DEFAULT_LOCK_DIR,
    sysfs_root: str | Path = "/sys",
    env: Mapping[str, str] = os.environ,
    affinity: Iterable[int] | None = None,
    xpu_module: Any = None,
) -> SlotClaim:
    """Pick this replica's slot and hold it: the first free (node, slot) lock wins.

    ``placement`` comes from ``resolve_placement``. ``node_id`` (the Ray node id) names the
    locks, because several raylets may share one host and its ``/tmp``; it defaults to the
    host name. ``affinity`` defaults to the process's CPU affinity: a raylet pinned to one
    socket leaves one candidate. ``host`` takes all those CPUs and locks nothing, since it
    asked Ray for nothing to share. Raises ``SlotUnavailableError`` when no slot is free.
    """
    node = node_id or socket.gethostname()
    allowed = set(os.sched_getaffinity(0) if affinity is None else affinity)
    if placement == "host":
        return SlotClaim(dataclasses.replace(host_slot(allowed, sysfs_root), node_id=node_id), None)
    if placement == "cpu_socket":
        candidates = _socket_candidates(sysfs_root, allowed)
    else:
        candidates = discover_xpu_tiles(env, xpu_module)
    candidates = [dataclasses.replace(slot, node_id=node_id) for slot in candidates]
    claim = _lock_first_free(candidates, node, Path(lock_dir))
    if claim is None:
        raise SlotUnavailableError(_no_slot_message(placement, candidates, node, Path(lock_dir)))
    logger.info("claimed %s", claim.slot.describe())
    return claim


def _no_slot_message(
    placement: Placement, candidates: Sequence[Slot], node: str, lock_dir: Path
) -> str:
    if not candidates:
        what = (
            "no CPU socket intersects this process's CPU affinity"
            if placement == "cpu_socket"
            else "no Intel GPU is visible (check ZE_AFFINITY_MASK and that the deployment "
            "requests num_gpus=1)"
        )
        return f"no {placement} slot for this replica on node {node}: {what}"
    taken = ", ".join(str(slot.index) for slot in candidates)
    resource, hardware = (
        (CPU_SOCKET_RESOURCE, "CPU sockets")
        if placement == "cpu_socket"
        else (GPU_RESOURCE, "Intel GPU tiles")
    )
    return (
        f"no free {placement} slot on node {node}: every slot ({taken}) is held by another "
        f"replica (locks in {lock_dir}). Ray placed more replicas here than the node has "
        f"slots: the node's {resource!r} resource must not exceed its number of {hardware}."
    )


# ---------------------------------------------------------------------------- pinning


def _task_ids(proc_root: str | Path) -> set[int]:
    return {int(path.name) for path in (Path(proc_root) / "self" / "task").iterdir()}


def _pin_all_threads(
    cpus: Sequence[int], proc_root: str | Path, set_affinity: Callable[[int, Iterable[int]], None]
) -> int:
    """Pin every thread of this process; return how many were pinned.

    ``sched_setaffinity(0, ...)`` pins only the calling thread, and Ray runs user code in a
    thread of its own, so each task id is pinned by id. The main thread is among them, so
    threads it starts later inherit the slot. Threads started while we pin are caught by the
    next pass; threads that exit meanwhile are skipped.
    """
    seen: set[int] = set()
    pinned = 0
    for _ in range(_MAX_PIN_PASSES):
        new = _task_ids(proc_root) - seen
        if not new:
            break
        for tid in sorted(new):
            seen.add(tid)
            try:
                set_affinity(tid, cpus)
            except ProcessLookupError:  # the thread exited since the listing
                continue
            pinned += 1
    return pinned


def bind_memory(numa_nodes: Sequence[int]) -> None:
    """``set_mempolicy(MPOL_BIND, numa_nodes)`` for the calling thread, through libnuma.

    Linux memory policy is per thread and inherited by threads created afterwards (there is
    no call to change another thread's), so call it from the thread that loads the model,
    before it loads. Raises OSError when libnuma is missing or the kernel refuses (container
    seccomp profiles often forbid it without CAP_SYS_NICE).
    """
    library = ctypes.util.find_library("numa")
    if library is None:
        raise OSError("libnuma not found (install libnuma1)")
    libnuma = ctypes.CDLL(library, use_errno=True)
    bits = ctypes.sizeof(ctypes.c_ulong) * 8
    mask = (ctypes.c_ulong * (max(numa_nodes) // bits + 1))()
    for node in numa_nodes:
        mask[node // bits] |= 1 << (node % bits)
    # The kernel reads maxnode - 1 bits (a historical off-by-one numactl also compensates).
    if libnuma.set_mempolicy(MPOL_BIND, mask, len(mask) * bits + 1) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"set_mempolicy(MPOL_BIND, {list(numa_nodes)}): {os.strerror(errno)}")


def _membind(slot: Slot, set_membind: Callable[[Sequence[int]], None]) -> str | None:
    """Apply memory binding; return why it was not applied, or None when it was."""
    if not slot.numa_nodes:
        return "the slot's NUMA node is unknown (no /sys/devices/system/node)"
    try:
        set_membind(slot.numa_nodes)
    except OSError as error:
        logger.warning(
            "memory stays unbound for %s (%s): allocations may land on a remote NUMA node",
            slot.describe(),
            error,
        )
        return str(error)
    return None


def _xpu_env(xmx_disabled: bool) -> dict[str, str]:
    """ipex-llm's runtime settings for Intel GPUs.

    SYCL_CACHE_PERSISTENT keeps compiled kernels on disk (a model's first run compiles for
    minutes); BIGDL_LLM_XMX_DISABLED is for GPUs without XMX units, e.g. Core Ultra iGPUs.
    """
    env = {"SYCL_CACHE_PERSISTENT": "1"}
    if xmx_disabled:
        env["BIGDL_LLM_XMX_DISABLED"] = "1"
    return env


def _open_xpu(slot: Slot, xpu_module: Any, env: Mapping[str, str]) -> Slot:
    """Select the slot's device as torch's current one; the slot with the device's name."""
    xpu = xpu_module
    if xpu is None:
        xpu = getattr(importlib.import_module("torch"), "xpu", None)
    if xpu is None or not xpu.is_available():
        raise SlotUnavailableError(
            f"{slot.describe()}: torch sees no Intel GPU (ZE_AFFINITY_MASK="
            f"{env.get('ZE_AFFINITY_MASK')}); install the XPU environment "
            "(cluster/install-xpu.sh) and check the node's driver (clinfo -l)")
    ordinal = int(slot.device.partition(":")[2] or 0)
    xpu.set_device(ordinal)
    return dataclasses.replace(slot, name=xpu.get_device_properties(ordinal).name)


def pin_to_slot(
    slot: Slot,
    *,
    reserved_cpus: Sequence[int] = (),
    xmx_disabled: bool = False,
    sysfs_root: str | Path = "/sys",
    proc_root: str | Path = "/proc",
    set_affinity: Callable[[int, Iterable[int]], None] = os.sched_setaffinity,
    set_membind: Callable[[Sequence[int]], None] = bind_memory,
    torch_module: Any = None,
    xpu_module: Any = None,
    env: MutableMapping[str, str] = os.environ,
) -> PinningReport:
    """Make this process use its slot; call it in the replica's constructor, before torch.

    XPU: the runtime variables (``_xpu_env``), then the first touch of the XPU runtime:
    ``xpu:0`` becomes torch's current device and its name goes into the report's slot
    (``restrict_to_gpus`` must have run: the runtime reads its device mask on this first
    touch). Raises SlotUnavailableError when torch sees no Intel GPU.
    CPU: every thread's affinity (the ``reserved_cpus`` when the node keeps some for the
    serving stack: the engine thread then moves itself to the slot's other CPUs,
    ``core_reservation.enter_compute_cpus``; else the slot's), torch threads = the physical
    cores the model computes on (one compute
    thread per core, as Intel's launcher does: hyper-thread siblings share the core's vector
    units), ``OMP_NUM_THREADS`` to match (it only takes effect for a torch imported later,
    and for child processes; torch's libgomp ignores ``KMP_*``), and memory binding to the
    slot's NUMA nodes where the host allows it: a refusal is reported, never raised.

    torch fixes a thread's OpenMP thread count the first time that thread runs an op, so a
    thread that ran torch before this call keeps its old count (measured: the main thread
    stayed at 2 while the calling thread and threads started afterwards ran with 1). Pin
    before any torch work, from the thread that will load the model.
    """
    if slot.kind == "xpu":
        applied = _xpu_env(xmx_disabled)
        env.update(applied)
        slot = _open_xpu(slot, xpu_module, env)
        masks = {key: env[key] for key in ("ZE_AFFINITY_MASK", "ONEAPI_DEVICE_SELECTOR")
                 if key in env}
        report = PinningReport(slot, (), (), 0, None, False, "not applicable to XPU slots",
                               {**masks, **applied})
        logger.info("pinned to %s: %s", slot.describe(), report.to_dict())
        return report
    reserved = tuple(sorted(set(reserved_cpus)))
    compute = tuple(cpu for cpu in slot.cpus if cpu not in reserved)
    if not compute:
        raise SlotUnavailableError(f"the reserved CPUs {format_cpulist(reserved)} leave "
                                   f"{slot.describe()} no CPU to compute on")
    threads = len(core_groups(compute, sysfs_root)) if reserved else max(slot.physical_cores, 1)
    applied = {"OMP_NUM_THREADS": str(threads)}
    env.update(applied)
    pinned = _pin_all_threads(reserved or compute, proc_root, set_affinity)
    membind_error = _membind(slot, set_membind)
    torch = torch_module if torch_module is not None else importlib.import_module("torch")
    torch.set_num_threads(threads)
    report = PinningReport(
        slot, compute, reserved, pinned, threads, membind_error is None, membind_error, applied
    )
    logger.info("pinned to %s: %s", slot.describe(), report.to_dict())
    return report


def apply_torch_threads(report: PinningReport, torch_module: Any = None) -> None:
    """Give the calling thread its slot's torch thread count.

    torch counts OpenMP threads per thread, so the engine's own thread, which runs every
    forward pass, calls this once at its start; a no-op for XPU slots.
    """
    if report.torch_threads is None:
        return
    torch = torch_module if torch_module is not None else importlib.import_module("torch")
    torch.set_num_threads(report.torch_threads)


def raise_engine_thread_priority(niceness: int) -> int:
    """Give the calling thread (the engine's) ``niceness``, if it runs nicer; its niceness.

    Ray starts workers at niceness 15 (its ``worker_niceness``), so that its daemons stay
    responsive. For a model replica that costs throughput: the model's OpenMP threads meet
    at a barrier after every op, and whenever any niceness-0 process (Ray's daemons, the
    proxy's clients) preempts one of them, the others wait: at niceness 0 a llama.cpp
    replica's decode steps come close to its steps outside Ray. The price: the replica
    then takes CPU from Ray Serve's proxy and
    routers on the same node (at 15), so it is opt-in (``engine_thread_niceness``).
    Threads inherit niceness at creation, so the engine thread calls this before its first
    forward pass starts the OpenMP threads. Lowering niceness needs CAP_SYS_NICE (or
    RLIMIT_NICE): without it the replica keeps Ray's and logs why.
    """
    current = os.getpriority(os.PRIO_PROCESS, 0)  # on Linux: the calling thread
    if current <= niceness:
        return current
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except OSError as error:
        logger.warning("engine thread stays at niceness %d (could not set %d: %s); grant "
                       "CAP_SYS_NICE for full speed", current, niceness, error.strerror)
        return current
    return niceness


# ---------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.placement",
        description="Print this host's placement slots (CPU sockets, Intel GPU tiles) as JSON.",
    )
    parser.add_argument("--sysfs-root", default="/sys", help="sysfs tree to read (default /sys)")
    parser.add_argument(
        "--count",
        choices=["cpu", "xpu"],
        help="print only how many slots of this kind the host has (for node start scripts)",
    )
    args = parser.parse_args(argv)
    if args.count == "cpu":
        print(len(discover_cpu_sockets(args.sysfs_root)))
    elif args.count == "xpu":
        print(len(discover_xpu_tiles(sysfs_root=args.sysfs_root)))
    else:
        rows = [json.dumps(slot.to_dict()) for slot in discover_slots(args.sysfs_root)]
        print("[\n  " + ",\n  ".join(rows) + "\n]" if rows else "[]")


if __name__ == "__main__":
    main()
