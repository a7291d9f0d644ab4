package missioncontrol.tests.hooks

import rego.v1

import data.missioncontrol.hooks.on_create_attempt
import data.missioncontrol.hooks.on_policy_update
import data.missioncontrol.hooks.on_promotion_attempt
import data.missioncontrol.hooks.on_review_open

good_agent() := {
	"identity": {"owner": "team-a"},
	"model": {"name": "gpt-4o"},
	"tools": ["search"],
	"memory": {"retention_days": 7},
	"limits": {"max_steps_per_run": 50},
}

test_hooks_a_good_agent_is_allowed_on_create if {
	count(on_create_attempt.decision.deny) == 0 with input.agent as good_agent()
	count(on_create_attempt.decision.warn) == 0 with input.agent as good_agent()
	count(on_create_attempt.decision.mutations) == 0 with input.agent as good_agent()
}

test_hooks_a_good_agent_is_allowed_on_scan if {
	count(on_policy_update.decision.deny) == 0 with input.agent as good_agent()
}

test_hooks_promotion_of_a_good_agent_with_checks_is_allowed if {
	count(on_promotion_attempt.decision.deny) == 0 with input.agent as good_agent()
		with input.environment as "production"
		with input.request as {"tests_passed": true, "validation_passed": true}
}

test_hooks_each_hook_takes_only_its_policies if {
	# governed_fields serves review but not the scan; agent_owner the scan but not review.
	{e.policy_id | some e in on_review_open.decision.deny} == set() with input.agent as {}
	{e.policy_id | some e in on_policy_update.decision.deny} == {"agent_owner"} with input.agent as {}
	count(on_policy_update.decision.locked_fields) == 0 with input.agent as {}
}

test_hooks_entries_carry_metadata if {
	{e.policy_id | some e in on_create_attempt.decision.deny} == {"agent_owner", "memory_retention"} with input.agent as {"memory": {"retention_days": 90}}
	{e.severity | some e in on_create_attempt.decision.deny} == {"medium"} with input.agent as {"memory": {"retention_days": 90}}
	count([e | some e in on_create_attempt.decision.deny; not startswith(e.runbook_url, "https://")]) == 0 with input.agent as {"memory": {"retention_days": 90}}
}
