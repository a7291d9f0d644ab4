#!/usr/bin/env bash
# Run the test suite; arguments go to pytest, e.g. scripts/test.sh tests/unit -q.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
ensure_venv
exec .venv/bin/python -m pytest "$@"
