"""The state file of a running system (``<data_dir>/state.json``) and what may go into it.

The supervisor writes it once every service is ready and removes it when it stops; ``mctl
status``, ``mctl down`` and the URL resolver read it. It is written atomically and never holds a
password.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from libs.redaction import redact_url

__all__ = [
    "STATE_FILE",
    "read_state",
    "redact_url",
    "write_json_atomic",
    "write_private",
    "write_private_json",
]

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
    The temporary name carries the process id: two processes writing the same file at once
    each replace it whole rather than interleave.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask, and even if the file was left behind
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_private_json(path: Path, data: Mapping[str, Any]) -> None:
    """:func:`write_private` of ``data`` as indented JSON."""
    write_private(path, json.dumps(data, indent=2) + "\n")
