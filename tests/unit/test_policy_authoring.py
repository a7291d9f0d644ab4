"""``mctl policy test|check|fmt``: offline tools for policy authors, on temporary bundles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from libs import rego_authoring
from services.gateway.policy_cli import policy_app
from services.policy_admission.bundle import DEFAULT_BUNDLE_DIR

pytestmark = pytest.mark.unit

_POLICY = """package missioncontrol.policies.sample

import rego.v1

limit := 3

deny contains "too big" if input.size > limit
"""

_UNTESTED = """package missioncontrol.policies.other

import rego.v1

deny contains "never" if false
"""

_LIB = """package missioncontrol.lib.helpers

import rego.v1

double(x) := x * 2
"""

_TESTS = """package missioncontrol.tests.sample

import rego.v1

import data.missioncontrol.policies.sample

test_denies_big if {
	count(sample.deny) == 1 with input.size as 4
}

test_limit if {
	sample.limit == 3
}
"""

_FAILING = (
    _TESTS
    + """
test_wrong_limit if {
	sample.limit == 4
}
"""
)


def _bundle(tmp_path: Path, tests: str = _TESTS, **extra: str) -> Path:
    root = tmp_path / "bundle"
    for rel, text in {
        "policies/sample.rego": _POLICY,
        "tests/sample_test.rego": tests,
        "data.json": "{}\n",
        **extra,
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _mctl(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(policy_app, [str(a) for a in args])
    return result.exit_code, result.output


def test_test_reports_every_test_and_passes(tmp_path: Path) -> None:
    code, out = _mctl("test", _bundle(tmp_path))
    assert code == 0, out
    assert "PASS  missioncontrol.tests.sample.test_denies_big" in out
    assert "2 passed, 0 failed" in out


def test_test_fails_naming_the_failing_test(tmp_path: Path) -> None:
    code, out = _mctl("test", _bundle(tmp_path, _FAILING))
    assert code == 1
    assert "FAIL  missioncontrol.tests.sample.test_wrong_limit" in out
    assert "2 passed, 1 failed" in out


def test_test_json_output(tmp_path: Path) -> None:
    code, out = _mctl("test", _bundle(tmp_path, _FAILING), "--json")
    assert code == 1
    doc = json.loads(out)
    assert (doc["passed"], doc["failed"]) == (2, 1)
    failed = [t["name"] for t in doc["tests"] if not t["passed"]]
    assert failed == ["missioncontrol.tests.sample.test_wrong_limit"]


def test_test_without_tests_fails(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    (root / "tests" / "sample_test.rego").unlink()
    code, _ = _mctl("test", root)
    assert code == 1


def test_check_passes_and_reports_coverage(tmp_path: Path) -> None:
    root = _bundle(tmp_path, **{"lib/helpers.rego": _LIB})
    code, out = _mctl("check", root, "--require-tests")
    assert code == 0, out
    assert "policies/sample.rego  missioncontrol.policies.sample  [policy]  2 tests" in out
    assert "lib/helpers.rego  missioncontrol.lib.helpers  [library]  no tests of its own" in out
    assert "1 of 1 policies have tests" in out


def test_check_lists_policies_without_tests(tmp_path: Path) -> None:
    root = _bundle(tmp_path, **{"policies/other.rego": _UNTESTED})
    code, out = _mctl("check", root)
    assert code == 0, out
    assert "untested: policies/other.rego (missioncontrol.policies.other)" in out
    assert "1 of 2 policies have tests" in out
    code, out = _mctl("check", root, "--require-tests", "--json")
    assert code == 1
    assert json.loads(out)["untested"] == ["policies/other.rego"]


def test_check_names_the_file_and_line_of_a_compile_error(tmp_path: Path) -> None:
    broken = "package missioncontrol.policies.broken\n\nimport rego.v1\n\nx if {\n\t1 ==\n}\n"
    code, out = _mctl("check", _bundle(tmp_path, **{"policies/broken.rego": broken}))
    assert code == 1
    assert "error: policies/broken.rego:6: " in out
    assert "1 compile errors" in out


def test_check_refuses_bad_data_and_packages_outside_the_roots(tmp_path: Path) -> None:
    root = _bundle(tmp_path, **{"data.json": "{not json", ".manifest": '{"roots": ["other"]}'})
    code, out = _mctl("check", root, "--json")
    assert code == 1
    problems = json.loads(out)["layout_problems"]
    assert problems[0].startswith("data.json: not valid JSON")
    assert any(
        "policies/sample.rego: package missioncontrol.policies.sample" in p for p in problems
    )


def test_fmt_check_lists_and_fmt_rewrites(tmp_path: Path) -> None:
    messy = _POLICY.replace("limit := 3", "limit := 3   \n\n\n").replace("deny", "\ndeny") + "\n\n"
    messy += "msg := `raw\n    kept   \n`\n\nx if {\n    true\n}"
    root = _bundle(tmp_path, **{"policies/messy.rego": messy})
    code, out = _mctl("fmt", root, "--check")
    assert (code, out.strip()) == (1, "would reformat policies/messy.rego")
    assert (root / "policies" / "messy.rego").read_text() == messy
    code, out = _mctl("fmt", root)
    assert (code, out.strip()) == (0, "reformatted policies/messy.rego")
    text = (root / "policies" / "messy.rego").read_text()
    assert "limit := 3\n\ndeny" in text
    assert "`raw\n    kept   \n`" in text
    assert text.endswith("x if {\n\ttrue\n}\n")
    assert _mctl("fmt", root, "--check") == (0, "")


def test_normalise_is_idempotent() -> None:
    text = "package a\n\n\n  \tx := 1  \r\n  y := 2\n"
    once = rego_authoring.normalise(text)
    assert once == "package a\n\n\t  x := 1\n  y := 2\n"
    assert rego_authoring.normalise(once) == once


def test_repository_bundle_checks_clean_with_every_policy_tested(tmp_path: Path) -> None:
    code, out = _mctl("check", DEFAULT_BUNDLE_DIR, "--require-tests")
    assert code == 0, out
    assert "0 compile errors, 0 layout problems" in out
    assert "untested:" not in out
    assert _mctl("fmt", DEFAULT_BUNDLE_DIR, "--check") == (0, "")
    copy = shutil.copytree(DEFAULT_BUNDLE_DIR, tmp_path / "copy")
    (copy / "tests" / "tool_allowlist_test.rego").unlink()
    code, out = _mctl("check", copy, "--require-tests")
    assert code == 1
    assert "untested: policies/tool_allowlist.rego" in out


def test_json_output_stays_json_when_the_engine_prints_errors(tmp_path: Path) -> None:
    """regopy prints compile errors to the process's standard output; ``--json`` hides them."""
    broken = "package missioncontrol.policies.broken\n\nimport rego.v1\n\nx if {\n\t1 ==\n}\n"
    root = _bundle(tmp_path, **{"policies/broken.rego": broken})
    for command in ("check", "test"):
        done = subprocess.run(
            [sys.executable, "-m", "libs.runtime.cli", "policy", command, str(root), "--json"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 1, done.stderr
        json.loads(done.stdout)
