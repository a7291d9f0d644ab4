#!/usr/bin/env bash
# Install everything and run the full test suite (lint, types, unit, integration, e2e).
# Arguments go to pytest and skip the lint step, e.g. scripts/test.sh tests/unit -q.
#
# With no arguments the integration tests run in a second pytest process beside the unit and
# end-to-end ones: each process starts its own servers on free ports and in its own data
# directories, and the servers spend most of their time waiting, so two processes roughly halve
# the wall time on two cores. The integration output is printed when both have finished.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
ensure_venv
# The evidence tests read the PDFs they make with poppler (pdftotext, pdftoppm); a fresh CI
# machine has none.
if ! command -v pdftotext >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo_=""
  [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1 && sudo_="sudo -n"
  { $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq poppler-utils; } >/dev/null 2>&1 ||
    echo "warning: poppler-utils could not be installed; the evidence PDF tests will fail" >&2
fi
# The console tests drive Debian's Chromium through Playwright (tests/e2e/browser.py).
if [[ ! -x /usr/bin/chromium ]] && command -v apt-get >/dev/null 2>&1; then
  sudo_=""
  [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1 && sudo_="sudo -n"
  { $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq chromium; } >/dev/null 2>&1 ||
    echo "warning: chromium could not be installed; the console tests will fail" >&2
fi
if [[ $# -gt 0 ]]; then
  exec .venv/bin/python -m pytest "$@"
fi
echo "== ruff, mypy"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy libs services scripts
work="$(mktemp -d)"
# Printed so that a run that ends for want of space says how much it had at the start.
echo "== disk free under $(dirname "$work"): $(df -h --output=avail "$work" | tail -1 | tr -d ' ')"
trap 'rm -rf "$work"' EXIT
echo "== pytest: integration in the background (its output follows at the end)"
.venv/bin/python -m pytest tests/integration -p no:cacheprovider --durations=15 \
  --basetemp "$work/integration" >"$work/integration.log" 2>&1 &
integration=$!
echo "== pytest: unit, then end-to-end"
status=0
.venv/bin/python -m pytest tests/unit tests/e2e --durations=15 --basetemp "$work/rest" || status=$?
integration_status=0
wait "$integration" || integration_status=$?
echo "== pytest: integration"
cat "$work/integration.log"
if [[ $status -ne 0 || $integration_status -ne 0 ]]; then
  echo "== failed: unit and end-to-end exit $status, integration exit $integration_status"
  exit 1
fi
