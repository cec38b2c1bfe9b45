#!/usr/bin/env bash
# Install what is missing, put the shim on containerd's PATH and run one container with it:
#   scripts/run.sh [COMMAND [ARG...]]     (default: echo "hello from pyshim")
# Without CONTAINERD_ADDRESS a private containerd is started for the run and stopped afterwards;
# with it, that containerd is used and left running. PYSHIM_RUNTIME overrides the runtime
# (default io.containerd.pyshim.v1). Details: scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ln -sfn "$PWD/.venv/bin/containerd-shim-pyshim-v1" /usr/local/bin/containerd-shim-pyshim-v1
exec .venv/bin/python scripts/demo.py "$@"
