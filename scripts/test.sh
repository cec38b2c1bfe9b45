#!/usr/bin/env bash
# Install what is missing (scripts/setup.sh) and the later containerd releases of the matrix
# (scripts/containerd_versions.py: Debian's .debs unpacked under .work/, cached), then run:
#   0. ruff and mypy                      lint and types (configured in pyproject.toml)
#   1. pytest tests                       unit tests, and the end-to-end tests against the
#                                         containerd on PATH (Debian 12: 1.6)
#   2. pytest tests/e2e                   the end-to-end tests again against the shim of the built
#                                         wheel (python -m build), installed into a fresh venv in a
#                                         temporary directory (PYSHIM_SHIM_DIR = its bin)
#   3. pytest tests --ignore=tests/unit --ignore=tests/fuzz   the end-to-end tests again for each later containerd
#                                         (CONTAINERD_BIN/CTR_BIN = .work/containerd-SERIES/usr/bin/…)
# Extra arguments go to every pytest run. Every run happens; the exit status is the first failing
# run's, else 0 if any test ran, else 5 (pytest's "no tests collected").
#   PYSHIM_TEST_RUNTIME  runtime the end-to-end tests use (default io.containerd.pyshim.v1)
#   CONTAINERD_BIN       containerd binary for run 1 (default: containerd on PATH)
#   PYSHIM_TEST_MATRIX   later containerd series for run 3 (default "1.7 2.1"; empty: skip run 3)
#   PYSHIM_TEST_WHEEL    0 skips run 2 (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
log=$(mktemp)
quietly() {  # run a command; show its output only if it fails
  "$@" >"$log" 2>&1 || { cat "$log" >&2; echo "test.sh: failed: $*" >&2; return 1; }
}
matrix=${PYSHIM_TEST_MATRIX-1.7 2.1}
builds=""
if [ -n "$matrix" ]; then
  # shellcheck disable=SC2086  # one word per series
  builds=$(.venv/bin/python scripts/containerd_versions.py $matrix)  # lines: SERIES VERSION BINDIR
fi

result=5  # no test has run yet
fold() {  # fold one pytest exit status into the result: the first failure wins, then "tests ran"
  case $1 in
    0) [ "$result" != 5 ] || result=0 ;;
    5) ;;
    *) { [ "$result" != 0 ] && [ "$result" != 5 ]; } || result=$1 ;;
  esac
}
banner() { printf '\n==== %s ====\n' "$*"; }

# The install a user makes: the wheel and sdist built by the standard build front end, the
# wheel installed with pip into a fresh venv outside the checkout. The wheel test of every
# run uses it (PYSHIM_WHEEL_BIN); run 2 puts its bin first on containerd's PATH.
wheel_tmp=$(mktemp -d /tmp/pyshim-wheel-XXXXXX)
trap 'rm -rf "$wheel_tmp" "$log"' EXIT
python=${PYSHIM_PYTHON:-/usr/bin/python3}
quietly .venv/bin/python -m build --no-isolation --outdir "$wheel_tmp/dist" .
quietly "$python" -m venv "$wheel_tmp/venv"
quietly "$wheel_tmp/venv/bin/pip" install --disable-pip-version-check "$wheel_tmp"/dist/pyshim-*.whl
export PYSHIM_WHEEL_BIN="$wheel_tmp/venv/bin"

set +e
banner "lint (ruff) and types (mypy)"
.venv/bin/ruff check shim scripts tests protos && .venv/bin/mypy
lint=$?
[ "$lint" = 0 ] || result=$lint  # a lint failure fails the run, but every test still runs
version=$("${CONTAINERD_BIN:-containerd}" --version 2>/dev/null | cut -d' ' -f3)
banner "unit tests; end-to-end tests against $version"
.venv/bin/python -m pytest tests "$@"
fold $?
if [ "${PYSHIM_TEST_WHEEL:-1}" != 0 ]; then
  banner "end-to-end tests against $version, shim from the wheel ($PYSHIM_WHEEL_BIN)"
  PYSHIM_SHIM_DIR="$PYSHIM_WHEEL_BIN" .venv/bin/python -m pytest tests/e2e "$@"
  fold $?
fi
while read -r series version bindir; do
  [ -n "$series" ] || continue
  banner "end-to-end tests against containerd $version (Debian package, series $series)"
  CONTAINERD_BIN="$bindir/containerd" CTR_BIN="$bindir/ctr" .venv/bin/python -m pytest tests --ignore=tests/unit --ignore=tests/fuzz "$@"
  fold $?
done <<<"$builds"
exit "$result"
