"""``libs/`` never depends on ``services/``: services register themselves, libs discover them.

The check reads every module under ``libs/`` with :mod:`ast`, so it also finds imports inside
functions and module paths handed to ``importlib`` or ``python -m`` as strings.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

LIBS = Path(__file__).resolve().parents[2] / "libs"
FORBIDDEN = "services"
# A whole string that is a dotted path into the package ("services.gateway.demo", the
# entry-point form "services.gateway.demo:run_demo") or the start of one ("services." + name,
# f"services.{name}"). Prose that mentions services never matches.
MODULE_PATH = re.compile(rf"{FORBIDDEN}\.[\w.:]*")


def _is_forbidden(module: str | None) -> bool:
    return module is not None and (module == FORBIDDEN or module.startswith(f"{FORBIDDEN}."))


def violations(source: str, filename: str = "<source>") -> list[str]:
    """Every place in ``source`` that imports, or names as a module path, the services package."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if _is_forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and _is_forbidden(node.module):
                found.append(f"{where}: from {node.module} import ...")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and MODULE_PATH.fullmatch(node.value.strip())
        ):
            found.append(f"{where}: module path {node.value!r}")
    return found


def test_nothing_under_libs_imports_services() -> None:
    files = sorted(LIBS.rglob("*.py"))
    assert len(files) > 20, f"expected the libs package under {LIBS}"
    found = [v for f in files for v in violations(f.read_text(), str(f.relative_to(LIBS.parent)))]
    assert found == [], "libs/ must not depend on services/:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "import services.gateway.keys",
        "import services",
        "from services.gateway.keys import issue_key",
        "from services import gateway",
        "def f():\n    from services.gateway import demo\n    return demo",
        "import importlib\nm = importlib.import_module('services.gateway.demo')",
        "CMD = ['python', '-m', 'services.cost']",
        "REF = 'services.gateway.demo:run_demo'",
        "module = f'services.{pkg}'",
        "module = 'services.' + pkg",
    ],
)
def test_the_check_finds_every_way_of_depending_on_services(source: str) -> None:
    assert violations(source) != []


@pytest.mark.parametrize(
    "source",
    [
        "import libs.runtime.registry",
        "from .services import x",  # a relative module of the same name is somebody else's
        '"""Starts the services and stops the services first."""',
        "NAME = 'services'",
        "GROUP = 'mission_control.services'",
        "import servicesx",
    ],
)
def test_the_check_leaves_other_code_alone(source: str) -> None:
    assert violations(source) == []
