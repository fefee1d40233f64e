"""Reserved cores: CPUs of a node kept out of every model slot, for the serving stack.

A node's serving stack (Ray's GCS, raylet and agents, Serve's controller and proxy, the
routers, and each replica's own non-compute threads: Ray's core-worker threads, the asyncio
loop, tokenizing and streaming) needs CPU as well as the model. On shared cores it preempts
the model's compute threads, and those meet at a barrier after every op: one preempted
thread stalls the whole step. vLLM's CPU backend keeps cores for everything else
(``VLLM_CPU_NUM_OF_RESERVED_CPU``) and binds its OpenMP threads to the rest; this module does
the same for a Ray node, in two halves:

1. The node. ``python -m deployments.core_reservation --cores N -- ray start ...`` (used by
   cluster/start-node.sh, the cluster launcher, KubeRay and ``make serve``) runs the command
   with the reserved CPUs as its CPU affinity, so every process Ray starts inherits them, and
   writes the node's split into the environment (:data:`NODE_CPUS_ENV`,
   :data:`RESERVED_CPUS_ENV`), which every Ray worker inherits as well.
2. The replica. :func:`node_reservation` reads that split; on a node started without it, it
   makes one from the config's ``reserved_cores`` over the replica's own affinity, and then
   covers the replica's own threads only (Ray's processes were not moved). The replica takes
   its slot from the node's CPUs, runs its threads on the reserved CPUs and only its engine
   thread and the OpenMP/ggml threads that thread starts on the slot's other CPUs, one
   compute thread per core (``placement.pin_to_slot``, :func:`enter_compute_cpus`,
   :func:`pin_compute_pool`).

Reserved cores are the node's lowest-numbered physical cores (hyper-thread siblings
included), where the kernel also tends to run interrupts. A reservation must leave at least
one core for compute. ``auto`` reserves :data:`deployments.constants.AUTO_RESERVED_CORES`
cores on nodes with at least :data:`deployments.constants.AUTO_RESERVE_FROM_CORES` physical
cores and none below (the measurement behind it: bench/RESULTS.md, "Reserved cores").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click
import yaml

from deployments import constants
from deployments.placement import core_groups, format_cpulist, parse_cpulist

NODE_CPUS_ENV = "LLM_SERVE_NODE_CPUS"
RESERVED_CPUS_ENV = "LLM_SERVE_RESERVED_CPUS"

ReservedCores = int | Literal["auto"]
ReservationSource = Literal["node", "replica", "none"]


class ReservationError(ValueError):
    """A reservation that cannot be made on this node (it would leave no compute core)."""


def auto_reserved_cores(physical_cores: int) -> int:
    """How many cores ``auto`` reserves on a node with ``physical_cores`` cores."""
    if physical_cores >= constants.AUTO_RESERVE_FROM_CORES:
        return constants.AUTO_RESERVED_CORES
    return 0


def choose_reserved_cpus(cores: ReservedCores, cpus: Iterable[int],
                         sysfs_root: str | Path = "/sys") -> tuple[int, ...]:
    """The CPUs of the lowest-numbered ``cores`` physical cores among ``cpus``.

    Raises ReservationError when that would leave no core for the model."""
    groups = core_groups(cpus, sysfs_root)
    count = auto_reserved_cores(len(groups)) if cores == "auto" else cores
    if count < 0:
        raise ReservationError(f"reserved cores must be 0 or more, not {count}")
    if count >= len(groups) and count > 0:
        raise ReservationError(
            f"cannot reserve {count} core(s) of {len(groups)}: at least one core must be left "
            f"for the model (CPUs {format_cpulist(cpus)})")
    return tuple(sorted(cpu for group in groups[:count] for cpu in group))


@dataclass(frozen=True)
class CoreReservation:
    """A node's CPUs and the part of them reserved for the serving stack.

    ``source``: ``node`` when the node's Ray was started through this module (Ray's
    processes run on the reserved CPUs), ``replica`` when only the replica applies it (the
    config asked for reserved cores on a node started without them), ``none`` when nothing
    is reserved."""

    node_cpus: tuple[int, ...]
    reserved_cpus: tuple[int, ...]
    source: ReservationSource

    def compute_cpus(self, slot_cpus: Iterable[int]) -> tuple[int, ...]:
        """The slot's CPUs the model may compute on: all but the reserved ones."""
        reserved = set(self.reserved_cpus)
        return tuple(cpu for cpu in slot_cpus if cpu not in reserved)

    def to_dict(self) -> dict[str, Any]:
        return {"node_cpus": format_cpulist(self.node_cpus),
                "reserved_cpus": format_cpulist(self.reserved_cpus), "source": self.source}


def node_reservation(config_cores: ReservedCores, *, env: Mapping[str, str] = os.environ,
                     affinity: Iterable[int] | None = None,
                     sysfs_root: str | Path = "/sys") -> CoreReservation:
    """This node's reservation: the one its Ray was started with, else the config's.

    A node started through this module wins over ``config_cores``: its Ray processes already
    run on those CPUs, and every replica of a node must agree on them."""
    if RESERVED_CPUS_ENV in env and NODE_CPUS_ENV in env:
        reserved = tuple(parse_cpulist(env[RESERVED_CPUS_ENV]))
        return CoreReservation(tuple(parse_cpulist(env[NODE_CPUS_ENV])), reserved,
                               "node" if reserved else "none")
    cpus = tuple(sorted(os.sched_getaffinity(0) if affinity is None else affinity))
    reserved = choose_reserved_cpus(config_cores, cpus, sysfs_root)
    return CoreReservation(cpus, reserved, "replica" if reserved else "none")


def enter_compute_cpus(compute_cpus: Sequence[int], reserved_cpus: Sequence[int],
                       set_affinity: Callable[[int, Iterable[int]], None] = os.sched_setaffinity
                       ) -> None:
    """Move the calling thread (the engine's) onto the compute CPUs, before its first forward
    pass: the OpenMP/ggml threads it starts inherit them. A no-op without a reservation
    (every thread of the replica is on the slot already)."""
    if reserved_cpus:
        set_affinity(0, compute_cpus)


def pin_compute_pool(compute_cpus: Sequence[int], engine_tid: int, *,
                     sysfs_root: str | Path = "/sys", proc_root: str | Path = "/proc",
                     get_affinity: Callable[[int], set[int]] = os.sched_getaffinity,
                     set_affinity: Callable[[int, Iterable[int]], None] = os.sched_setaffinity,
                     ) -> dict[int, int]:
    """Pin the engine thread and its compute pool one thread per core; {tid: cpu}.

    Call after the warm-up started the pool. The pool is every thread of this process whose
    affinity is the compute set, since all others run on the reserved CPUs (so call it only
    with a reservation). Threads are spread over the cores in thread-id order, the engine
    thread on the first: OpenMP's master takes part in every parallel region. A pool larger
    than the cores (ggml starts its workers anew per graph, and those keep the compute set)
    wraps around."""
    cores = [group[0] for group in core_groups(compute_cpus, sysfs_root)]
    wanted = set(compute_cpus)
    pool = []
    for path in (Path(proc_root) / "self" / "task").iterdir():
        tid = int(path.name)
        try:
            if tid != engine_tid and get_affinity(tid) == wanted:
                pool.append(tid)
        except OSError:  # exited meanwhile
            continue
    placed: dict[int, int] = {}
    for index, tid in enumerate([engine_tid, *sorted(pool)]):
        try:
            set_affinity(tid, [cores[index % len(cores)]])
        except OSError:
            continue
        placed[tid] = cores[index % len(cores)]
    return placed


def reservation_env(cores: ReservedCores, *, affinity: Iterable[int] | None = None,
                    sysfs_root: str | Path = "/sys") -> dict[str, str]:
    """The environment a node's Ray starts with: its CPUs and its reserved ones."""
    cpus = tuple(sorted(os.sched_getaffinity(0) if affinity is None else affinity))
    reserved = choose_reserved_cpus(cores, cpus, sysfs_root)
    return {NODE_CPUS_ENV: format_cpulist(cpus), RESERVED_CPUS_ENV: format_cpulist(reserved)}


def cores_in_serve_config(path: str | Path) -> ReservedCores:
    """The ``reserved_cores`` the serve config's applications ask for (``auto`` if none).

    Every application of a node shares the node's reservation, so differing values are an
    error rather than a guess."""
    document = yaml.safe_load(Path(path).read_text()) or {}
    values = {app.get("args", {}).get("reserved_cores", "auto")
              for app in document.get("applications", [])}
    if len(values) > 1:
        raise ReservationError(f"{path}: applications ask for different reserved_cores "
                               f"({sorted(map(str, values))}); a node has one reservation")
    return values.pop() if values else "auto"


def _parse_cores(value: str) -> ReservedCores:
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor 'auto'") from None


def run_reserved(command: Sequence[str], env: MutableMapping[str, str],
                 set_affinity: Callable[[int, Iterable[int]], None] = os.sched_setaffinity
                 ) -> None:
    """Exec ``command`` on the reserved CPUs (``env`` holds the split); never returns."""
    reserved = parse_cpulist(env[RESERVED_CPUS_ENV])
    if reserved:
        set_affinity(0, reserved)
    os.execvpe(command[0], list(command), dict(env))


@click.command(context_settings={"ignore_unknown_options": True,
                                 "help_option_names": ["-h", "--help"]})
@click.option("--cores", default=None, metavar="N|auto",
              help="Physical cores to reserve for the serving stack (default: the "
                   "config's reserved_cores, else auto).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="A serve config whose applications' reserved_cores to use.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def cli(cores: str | None, config_path: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND (`ray start ...`, `serve run ...`) with this node's reserved cores as its
    CPU affinity, and the node's split in its environment for the replicas."""
    try:
        count = _parse_cores(cores) if cores is not None else (
            cores_in_serve_config(config_path) if config_path else "auto")
        split = reservation_env(count)
    except (ReservationError, OSError, yaml.YAMLError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"core reservation: CPUs {split[RESERVED_CPUS_ENV] or 'none'} reserved for the "
               f"serving stack, of {split[NODE_CPUS_ENV]}", err=True)
    try:
        run_reserved(command, {**os.environ, **split})
    except OSError as error:
        raise click.ClickException(f"cannot run {command[0]}: {error.strerror}") from None


def main() -> None:
    cli(prog_name="python -m deployments.core_reservation")


if __name__ == "__main__":
    sys.exit(main())

