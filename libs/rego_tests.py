"""A test runner for a bundle's Rego tests (regopy has no ``opa test``).

Shared by policy-admission (the bundle's own tests gate an upload) and ``mctl policy test``.

Every ``test_*`` rule in a ``*_test.rego`` file is one test; it passes when
``data.<package>.<rule>`` evaluates to ``true`` against the bundle's modules and ``data.json``.
Undefined, ``false`` or an evaluation error fail it. Packages and rule names are found with a
regular expression, which is enough for the conventional layout (one package line, test rules
starting at column 0).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import orjson
from regopy import Interpreter, RegoError

DATA_FILE = "data.json"

_PACKAGE = re.compile(r"^package\s+([A-Za-z_][\w.]*)\s*$", re.MULTILINE)
_TEST_RULE = re.compile(r"^(test_\w+)\b", re.MULTILINE)


@dataclass(frozen=True)
class RegoTest:
    """One ``test_*`` rule of a test module."""

    file: str
    package: str
    rule: str

    @property
    def name(self) -> str:
        """``<package>.<rule>``, unique within a bundle."""
        return f"{self.package}.{self.rule}"

    @property
    def entrypoint(self) -> str:
        """The rule as a regopy bundle entrypoint (``a/b/c/test_x``)."""
        return "/".join([*self.package.split("."), self.rule])


@dataclass(frozen=True)
class RegoTestResult:
    """The outcome of one Rego test; ``detail`` says what it evaluated to when it failed."""

    test: RegoTest
    passed: bool
    detail: str = ""


def _test_modules(root: Path) -> list[Path]:
    return sorted(root.rglob("*_test.rego"))


def discover(root: Path) -> list[RegoTest]:
    """Every ``test_*`` rule in the ``*_test.rego`` files under ``root``, in file order."""
    return discover_sources(
        [
            (p.relative_to(root).as_posix(), p.read_text(encoding="utf-8"))
            for p in _test_modules(root)
        ]
    )


def discover_sources(test_modules: list[tuple[str, str]]) -> list[RegoTest]:
    """Every ``test_*`` rule in ``test_modules`` (path, source), in order."""
    found: list[RegoTest] = []
    for rel, text in test_modules:
        pkg = _PACKAGE.search(text)
        if pkg is None:
            continue
        seen: set[str] = set()
        for match in _TEST_RULE.finditer(text):
            rule = match.group(1)
            # A rule with several bodies (incremental definition) is still one test.
            if rule not in seen:
                seen.add(rule)
                found.append(RegoTest(rel, pkg.group(1), rule))
    return found


def run(root: Path) -> list[RegoTestResult]:
    """Load every module (tests included) and ``data.json`` under ``root``; run every test."""
    modules = [
        (path.relative_to(root).as_posix(), path.read_text(encoding="utf-8"))
        for path in sorted(root.rglob("*.rego"))
    ]
    data = root / DATA_FILE
    data_json = data.read_text(encoding="utf-8") if data.is_file() else None
    tests = [(rel, src) for rel, src in modules if rel.endswith("_test.rego")]
    return run_sources(modules, tests, data_json)


def run_sources(
    modules: list[tuple[str, str]], test_modules: list[tuple[str, str]], data_json: str | None
) -> list[RegoTestResult]:
    """Run every test of ``test_modules`` against ``modules`` (tests included) and the data.

    All tests are compiled once, as entrypoints of one regopy bundle, then evaluated one by one.
    A module that does not compile fails every test with the compiler's message.
    """
    tests = discover_sources(test_modules)
    if not tests:
        return []
    interp = Interpreter()
    try:
        for rel, src in modules:
            interp.add_module(rel, src)
        if data_json is not None:
            interp.add_data(json.loads(data_json))
        bundle = interp.build(None, [t.entrypoint for t in tests])
        if not bundle.ok():
            raise RegoError("bundle did not build")
    except (RegoError, json.JSONDecodeError) as exc:
        return [RegoTestResult(t, False, f"bundle does not compile: {exc}") for t in tests]
    interp.set_input({})
    results: list[RegoTestResult] = []
    for t in tests:
        try:
            output = interp.query_bundle_entrypoint(bundle, t.entrypoint)
        except RegoError as exc:
            results.append(RegoTestResult(t, False, f"error: {exc}"))
            continue
        text = str(output)
        if not output.ok() or text == "undefined":
            results.append(RegoTestResult(t, False, text))
            continue
        expressions = orjson.loads(text).get("expressions") or []
        passed = expressions == [True]
        results.append(RegoTestResult(t, passed, "" if passed else text))
    return results
