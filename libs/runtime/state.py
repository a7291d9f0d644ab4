"""The state file of a running system (``<data_dir>/state.json``) and what may go into it.

The supervisor writes it once every service is ready and removes it when it stops; ``mctl
status``, ``mctl down`` and the URL resolver read it. It is written atomically and never holds a
password.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from libs.redaction import redact_url

__all__ = ["STATE_FILE", "read_state", "redact_url", "write_json_atomic"]

STATE_FILE = "state.json"


def read_state(data_dir: Path) -> dict[str, Any] | None:
    """The ``state.json`` of ``data_dir``, or ``None`` when there is none (or it is unreadable)."""
    try:
        data = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` so that readers see either the old or the new document, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable and writable by this user only (0600), atomically.

    The file is created 0600, never widened after the fact, so nobody can open it in between.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
