"""Reserved cores: which CPUs a node keeps for the serving stack, and who runs where.

The topology is a fake sysfs (2 sockets x 2 cores x 2 hyper-threads, from test_placement);
thread affinities are recorded, not applied, except in the CLI tests, which run the real
command and read the affinity it got.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deployments.config import LLMConfig
from deployments.core_reservation import (
    NODE_CPUS_ENV,
    RESERVED_CPUS_ENV,
    ReservationError,
    choose_reserved_cpus,
    cores_in_serve_config,
    node_reservation,
    pin_compute_pool,
)
from deployments.placement import SlotUnavailableError, format_cpulist, pin_to_slot
from tests.unit import test_placement
from tests.unit.test_placement import (
    SOCKET0_CPUS,
    AffinityRecorder,
    FakeTorch,
    fake_proc,
    socket1_slot,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
two_socket_sysfs = test_placement.two_socket_sysfs  # the fixture


def test_reserved_cores_are_the_lowest_physical_cores_with_their_siblings(two_socket_sysfs):
    assert choose_reserved_cpus(1, range(8), two_socket_sysfs) == (0, 4)
    assert choose_reserved_cpus(2, range(8), two_socket_sysfs) == (0, 1, 4, 5)
    assert choose_reserved_cpus(0, range(8), two_socket_sysfs) == ()
    # under a per-socket raylet (numactl), the reservation comes out of that socket
    assert choose_reserved_cpus(1, (2, 3, 6, 7), two_socket_sysfs) == (2, 6)


def test_a_reservation_must_leave_a_core_for_the_model(two_socket_sysfs):
    with pytest.raises(ReservationError, match="at least one core must be left"):
        choose_reserved_cpus(4, range(8), two_socket_sysfs)
    with pytest.raises(ReservationError, match="at least one core"):
        choose_reserved_cpus(1, (0, 4), two_socket_sysfs)  # one core, with its sibling


def test_auto_reserves_one_core_from_eight_cores_and_none_below(tmp_path):
    # CPUs without topology files count as a core each
    (tmp_path / "devices" / "system" / "cpu").mkdir(parents=True)
    assert choose_reserved_cpus("auto", range(7), tmp_path) == ()
    assert choose_reserved_cpus("auto", range(8), tmp_path) == (0,)
    assert choose_reserved_cpus("auto", range(2), tmp_path) == ()


def test_the_node_s_reservation_wins_over_the_config_s(two_socket_sysfs):
    env = {NODE_CPUS_ENV: "0-7", RESERVED_CPUS_ENV: "0,4"}
    from_node = node_reservation(2, env=env, affinity=[0, 4], sysfs_root=two_socket_sysfs)
    assert (from_node.node_cpus, from_node.reserved_cpus, from_node.source) == (
        tuple(range(8)), (0, 4), "node")
    assert from_node.compute_cpus(SOCKET0_CPUS) == (1, 5)
    # a node started without one: the replica applies the config's over its affinity
    own = node_reservation(1, env={}, affinity=range(8), sysfs_root=two_socket_sysfs)
    assert (own.reserved_cpus, own.source) == ((0, 4), "replica")
    assert node_reservation(0, env={}, affinity=range(8)).source == "none"
    assert node_reservation(2, env={NODE_CPUS_ENV: "0-7", RESERVED_CPUS_ENV: ""}).source == "none"


def test_pinning_with_reserved_cpus_puts_every_thread_there_and_counts_compute_cores(
        tmp_path, two_socket_sysfs):
    affinity, torch, env = AffinityRecorder(), FakeTorch(), {}
    report = pin_to_slot(socket1_slot(), reserved_cpus=(2, 6), proc_root=fake_proc(
        tmp_path / "proc", [100, 101]), set_affinity=affinity, set_membind=lambda nodes: None,
        torch_module=torch, env=env, sysfs_root=two_socket_sysfs)
    assert affinity.calls == {100: {2, 6}, 101: {2, 6}}
    assert (report.cpus, report.reserved_cpus) == ((3, 7), (2, 6))
    assert torch.num_threads == [1] and env == {"OMP_NUM_THREADS": "1"}  # one core left
    with pytest.raises(SlotUnavailableError, match="no CPU to compute on"):
        pin_to_slot(socket1_slot(), reserved_cpus=(2, 3, 6, 7), proc_root=tmp_path / "proc",
                    set_affinity=affinity, torch_module=torch, env=env)


def test_the_compute_pool_is_pinned_one_thread_per_core(tmp_path, two_socket_sysfs):
    proc = fake_proc(tmp_path / "proc", [10, 11, 12, 13, 14])
    compute = (1, 5, 2, 6)  # two cores: {1,5} and {2,6}
    current = {10: {0, 4}, 11: set(compute), 12: set(compute), 13: {0, 4}, 14: set(compute)}
    placed_at = AffinityRecorder()
    placed = pin_compute_pool(compute, engine_tid=11, sysfs_root=two_socket_sysfs,
                              proc_root=proc, get_affinity=current.__getitem__,
                              set_affinity=placed_at)
    # the engine thread on the first core, the pool (threads on the compute set) after it,
    # wrapping around; the stack's threads (on reserved CPUs) are left where they are
    assert placed == {11: 1, 12: 2, 14: 1}
    assert placed_at.calls == {11: {1}, 12: {2}, 14: {1}}


def test_the_serve_config_names_one_reservation(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [
        {"name": "a", "args": {"reserved_cores": 1}}, {"name": "b", "args": {}}]}))
    with pytest.raises(ReservationError, match="different reserved_cores"):
        cores_in_serve_config(config)
    config.write_text(yaml.safe_dump({"applications": [{"name": "a", "args": {}}]}))
    assert cores_in_serve_config(config) == "auto"
    assert cores_in_serve_config(REPO_ROOT / "serve_config.yaml") == LLMConfig.model_validate(
        yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
        ["applications"][0]["args"]).reserved_cores


def test_config_refuses_a_negative_reservation():
    with pytest.raises(ValueError, match="reserved_cores"):
        LLMConfig.model_validate({"model_name": "m", "checkpoint_path": "/x",
                                  "reserved_cores": -1})


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deployments.core_reservation", *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_the_cli_runs_the_command_on_the_reserved_cpus_with_the_split_in_its_env():
    cpus = sorted(os.sched_getaffinity(0))
    reserved = choose_reserved_cpus(1, cpus)
    done = _run_cli("--cores", "1", "--", sys.executable, "-c",
                    "import json, os; print(json.dumps([sorted(os.sched_getaffinity(0)), "
                    f"os.environ['{NODE_CPUS_ENV}'], os.environ['{RESERVED_CPUS_ENV}']]))")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [list(reserved), format_cpulist(cpus),
                                       format_cpulist(reserved)]


@pytest.mark.parametrize(("args", "message"), [
    (("--cores", "99", "--", "true"), "at least one core must be left"),
    (("--cores", "many", "--", "true"), "neither a number nor 'auto'"),
    (("--cores", "0", "--", "no-such-command-here"), "cannot run no-such-command-here"),
])
def test_the_cli_refuses_in_one_line(args, message):
    done = _run_cli(*args)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr
