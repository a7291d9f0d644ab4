"""Offline checks for people who write policies: compile, layout, test coverage, formatting.

Behind ``mctl policy check`` and ``mctl policy fmt``; they read a bundle directory and need no
running system.

* :func:`compile_errors` parses every ``.rego`` and compiles the bundle with regopy, the engine
  policy-admission runs, naming the file and line of each error regopy reports. regopy's compiler
  is more lenient than ``opa check`` (an unsafe variable in a rule nothing uses is accepted), so a
  clean check is necessary, not sufficient.
* :func:`layout_problems` checks the ``data.json`` files are JSON objects and, when a
  ``.manifest`` lists ``roots``, that every package lies under one of them.
* :func:`coverage` says, for each policy module, how many tests exercise it: the ``test_*`` rules
  of every test module that is in the policy's package or names ``data.<its package>`` (an
  ``import`` or a reference). Modules under a ``lib/`` directory are libraries: listed, but not
  required to have tests of their own (the policies that import them test them).
* :func:`normalise` is a conservative whitespace normaliser, not ``opa fmt``: no installed
  package offers a Rego formatter. It indents with tabs (each leading run of four spaces becomes
  one tab), strips trailing whitespace, keeps at most one blank line in a row, and ends the file
  with exactly one newline. Lines inside a raw (backtick) string are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from regopy import Interpreter, RegoError

from libs.rego_tests import discover_sources

MANIFEST = ".manifest"
DATA_FILE = "data.json"
LIB_DIR = "lib"

_PACKAGE = re.compile(r"^package\s+([A-Za-z_][\w.]*)\s*$", re.MULTILINE)
_ERROR = re.compile(r"\(error (\d+):")
_ERRORMSG = re.compile(r"\(errormsg (\d+):")


@dataclass(frozen=True)
class RegoModule:
    """One ``.rego`` file of a bundle: its path (relative, POSIX), source and package."""

    path: str
    source: str
    package: str | None

    @property
    def is_test(self) -> bool:
        """A ``*_test.rego`` module."""
        return self.path.endswith("_test.rego")

    @property
    def is_library(self) -> bool:
        """A module under a ``lib/`` directory."""
        return LIB_DIR in self.path.split("/")[:-1]


@dataclass(frozen=True)
class CompileError:
    """A module regopy refused: where (line 0 when regopy names no place) and why."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class PolicyCoverage:
    """How many tests exercise one policy module, and which test modules hold them."""

    path: str
    package: str
    library: bool
    tests: int
    test_files: tuple[str, ...]


def read_modules(root: Path) -> list[RegoModule]:
    """Every ``.rego`` under ``root``, sorted by path."""
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is not a directory")
    modules: list[RegoModule] = []
    for path in sorted(root.rglob("*.rego")):
        source = path.read_text(encoding="utf-8")
        match = _PACKAGE.search(source)
        rel = path.relative_to(root).as_posix()
        modules.append(RegoModule(rel, source, match.group(1) if match else None))
    return modules


def _parse_error(text: str, sources: dict[str, str]) -> CompileError | None:
    """The first error of a regopy error sequence, with the line its byte offset falls on."""
    found = _ERROR.search(text)
    if found is None:
        return None
    size, start = int(found.group(1)), found.end()
    path = text[start : start + size]
    where = re.match(r"\|(\d+)\|", text[start + size :])
    msg = _ERRORMSG.search(text, start)
    message = text[msg.end() : msg.end() + int(msg.group(1))] if msg else text.strip()
    line = 0
    if where is not None and path in sources:
        offset = int(where.group(1))
        line = sources[path].encode()[:offset].count(b"\n") + 1
    return CompileError(path, line, message)


@contextlib.contextmanager
def engine_output_silenced() -> Iterator[None]:
    """Send what the engine prints to standard output (its own rendering of every compile error,
    already reported by the caller) to ``/dev/null``, so that ``--json`` output stays JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def compile_errors(modules: list[RegoModule], data_json: str | None = None) -> list[CompileError]:
    """The modules that do not parse, each by itself, then the bundle's compile error if any."""
    sources = {m.path: m.source for m in modules}
    errors: list[CompileError] = []
    for module in modules:
        if module.package is None:
            errors.append(CompileError(module.path, 0, "no package declaration"))
            continue
        try:
            Interpreter().add_module(module.path, module.source)
        except RegoError as exc:
            errors.append(_parse_error(str(exc), sources) or CompileError(module.path, 0, str(exc)))
    if errors or not modules:
        return errors
    interp = Interpreter()
    entrypoints = sorted({m.package.replace(".", "/") for m in modules if m.package})
    try:
        for module in modules:
            interp.add_module(module.path, module.source)
        if data_json is not None:
            interp.add_data_json(data_json)
        if not interp.build(None, entrypoints).ok():
            raise RegoError("the bundle did not build")
    except RegoError as exc:
        errors.append(_parse_error(str(exc), sources) or CompileError("(bundle)", 0, str(exc)))
    return errors


def layout_problems(root: Path, modules: list[RegoModule]) -> list[str]:
    """What is wrong with the layout: unreadable ``data.json``, packages outside the roots."""
    problems: list[str] = []
    for data in sorted(root.rglob(DATA_FILE)):
        rel = data.relative_to(root).as_posix()
        try:
            value = json.loads(data.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problems.append(f"{rel}: not valid JSON ({exc})")
            continue
        if not isinstance(value, dict):
            problems.append(f"{rel}: must hold a JSON object")
    manifest = root / MANIFEST
    if not manifest.is_file():
        return problems
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [*problems, f"{MANIFEST}: not valid JSON ({exc})"]
    roots = doc.get("roots") if isinstance(doc, dict) else None
    if roots is None:
        return problems
    if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
        return [*problems, f"{MANIFEST}: roots must be a list of strings"]
    for module in modules:
        if module.package is None:
            continue
        path = module.package.replace(".", "/")
        if not any(r == "" or path == r or path.startswith(r.rstrip("/") + "/") for r in roots):
            problems.append(f"{module.path}: package {module.package} is outside the roots {roots}")
    return problems


def coverage(modules: list[RegoModule]) -> list[PolicyCoverage]:
    """For each non-test module, the tests that exercise it (see the module docstring)."""
    tests = [m for m in modules if m.is_test]
    counts = {m.path: len(discover_sources([(m.path, m.source)])) for m in tests}
    report: list[PolicyCoverage] = []
    for module in modules:
        if module.is_test or module.package is None:
            continue
        named = re.compile(rf"\bdata\.{re.escape(module.package)}(?![\w])")
        files = tuple(
            t.path
            for t in tests
            if counts[t.path] and (t.package == module.package or named.search(t.source))
        )
        total = sum(counts[f] for f in files)
        report.append(PolicyCoverage(module.path, module.package, module.is_library, total, files))
    return report


def untested(report: list[PolicyCoverage]) -> list[PolicyCoverage]:
    """The policies (not libraries) that no test exercises."""
    return [p for p in report if not p.library and p.tests == 0]


def normalise(source: str) -> str:
    """``source`` with the whitespace normalised (see the module docstring); idempotent."""
    lines = source.replace("\r\n", "\n").split("\n")
    out: list[str] = []
    in_raw = False
    for line in lines:
        if in_raw:
            out.append(line)
        else:
            body = line.rstrip()
            stripped = body.lstrip(" \t")
            indent = body[: len(body) - len(stripped)]
            spaces = indent.replace("\t", "    ")
            tabs, rest = divmod(len(spaces), 4)
            body = "\t" * tabs + " " * rest + stripped if indent and " " in indent else body
            if body or not out or out[-1] != "":
                out.append(body)
        code = line.split("#", 1)[0] if not in_raw else line
        if code.count("`") % 2:
            in_raw = not in_raw
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def needs_formatting(root: Path) -> list[str]:
    """The ``.rego`` files under ``root`` that :func:`normalise` would change."""
    return [m.path for m in read_modules(root) if normalise(m.source) != m.source]


def format_directory(root: Path) -> list[str]:
    """Normalise every ``.rego`` under ``root`` in place; the files that changed."""
    changed = needs_formatting(root)
    for rel in changed:
        path = root / rel
        path.write_text(normalise(path.read_text(encoding="utf-8")), encoding="utf-8")
    return changed
