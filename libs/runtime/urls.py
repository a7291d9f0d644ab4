"""Where a command finds NATS and PostgreSQL: the one URL resolver of ``mctl`` and the supervisor.

Precedence, first match wins:

1. an explicit flag (``--database-url``);
2. the environment, through :class:`~libs.settings.Settings` (``DATABASE_ADMIN_URL``, then
   ``DATABASE_URL``, for administrative work; ``DATABASE_URL`` for the services' role;
   ``NATS_URL``);
3. the state file of a ``mctl up`` running on the data directory (``<data_dir>/state.json``),
   which names the embedded servers it started;
4. the embedded default: ``mctl up`` starts embedded servers; other commands have nothing to
   talk to and say how to give them a URL.

The environment comes before the state file because ``mctl up`` itself uses the environment's
servers when it is set: a shell with ``DATABASE_URL`` exported means the same database for every
command run from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import SecretStr

from libs.runtime.pg_credentials import load_passwords, with_credentials
from libs.runtime.state import read_state, redact_url
from libs.settings import Settings, load_settings

UrlKind = Literal["nats", "database", "admin_database"]

# Per kind: the settings fields to try in order.
_SETTINGS_FIELDS: dict[UrlKind, tuple[str, ...]] = {
    "nats": ("nats_url",),
    "database": ("database_url",),
    "admin_database": ("database_admin_url", "database_url"),
}
# Per kind: the state.json key naming the embedded server. The services' database URL is
# recorded redacted, so it cannot be read back; the admin URL of the embedded server is recorded
# without its password, which is read from the data directory (libs.runtime.pg_credentials).
_STATE_KEYS: dict[UrlKind, str] = {"nats": "nats_url", "admin_database": "postgres_admin_url"}


class Source(StrEnum):
    """Where a resolved URL came from."""

    FLAG = "flag"
    ENVIRONMENT = "environment"
    RUNNING_SYSTEM = "running system"


@dataclass(frozen=True)
class ResolvedUrl:
    """A URL and where it came from. Its ``str`` is redacted: print it, never ``url``."""

    url: SecretStr
    source: Source

    def secret(self) -> str:
        """The URL itself, to connect with (never to print)."""
        return self.url.get_secret_value()

    def __str__(self) -> str:
        return f"{redact_url(self.secret())} (from the {self.source})"


def resolve_url(
    kind: UrlKind,
    *,
    flag: str | SecretStr | None = None,
    settings: Settings | None = None,
    data_dir: Path | None = None,
) -> ResolvedUrl | None:
    """The URL of ``kind`` by the module's precedence; ``None`` when only the embedded default is
    left (the caller starts an embedded server, or explains that there is nothing to use).

    ``data_dir`` ``None`` skips the state file (the supervisor, which writes it, passes none).
    """
    if flag:
        return ResolvedUrl(flag if isinstance(flag, SecretStr) else SecretStr(flag), Source.FLAG)
    settings = settings if settings is not None else load_settings()
    for name in _SETTINGS_FIELDS[kind]:
        if settings.configured(name):
            value = getattr(settings, name)
            if value:
                url = value if isinstance(value, SecretStr) else SecretStr(value)
                return ResolvedUrl(url, Source.ENVIRONMENT)
    if data_dir is not None:
        state = read_state(data_dir.resolve())
        key = _STATE_KEYS.get(kind)
        recorded = (state or {}).get(key) if key else None
        if recorded:
            found = str(recorded)
            if kind == "admin_database":
                found = _with_admin_password(found, data_dir.resolve())
            return ResolvedUrl(SecretStr(found), Source.RUNNING_SYSTEM)
    return None


def _with_admin_password(url: str, data_dir: Path) -> str:
    """The embedded server's admin ``url`` with the password stored for its user, if any."""
    authority = url.partition("://")[2].split("/", 1)[0]
    userinfo = authority.rpartition("@")[0]
    if not userinfo or ":" in userinfo:
        return url  # no user to look up, or a password already
    password = load_passwords(data_dir).get(userinfo)
    return with_credentials(url, userinfo, password) if password is not None else url
