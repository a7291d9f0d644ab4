package missioncontrol.tests.token_limit

import rego.v1

import data.missioncontrol.policies.token_limit

# Conventions forced by the embedded engine (regopy); see the bundle README:
# * replace input field by field (`with input.run as ...`), never `with input as {...}`;
# * a `with` value is a literal or a function call, never a rule reference (it reads as undefined);
# * never assign an expression that carries `with` (`d := main.decision with ...`); compare it.
# * strings from `with` values may print quoted in sprintf: check messages with contains().
run_with_tokens(used) := {"run_id": "r1", "status": "running", "tokens_used": used, "cost_usd": 0, "violated": []}

step_with_tokens(input_tokens, max_output) := {
	"index": 2,
	"kind": "llm_call",
	"model": "gpt-4o",
	"tool": null,
	"estimate": {"input_tokens": input_tokens, "max_output_tokens": max_output, "cost_usd": 0},
}

test_allows_well_under_the_limit if {
	count(token_limit.deny) == 0 with input.run as run_with_tokens(100) with input.step as step_with_tokens(100, 100)
}

test_allows_exactly_at_the_limit if {
	count(token_limit.deny) == 0 with input.run as run_with_tokens(9000) with input.step as step_with_tokens(400, 600)
}

test_denies_one_token_over_the_limit if {
	count(token_limit.deny) == 1 with input.run as run_with_tokens(9000) with input.step as step_with_tokens(401, 600)
}

test_counts_the_whole_output_budget if {
	count(token_limit.deny) == 1 with input.run as run_with_tokens(0) with input.step as step_with_tokens(1, 10000)
}

test_message_names_projected_total_and_limit if {
	some msg in token_limit.deny with input.run as run_with_tokens(9000) with input.step as step_with_tokens(500, 600)
	contains(msg, "10100 tokens")
	contains(msg, "limit of 10000")
}

test_default_limit_is_10000 if {
	token_limit.limit == 10000
}

test_fallback_limit_without_config if {
	token_limit.limit == 10000 with data.missioncontrol.config as {}
}

test_tenant_override_wins if {
	count(token_limit.deny) == 1 with input.tenant_id as "small"
		with input.run as run_with_tokens(0)
		with input.step as step_with_tokens(60, 50)
		with data.missioncontrol.config.tenants as {"small": {"max_tokens_per_run": 100}}
}

test_other_tenants_keep_the_default if {
	count(token_limit.deny) == 0 with input.tenant_id as "other"
		with input.run as run_with_tokens(0)
		with input.step as step_with_tokens(60, 50)
		with data.missioncontrol.config.tenants as {"small": {"max_tokens_per_run": 100}}
}

test_metadata_is_complete if {
	token_limit.metadata.id == "token_limit"
	token_limit.metadata.severity == "high"
	startswith(token_limit.metadata.runbook_url, "https://")
}

run_with_reserved(used, reserved) := {
	"run_id": "r1", "status": "running", "tokens_used": used, "tokens_reserved": reserved,
	"cost_usd": 0, "violated": [],
}

test_reserved_tokens_count_as_spent if {
	count(token_limit.deny) == 1 with input.run as run_with_reserved(4000, 5000) with input.step as step_with_tokens(600, 500)
}

test_reservations_within_the_limit_still_allow if {
	count(token_limit.deny) == 0 with input.run as run_with_reserved(4000, 5000) with input.step as step_with_tokens(400, 500)
}
