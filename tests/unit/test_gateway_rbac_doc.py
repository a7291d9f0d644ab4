"""``docs/rbac.md``'s route table is the one the code declares, and every route declares one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi.routing import APIRoute

from services.gateway.entrypoints import (
    build_router,
    build_well_known_router,
    declared_permissions,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import gen_rbac_doc

pytestmark = pytest.mark.unit


def test_the_documented_route_table_matches_the_code() -> None:
    current = gen_rbac_doc.DOC.read_text()
    assert gen_rbac_doc.render(current) == current, "run python scripts/gen_rbac_doc.py"


def test_every_route_declares_exactly_one_permission() -> None:
    routers = (
        build_router(gen_rbac_doc._not_started, gen_rbac_doc._not_started),
        (build_well_known_router(gen_rbac_doc._not_started)),
    )
    routes = [r for router in routers for r in router.routes if isinstance(r, APIRoute)]
    assert len(routes) >= 20
    for route in routes:
        assert len(declared_permissions(route)) == 1, route.path
    # The table lists them all.
    table = gen_rbac_doc.table()
    for route in routes:
        assert f" {route.path}` |" in table, route.path
