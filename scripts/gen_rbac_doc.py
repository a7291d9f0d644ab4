"""Generate the route × role × key scope table of ``docs/rbac.md`` from the gateway's routes.

Each route declares its permission through its caller dependency
(``services/gateway/entrypoints.py``); which roles and key scopes hold each permission is
``services/gateway/rbac.py``. The table sits between the two marker comments of the document.

    python scripts/gen_rbac_doc.py          # rewrite the table in docs/rbac.md
    python scripts/gen_rbac_doc.py --check  # exit 1 when it differs from the code

``tests/unit/test_gateway_rbac_doc.py`` fails when the checked-in table drifts from the code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from services.gateway.entrypoints import build_router, build_well_known_router, permission_table
from services.gateway.rbac import route_table

DOC = Path(__file__).resolve().parent.parent / "docs" / "rbac.md"
START = "<!-- route-table:start (scripts/gen_rbac_doc.py) -->\n"
END = "<!-- route-table:end -->\n"


def _not_started() -> NoReturn:
    raise RuntimeError("only the routes are read here")


def table() -> str:
    """The Markdown table of the gateway's routes as the code declares them."""
    routers = build_router(_not_started, _not_started), build_well_known_router(_not_started)
    return route_table(permission_table(*routers))


def render(document: str) -> str:
    """``document`` with the table between the markers replaced by :func:`table`."""
    head, found, rest = document.partition(START)
    _, found_end, tail = rest.partition(END)
    if not found or not found_end:
        raise SystemExit(f"{DOC}: the route-table markers are missing")
    return head + START + table() + END + tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the table is stale")
    args = parser.parse_args()
    current = DOC.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(f"{DOC} is stale: run python scripts/gen_rbac_doc.py", file=sys.stderr)
            sys.exit(1)
        return
    DOC.write_text(wanted)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
