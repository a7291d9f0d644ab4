"""The Rego test runner itself: it must report failures, not only successes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services.policy_admission import rego_tests
from services.policy_admission.bundle import DEFAULT_BUNDLE_DIR

pytestmark = pytest.mark.unit

_POLICY = """package missioncontrol.policies.sample

import rego.v1

limit := 3

deny contains "too big" if input.size > limit
"""

_TESTS = """package missioncontrol.tests.sample

import rego.v1

import data.missioncontrol.policies.sample

test_passes if {
	count(sample.deny) == 1 with input.size as 4
}

test_is_false if {
	count(sample.deny) == 1 with input.size as 3
}

test_is_undefined if {
	sample.no_such_rule
}

test_passes if {
	sample.limit == 3
}
"""


def _bundle(tmp_path: Path, tests: str = _TESTS) -> Path:
    (tmp_path / "policies").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "policies" / "sample.rego").write_text(_POLICY)
    (tmp_path / "tests" / "sample_test.rego").write_text(tests)
    return tmp_path


def test_discovery_reads_package_and_rule_names_once(tmp_path: Path) -> None:
    found = rego_tests.discover(_bundle(tmp_path))
    assert [t.name for t in found] == [
        "missioncontrol.tests.sample.test_passes",
        "missioncontrol.tests.sample.test_is_false",
        "missioncontrol.tests.sample.test_is_undefined",
    ]
    assert found[0].entrypoint == "missioncontrol/tests/sample/test_passes"
    assert found[0].file == "tests/sample_test.rego"


def test_false_and_undefined_tests_fail(tmp_path: Path) -> None:
    results = {r.test.rule: r for r in rego_tests.run(_bundle(tmp_path))}
    assert results["test_passes"].passed
    assert not results["test_is_false"].passed
    assert not results["test_is_undefined"].passed
    assert results["test_is_undefined"].detail == "undefined"


def test_a_bundle_that_does_not_compile_fails_every_test(tmp_path: Path) -> None:
    broken = _TESTS.replace("test_is_undefined if {", "test_is_undefined if {{")
    results = rego_tests.run(_bundle(tmp_path, broken))
    assert results
    assert all(not r.passed for r in results)
    assert all("does not compile" in r.detail for r in results)


def test_no_test_files_means_no_results(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "sample.rego").write_text(_POLICY)
    assert rego_tests.discover(tmp_path) == []
    assert rego_tests.run(tmp_path) == []


def test_a_broken_policy_change_fails_the_boundary_test(tmp_path: Path) -> None:
    # The shipped suite must catch an off-by-one in a policy, not just run.
    copy = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, copy)
    policy = copy / "policies" / "token_limit.rego"
    policy.write_text(policy.read_text().replace("projected > limit", "projected >= limit"))
    failed = {r.test.rule for r in rego_tests.run(copy) if not r.passed}
    assert failed == {"test_allows_exactly_at_the_limit"}
