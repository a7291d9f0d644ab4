# Sourced by run.sh and test.sh: make sure .venv exists and has this checkout installed.
# (Re)installs only when pyproject.toml changed since the last install, so repeated runs are fast.

ensure_venv() {
  if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
  fi
  local want stamp=.venv/.pyproject.sha256
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    .venv/bin/python -m pip install -q -e '.[dev]'
    echo "$want" >"$stamp"
  fi
}
