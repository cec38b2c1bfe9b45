#!/usr/bin/env bash
# Install what the demo and the tests need, and only what is missing:
#   - Debian packages: containerd (with ctr), runc, criu, crun, busybox-static, procps, iproute2 (ss),
#     python3-venv;
#   - the virtual environment .venv with pyshim installed editable, with its test and dev extras
#     (re-installed when pyproject.toml changes).
# Idempotent, non-interactive, quiet unless something fails. Needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT
quietly() {  # run a command; show its output only if it fails
  "$@" >"$log" 2>&1 || { cat "$log" >&2; echo "setup.sh: failed: $*" >&2; return 1; }
}

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

missing=()
for pkg in containerd runc criu crun busybox-static procps iproute2; do
  installed "$pkg" || missing+=("$pkg")
done
# The shim runs on Debian's own python3 unless PYSHIM_PYTHON names another: a PGO/LTO build
# with _socket and the hashes built in, it starts about 1 ms faster than a generic build, and
# containerd starts the shim binary twice per container.
python=${PYSHIM_PYTHON:-/usr/bin/python3}
if [ ! -x "$python" ]; then
  missing+=(python3 python3-venv)
elif ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
  missing+=(python3-venv)  # Debian's python3 ships venv without ensurepip
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  quietly apt-get update
  quietly apt-get install -y --no-install-recommends "${missing[@]}"
fi

home=$(dirname "$(readlink -f "$python")")
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c '' 2>/dev/null ||
   [ "$(sed -n 's/^home = //p' .venv/pyvenv.cfg 2>/dev/null)" != "$home" ]; then
  echo "setup.sh: creating .venv with $python" >&2
  rm -rf .venv
  quietly "$python" -m venv .venv
fi
stamp=.venv/.pyshim-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $(.venv/bin/python -V 2>&1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -e .venv/bin/containerd-shim-pyshim-v1 ]; then
  echo "setup.sh: installing pyshim into .venv (pip install -e '.[test,dev]')" >&2
  quietly .venv/bin/python -m pip install --disable-pip-version-check -e '.[test,dev]'
  echo "$want" >"$stamp"
fi
# The shim's fast launcher (shim/binary/launcher.py: isolated interpreter, no site import)
# and compiled bytecode, as an installed shim writes it on its first run:
# containerd starts the shim binary twice per container.
quietly .venv/bin/python scripts/install_shim.py
