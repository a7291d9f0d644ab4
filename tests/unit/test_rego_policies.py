"""Every ``test_*`` rule of the policy bundle's Rego tests, one pytest case each."""

from __future__ import annotations

import pytest

from services.policy_admission import rego_tests
from services.policy_admission.bundle import DEFAULT_BUNDLE_DIR

pytestmark = pytest.mark.unit

# Fewer than this means discovery broke (or tests were deleted): fail rather than pass vacuously.
MIN_REGO_TESTS = 40

DISCOVERED = rego_tests.discover(DEFAULT_BUNDLE_DIR)


@pytest.fixture(scope="module")
def results() -> dict[str, rego_tests.RegoTestResult]:
    return {r.test.name: r for r in rego_tests.run(DEFAULT_BUNDLE_DIR)}


def test_discovery_finds_the_whole_suite() -> None:
    assert len(DISCOVERED) >= MIN_REGO_TESTS
    files = {t.file for t in DISCOVERED}
    for policy in ("token_limit", "cost_cap", "model_allowlist", "tool_allowlist", "main"):
        assert f"tests/{policy}_test.rego" in files


@pytest.mark.parametrize("test", DISCOVERED, ids=[t.name for t in DISCOVERED])
def test_rego(test: rego_tests.RegoTest, results: dict[str, rego_tests.RegoTestResult]) -> None:
    result = results[test.name]
    assert result.passed, f"{test.file}: {test.rule} evaluated to {result.detail}"
