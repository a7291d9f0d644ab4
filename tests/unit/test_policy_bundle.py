"""Loading, digesting and evaluating the policy bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from libs.settings import Settings
from services.policy_admission.bundle import (
    BENCH_INPUT,
    DEFAULT_BUNDLE_DIR,
    BundleError,
    PolicyBundle,
    bench_bare_evaluation,
    bundle_dir_for,
    bundle_files,
    digest_of,
)

pytestmark = pytest.mark.unit

POLICY_IDS = [
    "admission_required",
    "agent_owner",
    "cost_cap",
    "governed_fields",
    "max_steps",
    "memory_retention",
    "model_allowlist",
    "model_deprecation",
    "promotion_checks",
    "run_budget_actual",
    "run_state",
    "token_limit",
    "tool_allowlist",
    "tool_combinations",
]


@pytest.fixture(scope="module")
def bundle() -> PolicyBundle:
    return PolicyBundle.load(DEFAULT_BUNDLE_DIR)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, dest)
    return dest


def _input(**run: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(BENCH_INPUT))
    doc["run"].update(run)
    return doc


def test_digest_is_stable_across_loads_and_locations(bundle: PolicyBundle, copy: Path) -> None:
    assert bundle.digest.startswith("sha256:")
    assert PolicyBundle.load(DEFAULT_BUNDLE_DIR).digest == bundle.digest
    assert PolicyBundle.load(copy).digest == bundle.digest


def test_digest_ignores_tests_and_docs(bundle: PolicyBundle, copy: Path) -> None:
    (copy / "tests" / "extra_test.rego").write_text("package missioncontrol.tests.extra\n")
    (copy / "README.md").write_text("changed\n")
    assert PolicyBundle.load(copy).digest == bundle.digest
    assert all(not rel.startswith("tests/") for rel, _ in bundle_files(copy))


def test_digest_changes_with_data_or_policy(bundle: PolicyBundle, copy: Path) -> None:
    data = json.loads((copy / "data.json").read_text())
    data["missioncontrol"]["config"]["defaults"]["max_tokens_per_run"] = 500
    (copy / "data.json").write_text(json.dumps(data))
    changed_data = PolicyBundle.load(copy).digest
    assert changed_data != bundle.digest
    policy = copy / "policies" / "tool_allowlist.rego"
    policy.write_text(policy.read_text() + "\n# a comment is a change too\n")
    assert PolicyBundle.load(copy).digest not in (bundle.digest, changed_data)


def test_digest_is_order_independent_and_unambiguous() -> None:
    files = [("a.rego", "x"), ("b.rego", "y")]
    assert digest_of(files) == digest_of(list(reversed(files)))
    # Moving text across the path/content boundary must not collide.
    assert digest_of([("ab", "c")]) != digest_of([("a", "bc")])


def test_policies_list_every_policy_with_metadata(bundle: PolicyBundle) -> None:
    assert [p.policy_id for p in bundle.policies] == POLICY_IDS
    for p in bundle.policies:
        assert p.title
        assert p.severity in ("low", "medium", "high", "critical")
        assert p.runbook_url and p.runbook_url.startswith("https://")
    assert bundle.data["missioncontrol"]["config"]["defaults"]["max_tokens_per_run"] == 10000


def test_evaluate_allows_then_denies_at_the_token_limit(bundle: PolicyBundle) -> None:
    # The step asks for 500 input + 500 output: 9000 used lands exactly on the 10000 limit.
    assert bundle.evaluate(_input()) == {"deny": [], "warn": []}
    at_limit = bundle.evaluate(_input(tokens_used=9000))
    assert at_limit["deny"] == []
    over = bundle.evaluate(_input(tokens_used=9001))
    assert [e["policy_id"] for e in over["deny"]] == ["token_limit"]
    assert "10001 tokens" in over["deny"][0]["message"]


def test_messages_are_exact_for_hostile_strings(copy: Path) -> None:
    data = json.loads((copy / "data.json").read_text())
    data["missioncontrol"]["config"]["tenants"] = {"acme": {"model_allowlist": ["gpt-4o", "o3"]}}
    (copy / "data.json").write_text(json.dumps(data))
    bundle = PolicyBundle.load(copy)
    model = 'evil "model" \\ with\nnewline é'
    doc = _input(violated=["tool_allowlist", "cost_cap"])
    doc["tenant_id"] = "acme"
    doc["step"]["model"] = model
    messages = {e["policy_id"]: e["message"] for e in bundle.evaluate(doc)["deny"]}
    assert messages == {
        "model_allowlist": f"model {model} is not on the model allowlist (gpt-4o, o3)",
        "run_state": "run bench-run already violated tool_allowlist, cost_cap and is being "
        "stopped; no further steps are admitted",
    }


def test_evaluations_do_not_leak_input_between_calls(bundle: PolicyBundle) -> None:
    assert bundle.evaluate(_input(status="stopped_by_policy"))["deny"]
    assert bundle.evaluate(_input())["deny"] == []


def test_a_bundle_that_does_not_compile_is_a_clear_error(copy: Path) -> None:
    (copy / "policies" / "broken.rego").write_text(
        "package missioncontrol.policies.broken\nimport rego.v1\ndeny contains x if {\n"
    )
    with pytest.raises(BundleError, match="does not compile"):
        PolicyBundle.load(copy)


def test_bad_data_json_is_a_clear_error(copy: Path) -> None:
    (copy / "data.json").write_text("{not json")
    with pytest.raises(BundleError, match="does not compile"):
        PolicyBundle.load(copy)


def test_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        PolicyBundle.load(tmp_path / "nope")


def test_a_policy_with_bad_severity_is_refused(copy: Path) -> None:
    policy = copy / "policies" / "tool_allowlist.rego"
    policy.write_text(policy.read_text().replace('"severity": "high"', '"severity": "urgent"'))
    with pytest.raises(BundleError, match="invalid"):
        PolicyBundle.load(copy)


def test_settings_choose_the_bundle_directory(tmp_path: Path) -> None:
    assert bundle_dir_for(None) == DEFAULT_BUNDLE_DIR
    assert bundle_dir_for(Settings()) == DEFAULT_BUNDLE_DIR
    custom = Settings(MC_POLICY_BUNDLE=str(tmp_path))
    assert bundle_dir_for(custom) == tmp_path


def test_bench_bare_evaluation_times_each_evaluation() -> None:
    timings = bench_bare_evaluation(20)
    assert len(timings) == 20
    assert all(0 < t < 1 for t in timings)
