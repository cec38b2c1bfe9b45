#!/usr/bin/env bash
# Install what is missing (scripts/setup.sh), then run the test suite; extra arguments go to pytest.
#   PYSHIM_TEST_RUNTIME  runtime the end-to-end tests use (default io.containerd.pyshim.v1)
#   CONTAINERD_BIN       containerd binary the tests start (default: containerd on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests "$@"
