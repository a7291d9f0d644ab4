#!/usr/bin/env bash
# Start Mission Control on this machine (embedded NATS and PostgreSQL) and run the demo.
# Extra arguments go to `mctl up`, e.g. scripts/run.sh --data-dir /tmp/mc. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
ensure_venv
exec .venv/bin/mctl up --demo "$@"
