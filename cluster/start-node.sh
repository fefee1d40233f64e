#!/usr/bin/env bash
# Start a bare-metal Ray worker node that advertises its placement slots.
#
# One raylet for the whole host: it advertises every Intel GPU tile as a Ray "GPU" and every
# CPU socket as one unit of the custom resource "cpu_socket" (deployments.placement's
# CPU_SOCKET_RESOURCE). LLM replicas with `device: xpu` ask for one GPU, replicas with
# `device: cpu` for one cpu_socket, and `device: auto` picks whichever the cluster has. On a
# host with two sockets, two CPU replicas land here and each claims a different socket
# (a lock per node and socket), then pins its threads and memory to it.
#
# Variant, one raylet per socket (stronger: every worker process inherits the CPU affinity
# and memory policy from numactl, so nothing depends on the replica pinning itself). Run one
# command per NUMA node N of the host (`numactl --hardware` lists them; on a host with
# sub-NUMA clustering, give a socket's nodes together, e.g. 0,1):
#
#   numactl --cpunodebind=N --membind=N python -m deployments.core_reservation -- \
#       ray start --address="$RAY_HEAD" --num-gpus=0 --resources '{"cpu_socket": 1}'
#
# (the reservation is then taken from that socket's cores).
#
# Each such raylet is a Ray node of its own; the replica sees one socket in its affinity and
# takes it.

set -euo pipefail

usage() {
    cat <<'EOF'
Usage: RAY_HEAD=<head-ip:port> cluster/start-node.sh [extra `ray start` arguments...]

Discovers this host's CPU sockets and Intel GPU tiles (python -m deployments.placement)
and runs:
  ray start --address=$RAY_HEAD --num-gpus=<tiles> --resources='{"cpu_socket": <sockets>}'

Ray starts on the cores reserved for the serving stack (RESERVED_CORES): its processes, Serve's
proxy and the replicas' own threads run there, the models' compute threads on the other
cores (python -m deployments.core_reservation).

Environment:
  RAY_HEAD                   address of the Ray head node (required)
  RESERVED_CORES             physical cores kept for the serving stack: a number, or auto
                             (default: 1 on hosts of 8 or more cores, else none)
  PYTHON                     interpreter with this project installed (default: python)
  ZE_FLAT_DEVICE_HIERARCHY   exported as FLAT unless set, so each GPU tile is a device
EOF
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi
if [[ -z "${RAY_HEAD:-}" ]]; then
    usage >&2
    exit 2
fi

# Run from the repository root so `-m deployments.placement` resolves without installing.
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

# Workers inherit this from the raylet: tiles must be devices both when we count them here
# and when Ray's ZE_AFFINITY_MASK names one for a replica.
export ZE_FLAT_DEVICE_HIERARCHY="${ZE_FLAT_DEVICE_HIERARCHY:-FLAT}"

sockets="$("$PYTHON" -m deployments.placement --count cpu)"
tiles="$("$PYTHON" -m deployments.placement --count xpu)"
echo "start-node: ${sockets} CPU socket(s), ${tiles} Intel GPU tile(s); joining ${RAY_HEAD}" >&2

exec "$PYTHON" -m deployments.core_reservation --cores "${RESERVED_CORES:-auto}" -- \
    ray start --address="$RAY_HEAD" --num-gpus="$tiles" \
    --resources="{\"cpu_socket\": ${sockets}}" "$@"
