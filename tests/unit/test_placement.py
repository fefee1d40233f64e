"""Placement: slot discovery from fake sysfs trees and fake XPU runtimes, scheduling options,
slot claims, and pinning (with fakes, then for real on this machine)."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deployments import placement
from deployments.placement import (
    CPU_SOCKET_RESOURCE,
    Slot,
    SlotUnavailableError,
    claim_slot,
    discover_cpu_sockets,
    discover_slots,
    discover_xpu_tiles,
    format_cpulist,
    host_slot,
    parse_cpulist,
    pin_to_slot,
    replica_ray_options,
    resolve_placement,
    visible_xpu_ids,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
ALL_CPUS = range(8)
SOCKET0_CPUS = (0, 1, 4, 5)
SOCKET1_CPUS = (2, 3, 6, 7)


# ---------------------------------------------------------------------------- fakes


def write_sysfs(
    root: Path,
    cpus: dict[int, tuple[int, int, str] | None],
    nodes: dict[int, str],
    online: str,
) -> Path:
    """A sysfs tree: cpus maps id -> (package, core_id, thread_siblings_list) or None for a
    CPU without topology files; nodes maps NUMA node -> cpulist."""
    cpu_dir = root / "devices" / "system" / "cpu"
    cpu_dir.mkdir(parents=True)
    (cpu_dir / "online").write_text(online + "\n")
    for cpu, topology in cpus.items():
        (cpu_dir / f"cpu{cpu}").mkdir()
        if topology is None:
            continue
        package, core, siblings = topology
        topo = cpu_dir / f"cpu{cpu}" / "topology"
        topo.mkdir()
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")
        (topo / "thread_siblings_list").write_text(f"{siblings}\n")
    for node, cpulist in nodes.items():
        node_dir = root / "devices" / "system" / "node" / f"node{node}"
        node_dir.mkdir(parents=True)
        (node_dir / "cpulist").write_text(cpulist + "\n")
    return root


@pytest.fixture
def two_socket_sysfs(tmp_path: Path) -> Path:
    """2 sockets x 2 cores x 2 hyper-threads, one NUMA node per socket, Linux numbering
    (first threads of every core, then their siblings: socket 0 owns 0,1,4,5). cpu8 exists
    but is offline. core_id repeats across sockets, as on real hosts."""
    cpus: dict[int, tuple[int, int, str] | None] = {
        0: (0, 0, "0,4"),
        1: (0, 1, "1,5"),
        2: (1, 0, "2,6"),
        3: (1, 1, "3,7"),
        4: (0, 0, "0,4"),
        5: (0, 1, "1,5"),
        6: (1, 0, "2,6"),
        7: (1, 1, "3,7"),
        8: (1, 2, "8"),
    }
    return write_sysfs(tmp_path / "sys", cpus, {0: "0-1,4-5", 1: "2-3,6-7"}, online="0-7")


class FakeXpu:
    """torch.xpu as seen by a process that has `count` Intel GPU devices; records the
    device mask in ``env`` when it is first called (when Level Zero would read it)."""

    def __init__(self, count: int, name: str = "Intel(R) Data Center GPU Max 1550",
                 env: dict[str, str] | None = None) -> None:
        self._count = count
        self._name = name
        self._env = env if env is not None else {}
        self.mask_at_first_call: str | None = None
        self.called = False
        self.current: int | None = None

    def _touch(self) -> None:
        if not self.called:
            self.called = True
            self.mask_at_first_call = self._env.get("ZE_AFFINITY_MASK")

    def is_available(self) -> bool:
        self._touch()
        return self._count > 0

    def device_count(self) -> int:
        self._touch()
        return self._count

    def set_device(self, ordinal: int) -> None:
        self._touch()
        assert 0 <= ordinal < self._count
        self.current = ordinal

    def get_device_properties(self, ordinal: int) -> SimpleNamespace:
        self._touch()
        assert 0 <= ordinal < self._count
        return SimpleNamespace(name=self._name, total_memory=64 << 30)


class FakeTorch:
    def __init__(self) -> None:
        self.num_threads: list[int] = []

    def set_num_threads(self, n: int) -> None:
        self.num_threads.append(n)


class AffinityRecorder:
    """sched_setaffinity that records calls; optionally a thread exits or one is born."""

    def __init__(self, *, exited: Iterable[int] = (), spawn_on_first: Path | None = None):
        self.calls: dict[int, set[int]] = {}
        self._exited = set(exited)
        self._spawn = spawn_on_first

    def __call__(self, tid: int, cpus: Iterable[int]) -> None:
        if self._spawn is not None:
            self._spawn.mkdir()  # a thread started while we were pinning
            self._spawn = None
        if tid in self._exited:
            raise ProcessLookupError(tid)
        self.calls[tid] = set(cpus)


def fake_proc(root: Path, tids: Iterable[int]) -> Path:
    for tid in tids:
        (root / "self" / "task" / str(tid)).mkdir(parents=True)
    return root


def refuse_membind(nodes: Sequence[int]) -> None:
    raise PermissionError(errno.EPERM, "Operation not permitted")


# ---------------------------------------------------------------------------- CPU sockets


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0-3,8-11\n", [0, 1, 2, 3, 8, 9, 10, 11]), ("5", [5]), ("\n", []), ("0,2-3", [0, 2, 3])],
)
def test_cpulist_round_trips(text: str, cpus: list[int]) -> None:
    assert parse_cpulist(text) == cpus
    assert parse_cpulist(format_cpulist(cpus)) == cpus


def test_two_socket_host_has_one_slot_per_socket(two_socket_sysfs: Path) -> None:
    sockets = discover_cpu_sockets(two_socket_sysfs)

    assert [(s.index, s.cpus, s.physical_cores, s.numa_node) for s in sockets] == [
        (0, SOCKET0_CPUS, 2, 0),
        (1, SOCKET1_CPUS, 2, 1),
    ]
    assert all(s.kind == "cpu" and s.device == "cpu" for s in sockets)


def test_socket_spanning_two_numa_nodes_reports_both(tmp_path: Path) -> None:
    """Sub-NUMA clustering: one socket, two nodes; there is no single NUMA node."""
    cpus = {cpu: (0, cpu, str(cpu)) for cpu in range(4)}
    root = write_sysfs(tmp_path / "sys", cpus, {0: "0-1", 1: "2-3"}, online="0-3")

    (socket,) = discover_cpu_sockets(root)

    assert socket.numa_nodes == (0, 1)
    assert socket.numa_node is None


def test_sysfs_without_topology_or_numa_is_one_socket_of_single_thread_cores(
    tmp_path: Path,
) -> None:
    root = write_sysfs(tmp_path / "sys", {0: None, 1: None, 2: None}, {}, online="0-2")

    (socket,) = discover_cpu_sockets(root)

    assert (socket.cpus, socket.physical_cores, socket.numa_nodes) == ((0, 1, 2), 3, ())


def test_host_slot_spans_sockets_given_by_the_affinity(two_socket_sysfs: Path) -> None:
    slot = host_slot(ALL_CPUS, two_socket_sysfs)

    assert (slot.index, slot.cpus, slot.physical_cores, slot.numa_nodes) == (
        0,
        tuple(ALL_CPUS),
        4,
        (0, 1),
    )


def test_slot_reports_itself() -> None:
    slot = Slot(
        kind="cpu",
        index=1,
        device="cpu",
        cpus=SOCKET1_CPUS,
        physical_cores=2,
        numa_nodes=(1,),
        node_id="abc",
    )

    assert slot.labels() == {"device": "cpu", "slot": "1"}
    assert slot.describe() == "cpu slot 1: cpus 2-3,6-7 (2 cores), NUMA node 1 on node abc"
    assert json.loads(json.dumps(slot.to_dict()))["cpus"] == [2, 3, 6, 7]
    assert slot.to_dict()["numa_node"] == 1


# ---------------------------------------------------------------------------- Intel GPUs

FLAT = {"ZE_FLAT_DEVICE_HIERARCHY": "FLAT"}


def test_four_tile_node_has_one_slot_per_tile() -> None:
    tiles = discover_xpu_tiles({**FLAT, "ZE_AFFINITY_MASK": "0,1,2,3"}, FakeXpu(4))

    assert [(t.kind, t.index, t.device) for t in tiles] == [
        ("xpu", i, f"xpu:{i}") for i in range(4)
    ]
    assert {t.name for t in tiles} == {"Intel(R) Data Center GPU Max 1550"}
    assert tiles[2].labels() == {"device": "xpu", "slot": "2"}


def test_mask_names_device_ids_while_torch_counts_from_zero() -> None:
    tiles = discover_xpu_tiles({**FLAT, "ZE_AFFINITY_MASK": "2,3"}, FakeXpu(2))

    assert [(t.index, t.device) for t in tiles] == [(2, "xpu:0"), (3, "xpu:1")]


def test_each_replica_of_a_four_tile_node_sees_one_tile_and_sets_its_env(
    tmp_path: Path,
) -> None:
    """What each of 4 replicas does after Ray assigned it GPU i (whichever accelerator
    manager Ray picked): the mask is in place before the XPU runtime is first touched."""
    claims = []
    for device_id in range(4):
        env = dict(FLAT)
        xpu = FakeXpu(1, env=env)
        placement.restrict_to_gpus([str(device_id)], env)
        claim = claim_slot("xpu", node_id="gpu-node", lock_dir=tmp_path, env=env)
        claims.append(claim)
        affinity, torch = AffinityRecorder(), FakeTorch()

        report = pin_to_slot(claim.slot, xmx_disabled=True, env=env, set_affinity=affinity,
                             torch_module=torch, xpu_module=xpu)

        assert (claim.slot.index, claim.slot.device, claim.slot.node_id) == (
            device_id,
            "xpu:0",
            "gpu-node",
        )
        masks = {"ZE_AFFINITY_MASK": str(device_id), "ONEAPI_DEVICE_SELECTOR": "level_zero:0"}
        assert env == {**FLAT, **masks, "SYCL_CACHE_PERSISTENT": "1",
                       "BIGDL_LLM_XMX_DISABLED": "1"}
        assert report.env == {**masks, "SYCL_CACHE_PERSISTENT": "1",
                              "BIGDL_LLM_XMX_DISABLED": "1"}
        assert xpu.mask_at_first_call == str(device_id) and xpu.current == 0
        assert report.slot.name == "Intel(R) Data Center GPU Max 1550"
        assert report.to_dict()["slot"]["index"] == device_id
        assert affinity.calls == {} and torch.num_threads == []
    for claim in claims:
        claim.release()


def test_xmx_is_disabled_only_when_the_config_says_so() -> None:
    env: dict[str, str] = {}
    pin_to_slot(Slot(kind="xpu", index=0, device="xpu:0"), env=env, xpu_module=FakeXpu(1))

    assert env == {"SYCL_CACHE_PERSISTENT": "1"}


def test_an_xpu_slot_without_a_visible_gpu_fails_the_replica_in_one_line() -> None:
    env = {"ZE_AFFINITY_MASK": "1"}
    with pytest.raises(SlotUnavailableError, match=r"torch sees no Intel GPU \(ZE_AFFINITY_MASK=1"):
        pin_to_slot(Slot(kind="xpu", index=1, device="xpu:0"), env=env, xpu_module=FakeXpu(0))


@pytest.mark.parametrize(
    ("ids", "mask", "selector"),
    [(["3"], "3", "level_zero:0"), ([0, 2], "0,2", "level_zero:0,1")],
)
def test_ray_gpu_ids_become_the_level_zero_mask(ids: list[Any], mask: str, selector: str
                                                ) -> None:
    env = {"CUDA_VISIBLE_DEVICES": "3"}  # what Ray's NVIDIA manager sets without dpctl
    applied = placement.restrict_to_gpus(ids, env)

    assert applied == {"ZE_AFFINITY_MASK": mask, "ONEAPI_DEVICE_SELECTOR": selector}
    assert visible_xpu_ids(env) == [int(i) for i in ids]
    assert [tile.index for tile in discover_xpu_tiles(env)] == [int(i) for i in ids]


@pytest.mark.parametrize(("ids", "message"), [([], "no GPU"), (["GPU-0"], "device numbers")])
def test_gpu_ids_that_name_no_device_are_refused(ids: list[str], message: str) -> None:
    env: dict[str, str] = {}
    with pytest.raises(SlotUnavailableError, match=message):
        placement.restrict_to_gpus(ids, env)
    assert env == {}


def write_drm_card(sysfs: Path, card: str, *, vendor: str, device: str, driver: str,
                   tiles: int = 0, gts: int = 0) -> None:
    """One ``class/drm/<card>`` entry as the i915 or xe kernel driver lays it out."""
    pci = sysfs / "devices" / "pci0000:00" / card.replace("card", "0000:0") / "device"
    pci.mkdir(parents=True)
    (pci / "vendor").write_text(vendor + "\n")
    (pci / "device").write_text(device + "\n")
    drivers = sysfs / "bus" / "pci" / "drivers" / driver
    drivers.mkdir(parents=True, exist_ok=True)
    (pci / "driver").symlink_to(drivers)
    for tile in range(tiles):
        (pci / f"tile{tile}" / "gt0").mkdir(parents=True)
    entry = sysfs / "class" / "drm" / card
    entry.mkdir(parents=True)
    (entry / "device").symlink_to(pci)
    for gt in range(gts):
        (entry / "gt" / f"gt{gt}").mkdir(parents=True)


def test_tiles_are_counted_from_the_kernel_drivers_sysfs(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    sysfs = tmp_path / "sys"
    write_drm_card(sysfs, "card0", vendor="0x8086", device="0x0bd5", driver="i915", gts=2)
    write_drm_card(sysfs, "card1", vendor="0x8086", device="0x0bd5", driver="xe", tiles=2)
    write_drm_card(sysfs, "card2", vendor="0x8086", device="0x56a0", driver="i915", gts=1)
    # A Meteor Lake iGPU: i915 lists its media engine as a second GT, not a tile.
    write_drm_card(sysfs, "card3", vendor="0x8086", device="0x7d55", driver="i915", gts=2)
    write_drm_card(sysfs, "card4", vendor="0x1a03", device="0x2000", driver="ast")  # BMC
    (sysfs / "class" / "drm" / "card0-DP-1").mkdir()  # a connector, not a card

    assert placement.sysfs_xpu_tiles(sysfs) == 2 + 2 + 1 + 1
    monkeypatch.setattr(placement, "_torch_xpu", lambda: None)  # no XPU torch on this host
    assert len(discover_xpu_tiles(FLAT, sysfs_root=sysfs)) == 6
    placement.main(["--sysfs-root", str(sysfs), "--count", "xpu"])
    assert capsys.readouterr().out == "6\n"
    assert placement.sysfs_xpu_tiles(tmp_path / "empty") == 0


def test_replica_trusts_ray_mask_without_importing_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_probe() -> None:
        raise AssertionError("probed torch.xpu although Ray's mask names the device")

    monkeypatch.setattr(placement, "_torch_xpu", no_probe)

    (tile,) = discover_xpu_tiles({"ZE_AFFINITY_MASK": "3"})

    assert (tile.index, tile.device, tile.name) == (3, "xpu:0", None)


@pytest.mark.parametrize(
    ("env", "ids"),
    [
        ({}, None),
        ({"ZE_AFFINITY_MASK": "1,3"}, [1, 3]),
        ({"ZE_AFFINITY_MASK": ""}, []),
        ({"ONEAPI_DEVICE_SELECTOR": "level_zero:2"}, [2]),
        ({"ONEAPI_DEVICE_SELECTOR": "0,1"}, [0, 1]),
        ({"ONEAPI_DEVICE_SELECTOR": "level_zero:*"}, None),
        ({"ZE_AFFINITY_MASK": "1", "ONEAPI_DEVICE_SELECTOR": "level_zero:2"}, [1]),
    ],
)
def test_visible_xpu_ids_follow_ray_precedence(env: dict[str, str], ids: list[int] | None) -> None:
    assert visible_xpu_ids(env) == ids


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ZE_AFFINITY_MASK": "0.1"}, "ZE_FLAT_DEVICE_HIERARCHY=FLAT"),
        ({"ONEAPI_DEVICE_SELECTOR": "opencl:0"}, "level_zero"),
    ],
)
def test_unsupported_device_selectors_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        visible_xpu_ids(env)


def test_composite_hierarchy_warns_that_a_slot_spans_tiles(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"ZE_FLAT_DEVICE_HIERARCHY": "COMPOSITE", "ZE_AFFINITY_MASK": "0"}
    with caplog.at_level(logging.WARNING, logger=placement.__name__):
        discover_xpu_tiles(env, FakeXpu(1))

    assert "ZE_FLAT_DEVICE_HIERARCHY=COMPOSITE" in caplog.text


def test_discover_slots_lists_sockets_then_tiles(two_socket_sysfs: Path) -> None:
    slots = discover_slots(two_socket_sysfs, {**FLAT, "ZE_AFFINITY_MASK": "0,1"}, FakeXpu(2))

    assert [(s.kind, s.index) for s in slots] == [("cpu", 0), ("cpu", 1), ("xpu", 0), ("xpu", 1)]


# ---------------------------------------------------------------------------- scheduling


@pytest.mark.parametrize(
    ("device", "resources", "accelerator_type", "options"),
    [
        ("xpu", {"GPU": 4.0}, None, {"num_gpus": 1}),
        (
            "xpu",
            {"GPU": 4.0},
            "Intel-GPU-Max-1550",
            {"num_gpus": 1, "accelerator_type": "Intel-GPU-Max-1550"},
        ),
        ("cpu", {"CPU": 64.0, CPU_SOCKET_RESOURCE: 2.0}, None, {"resources": {"cpu_socket": 1}}),
        (
            "cpu",
            {"CPU": 64.0, CPU_SOCKET_RESOURCE: 2.0},
            "Intel-GPU-Max-1550",
            {"resources": {"cpu_socket": 1}},
        ),
        ("auto", {"CPU": 64.0, "GPU": 8.0, CPU_SOCKET_RESOURCE: 2.0}, None, {"num_gpus": 1}),
        ("auto", {"CPU": 64.0, CPU_SOCKET_RESOURCE: 2.0}, None, {"resources": {"cpu_socket": 1}}),
        ("auto", {"CPU": 2.0, "memory": 1e9}, None, {}),
        ("auto", {"CPU": 2.0, "GPU": 0.0, CPU_SOCKET_RESOURCE: 0.0}, None, {}),
    ],
)
def test_replica_ray_options(
    device: str, resources: dict[str, float], accelerator_type: str | None, options: dict
) -> None:
    assert replica_ray_options(device, resources, accelerator_type) == options


@pytest.mark.parametrize(
    ("device", "resources", "expected"),
    [
        ("xpu", {}, "xpu"),
        ("cpu", {}, "cpu_socket"),
        ("auto", {"GPU": 1.0}, "xpu"),
        ("auto", {CPU_SOCKET_RESOURCE: 1.0}, "cpu_socket"),
        ("auto", {"CPU": 2.0}, "host"),
    ],
)
def test_resolve_placement(device: str, resources: dict[str, float], expected: str) -> None:
    assert resolve_placement(device, resources) == expected


@pytest.mark.parametrize(
    ("resources", "expected"),
    [({"GPU": 1.0, CPU_SOCKET_RESOURCE: 2.0}, "cpu_socket"), ({"GPU": 1.0, "CPU": 8.0}, "host")],
)
def test_auto_never_puts_a_cpu_only_engine_on_a_gpu(resources: dict[str, float],
                                                    expected: str) -> None:
    assert resolve_placement("auto", resources, cpu_only=True) == expected
    assert "num_gpus" not in replica_ray_options("auto", resources, cpu_only=True)


def test_unknown_device_is_refused() -> None:
    with pytest.raises(ValueError, match="'gpu'"):
        replica_ray_options("gpu", {"GPU": 1.0})


def test_explicit_cpu_without_advertised_sockets_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=placement.__name__):
        options = replica_ray_options("cpu", {"CPU": 2.0})

    assert options == {"resources": {CPU_SOCKET_RESOURCE: 1}}
    assert "cluster/start-node.sh" in caplog.text


# ---------------------------------------------------------------------------- claiming


def test_two_claims_take_different_sockets_and_a_third_fails(
    two_socket_sysfs: Path, tmp_path: Path
) -> None:
    def claim():
        return claim_slot(
            "cpu_socket",
            node_id="node-a",
            lock_dir=tmp_path / "locks",
            sysfs_root=two_socket_sysfs,
            affinity=ALL_CPUS,
        )

    first, second = claim(), claim()
    assert {first.slot.cpus, second.slot.cpus} == {SOCKET0_CPUS, SOCKET1_CPUS}
    assert first.slot.node_id == second.slot.node_id == "node-a"

    with pytest.raises(SlotUnavailableError, match=r"every slot \(0, 1\) is held.*'cpu_socket'"):
        claim()

    freed = first.slot
    first.release()
    with claim() as third:
        assert third.slot == freed
    second.release()


def test_claims_on_different_nodes_do_not_conflict(two_socket_sysfs: Path, tmp_path: Path) -> None:
    """Several raylets can share one host and its /tmp (as in ray.cluster_utils.Cluster)."""
    claims = [
        claim_slot(
            "cpu_socket",
            node_id=node,
            lock_dir=tmp_path,
            sysfs_root=two_socket_sysfs,
            affinity=SOCKET0_CPUS,
        )
        for node in ("node-a", "node-b")
    ]

    assert [c.slot.index for c in claims] == [0, 0]
    for claim in claims:
        claim.release()


def test_lock_excludes_another_process(two_socket_sysfs: Path, tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from deployments.placement import claim_slot\n"
            f"c = claim_slot('cpu_socket', node_id='n', lock_dir={str(tmp_path)!r}, "
            f"sysfs_root={str(two_socket_sysfs)!r}, affinity=range(8))\n"
            "print(c.slot.index, flush=True); sys.stdin.readline()",
        ],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        held = int(holder.stdout.readline())
        with claim_slot(
            "cpu_socket",
            node_id="n",
            lock_dir=tmp_path,
            sysfs_root=two_socket_sysfs,
            affinity=ALL_CPUS,
        ) as mine:
            assert (held, mine.slot.index) == (0, 1)
    finally:
        holder.communicate("\n", timeout=30)


def test_raylet_pinned_to_one_socket_picks_that_socket(
    two_socket_sysfs: Path, tmp_path: Path
) -> None:
    """Under `numactl --cpunodebind=1` the affinity names socket 1, though socket 0 is free."""
    with claim_slot(
        "cpu_socket", lock_dir=tmp_path, sysfs_root=two_socket_sysfs, affinity=SOCKET1_CPUS
    ) as claim:
        assert (claim.slot.index, claim.slot.cpus, claim.slot.numa_node) == (1, SOCKET1_CPUS, 1)


def test_socket_slot_keeps_only_cpus_the_process_may_use(
    two_socket_sysfs: Path, tmp_path: Path
) -> None:
    with claim_slot(
        "cpu_socket", lock_dir=tmp_path, sysfs_root=two_socket_sysfs, affinity=[0, 1, 2]
    ) as claim:
        assert (claim.slot.index, claim.slot.cpus, claim.slot.physical_cores) == (0, (0, 1), 2)


def test_host_placement_takes_all_cpus_and_locks_nothing(
    two_socket_sysfs: Path, tmp_path: Path
) -> None:
    claims = [
        claim_slot("host", lock_dir=tmp_path, sysfs_root=two_socket_sysfs, affinity=ALL_CPUS)
        for _ in range(3)
    ]

    assert {(c.slot.cpus, c.slot.physical_cores) for c in claims} == {(tuple(ALL_CPUS), 4)}
    assert list(tmp_path.glob("*.lock")) == []


def test_no_usable_slot_says_why(two_socket_sysfs: Path, tmp_path: Path) -> None:
    with pytest.raises(SlotUnavailableError, match="intersects this process's CPU affinity"):
        claim_slot("cpu_socket", lock_dir=tmp_path, sysfs_root=two_socket_sysfs, affinity=[42])
    with pytest.raises(SlotUnavailableError, match="no Intel GPU is visible"):
        claim_slot("xpu", lock_dir=tmp_path, env={"ZE_AFFINITY_MASK": ""})


def test_default_config_on_this_machine_claims_its_one_socket(tmp_path: Path) -> None:
    """No GPU, no advertised sockets: `auto` resolves to the whole host, all our CPUs."""
    placement_ = resolve_placement("auto", {"CPU": float(os.cpu_count() or 1)})

    with claim_slot(placement_, lock_dir=tmp_path) as claim:
        assert placement_ == "host"
        assert set(claim.slot.cpus) == os.sched_getaffinity(0)
        assert claim.slot.physical_cores >= 1


# ---------------------------------------------------------------------------- pinning


def socket1_slot() -> Slot:
    return Slot(
        kind="cpu", index=1, device="cpu", cpus=SOCKET1_CPUS, physical_cores=2, numa_nodes=(1,)
    )


def test_pin_covers_every_thread_sets_torch_threads_and_binds_memory(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", [100, 101, 102])
    affinity, torch, env = AffinityRecorder(), FakeTorch(), {"OMP_NUM_THREADS": "1"}
    bound: list[Sequence[int]] = []

    report = pin_to_slot(
        socket1_slot(),
        proc_root=proc,
        set_affinity=affinity,
        set_membind=bound.append,
        torch_module=torch,
        env=env,
    )

    assert affinity.calls == {tid: set(SOCKET1_CPUS) for tid in (100, 101, 102)}
    assert torch.num_threads == [2]
    assert env == {"OMP_NUM_THREADS": "2"}
    assert bound == [(1,)]
    assert (report.threads_pinned, report.torch_threads, report.membind) == (3, 2, True)
    assert report.membind_error is None


def test_pin_catches_threads_born_or_exiting_meanwhile(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", [100, 101, 102])
    affinity = AffinityRecorder(exited=[101], spawn_on_first=proc / "self" / "task" / "103")

    report = pin_to_slot(
        socket1_slot(),
        proc_root=proc,
        set_affinity=affinity,
        set_membind=lambda nodes: None,
        torch_module=FakeTorch(),
        env={},
    )

    assert sorted(affinity.calls) == [100, 102, 103]
    assert report.threads_pinned == 3


def test_refused_membind_is_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=placement.__name__):
        report = pin_to_slot(
            socket1_slot(),
            proc_root=fake_proc(tmp_path / "proc", [7]),
            set_affinity=AffinityRecorder(),
            set_membind=refuse_membind,
            torch_module=FakeTorch(),
            env={},
        )

    assert report.membind is False
    assert "Operation not permitted" in report.membind_error
    assert "memory stays unbound" in caplog.text
    assert report.torch_threads == 2


def test_slot_without_numa_node_skips_membind(tmp_path: Path) -> None:
    def must_not_bind(nodes: Sequence[int]) -> None:
        raise AssertionError("bound memory of a slot with no NUMA node")

    slot = dataclasses.replace(socket1_slot(), numa_nodes=())
    report = pin_to_slot(
        slot,
        proc_root=fake_proc(tmp_path / "proc", [7]),
        set_affinity=AffinityRecorder(),
        set_membind=must_not_bind,
        torch_module=FakeTorch(),
        env={},
    )

    assert report.membind is False
    assert "NUMA node is unknown" in report.membind_error


REAL_PIN_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading
    import torch
    from deployments.placement import host_slot, pin_to_slot

    torch.ones(512, 512) @ torch.ones(512, 512)  # starts torch's OpenMP workers unpinned
    stop = threading.Event()
    early = [threading.Thread(target=stop.wait) for _ in range(2)]
    for thread in early:
        thread.start()
    result = {}

    def replica_thread():  # Ray 2.60 runs replica code in a thread of its own
        result["report"] = pin_to_slot(host_slot([0])).to_dict()
        result["tid"] = threading.get_native_id()
        result["replica_torch_threads"] = torch.get_num_threads()
        stop.wait()

    def engine_thread():  # e.g. the scheduler loop, started after pinning
        torch.ones(512, 512) @ torch.ones(512, 512)
        result["engine_torch_threads"] = torch.get_num_threads()
        stop.wait()

    pinner = threading.Thread(target=replica_thread)
    pinner.start()
    while "tid" not in result:
        pass
    late = threading.Thread(target=engine_thread)  # started by the main thread after pinning
    late.start()
    while "engine_torch_threads" not in result:
        pass
    print(json.dumps(result), flush=True)
    sys.stdin.readline()
    stop.set()
    """
)


def allowed_cpus_of_threads(pid: int) -> dict[int, str]:
    allowed = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                allowed[int(task.name)] = line.split(":", 1)[1].strip()
    return allowed


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 or 0 not in os.sched_getaffinity(0),
    reason="needs cpu 0 and another cpu to pin away from",
)
def test_real_pin_covers_every_thread_of_the_process() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", REAL_PIN_SCRIPT],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        result = json.loads(child.stdout.readline())
        allowed = allowed_cpus_of_threads(child.pid)
        pinner_numa_maps = Path(f"/proc/{child.pid}/task/{result['tid']}/numa_maps").read_text()
    finally:
        child.communicate("\n", timeout=60)

    report = result["report"]
    # main + 2 early + pinner + late + torch's OpenMP worker(s), at least
    assert len(allowed) >= 6, allowed
    assert set(allowed.values()) == {"0"}, allowed
    assert report["cpus"] == [0] and report["threads_pinned"] >= 4
    assert report["torch_threads"] == 1
    assert result["replica_torch_threads"] == result["engine_torch_threads"] == 1
    if report["membind"]:
        assert "bind:0" in pinner_numa_maps


# ---------------------------------------------------------------------------- CLI, scripts


def run_cli(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "deployments.placement", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout


def test_cli_prints_slots_as_json(two_socket_sysfs: Path) -> None:
    slots = json.loads(run_cli("--sysfs-root", str(two_socket_sysfs)))

    cpu_slots = [s for s in slots if s["kind"] == "cpu"]
    assert [(s["index"], s["cpus"], s["numa_node"]) for s in cpu_slots] == [
        (0, list(SOCKET0_CPUS), 0),
        (1, list(SOCKET1_CPUS), 1),
    ]
    assert all(isinstance(cpu, int) for s in cpu_slots for cpu in s["cpus"])


def test_cli_counts_sockets(two_socket_sysfs: Path) -> None:
    assert run_cli("--sysfs-root", str(two_socket_sysfs), "--count", "cpu") == "2\n"


START_NODE = REPO_ROOT / "cluster" / "start-node.sh"


def test_start_node_script_parses() -> None:
    subprocess.run(["bash", "-n", str(START_NODE)], check=True)


def test_start_node_script_requires_the_head_address() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_HEAD"}
    result = subprocess.run(["bash", str(START_NODE)], env=env, capture_output=True, text=True)

    assert result.returncode == 2
    assert "Usage" in result.stderr


def test_start_node_script_advertises_this_hosts_slots(tmp_path: Path) -> None:
    fake_ray = tmp_path / "bin" / "ray"
    fake_ray.parent.mkdir()
    fake_ray.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/ray-args\n'
                        f'grep Cpus_allowed_list: /proc/$$/status > {tmp_path}/ray-cpus\n'
                        f'echo "$LLM_SERVE_RESERVED_CPUS" >> {tmp_path}/ray-cpus\n')
    fake_ray.chmod(fake_ray.stat().st_mode | stat.S_IEXEC)
    env = {
        **os.environ,
        "PATH": f"{fake_ray.parent}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "RAY_HEAD": "10.0.0.1:6379",
        "RESERVED_CORES": "1" if len(os.sched_getaffinity(0)) > 1 else "0",
    }

    subprocess.run(["bash", str(START_NODE), "--block"], env=env, check=True, timeout=120)

    # Ray starts on the reserved core, and its workers learn the node's split from the env
    allowed, reserved = (tmp_path / "ray-cpus").read_text().splitlines()
    if env["RESERVED_CORES"] == "1":
        assert allowed.split()[-1] == reserved == str(min(os.sched_getaffinity(0)))

    args = (tmp_path / "ray-args").read_text().splitlines()
    sockets = len(discover_cpu_sockets())
    tiles = len(discover_xpu_tiles({**os.environ, **FLAT}))
    assert args == [
        "start",
        "--address=10.0.0.1:6379",
        f"--num-gpus={tiles}",
        f'--resources={{"{CPU_SOCKET_RESOURCE}": {sockets}}}',
        "--block",
    ]


def _in_a_thread(function: Any) -> Any:
    """``function()``'s result, run on a new thread (niceness is per thread on Linux)."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(function()))
    thread.start()
    thread.join()
    return result[0]


def test_engine_thread_priority_is_raised_on_its_thread_only() -> None:
    def niced_then_raised() -> tuple[int, int]:
        os.setpriority(os.PRIO_PROCESS, 0, 10)  # as Ray starts workers (it uses 15)
        return placement.raise_engine_thread_priority(0), os.getpriority(os.PRIO_PROCESS, 0)

    before = os.getpriority(os.PRIO_PROCESS, 0)
    returned, after = _in_a_thread(niced_then_raised)
    if os.geteuid() != 0:
        pytest.skip("lowering niceness needs CAP_SYS_NICE")
    assert returned == after == 0
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # other threads keep theirs


def test_without_the_privilege_the_engine_thread_keeps_its_niceness(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def refuse(*_: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    def niced_then_raised() -> int:
        os.setpriority(os.PRIO_PROCESS, 0, 10)
        monkeypatch.setattr(placement.os, "setpriority", refuse)
        return placement.raise_engine_thread_priority(0)

    with caplog.at_level("WARNING"):
        assert _in_a_thread(niced_then_raised) == 10
    assert "CAP_SYS_NICE" in caplog.text
