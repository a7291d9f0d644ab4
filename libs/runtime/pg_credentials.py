"""PostgreSQL passwords of one installation: the administrator's and each service role's.

``mctl up`` generates them the first time it needs them and keeps them in
``<data_dir>/postgres-credentials.json``, mode 0600, readable by the user who runs Mission Control
and nobody else. The processes receive theirs in ``DATABASE_URL`` (a
:class:`~pydantic.SecretStr` setting); no password is ever printed, logged or written to
``state.json``.

Passwords are set on roles as SCRAM-SHA-256 verifiers computed here
(:func:`scram_verifier`), so the server never receives a password in clear text, even in an
``ALTER ROLE`` statement that statement logging would record.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

from pydantic import SecretStr

from libs.errors import InvalidInput
from libs.runtime.state import write_private_json

CREDENTIALS_FILE = "postgres-credentials.json"
SCRAM_ITERATIONS = 4096


def credentials_path(data_dir: Path) -> Path:
    """Where the passwords of the installation on ``data_dir`` are kept."""
    return data_dir / CREDENTIALS_FILE


def new_password() -> str:
    """A fresh random password (256 bits, URL-safe, so it needs no quoting in a URL)."""
    return secrets.token_urlsafe(32)


def load_passwords(data_dir: Path) -> dict[str, SecretStr]:
    """The passwords stored under ``data_dir`` by role name (empty when there are none)."""
    path = credentials_path(data_dir)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{path} is unreadable ({type(exc).__name__})") from None
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise InvalidInput(f"{path} is not an object of role names to passwords")
    return {role: SecretStr(pw) for role, pw in raw.items()}


def ensure_passwords(data_dir: Path, roles: Iterable[str]) -> dict[str, SecretStr]:
    """The stored passwords of ``roles``, generating and storing those that are missing.

    The file is rewritten atomically and is never, even for a moment, readable by others.
    """
    stored = load_passwords(data_dir)
    missing = [r for r in roles if r not in stored]
    if missing:
        for role in missing:
            stored[role] = SecretStr(new_password())
        write_private_json(
            credentials_path(data_dir),
            {role: pw.get_secret_value() for role, pw in sorted(stored.items())},
        )
    return stored


def parse_role_passwords(value: SecretStr) -> dict[str, SecretStr]:
    """``MC_DB_ROLE_PASSWORDS`` (a JSON object of role name to password) as a mapping.

    The error names what is wrong, never the value.
    """
    try:
        raw = json.loads(value.get_secret_value())
    except ValueError:
        raise InvalidInput("MC_DB_ROLE_PASSWORDS: not a JSON object") from None
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in raw.items()
    ):
        raise InvalidInput(
            "MC_DB_ROLE_PASSWORDS: expected a JSON object of role names to non-empty passwords"
        )
    return {role: SecretStr(pw) for role, pw in raw.items()}


def read_password_dir(directory: Path) -> dict[str, SecretStr]:
    """Passwords kept one file per role, named by the role (a Kubernetes Secret mounted as a
    volume); the trailing newline an editor adds is not part of the password."""
    if not directory.is_dir():
        raise InvalidInput(f"{directory} is not a directory of role passwords")
    found: dict[str, SecretStr] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue  # a mounted Secret keeps its data under hidden, linked directories
        password = path.read_text().rstrip("\r\n")
        if not password:
            raise InvalidInput(f"{path}: empty password")
        found[path.name] = SecretStr(password)
    return found


def with_credentials(url: str, role: str, password: SecretStr | None) -> str:
    """``url`` (``postgresql://[user[:pw]@]host...``) logging in as ``role`` with ``password``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise InvalidInput("database URL: expected postgresql://host[:port]/database")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    host = rest[:end].rpartition("@")[2]
    user = quote(role, safe="")
    if password is not None:
        user += ":" + quote(password.get_secret_value(), safe="")
    return f"{scheme}://{user}@{host}{rest[end:]}"


def scram_verifier(password: SecretStr, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802, 7677).

    ``ALTER ROLE r PASSWORD '<verifier>'`` sets the password without sending it. Our passwords
    are ASCII, for which SASLprep changes nothing.
    """
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.get_secret_value().encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"
