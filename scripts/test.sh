#!/usr/bin/env bash
# Install everything and run the full test suite (lint, types, unit, integration, e2e).
# Arguments go to pytest and skip the lint step, e.g. scripts/test.sh tests/unit -q.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
ensure_venv
if [[ $# -eq 0 ]]; then
  echo "== ruff, mypy"
  .venv/bin/ruff check .
  .venv/bin/ruff format --check .
  .venv/bin/mypy libs services scripts
  echo "== pytest"
fi
exec .venv/bin/python -m pytest "$@"
