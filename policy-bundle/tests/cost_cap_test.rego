package missioncontrol.tests.cost_cap

import rego.v1

import data.missioncontrol.policies.cost_cap

# Conventions forced by the embedded engine (regopy); see the bundle README:
# * replace input field by field (`with input.run as ...`), never `with input as {...}`;
# * a `with` value is a literal or a function call, never a rule reference (it reads as undefined);
# * never assign an expression that carries `with` (`d := main.decision with ...`); compare it.
# * strings from `with` values may print quoted in sprintf: check messages with contains().
run_with_cost(cost) := {"run_id": "r1", "status": "running", "tokens_used": 0, "cost_usd": cost, "violated": []}

step_costing(model, estimate) := {
	"index": 2,
	"kind": "llm_call",
	"model": model,
	"tool": null,
	"estimate": {"input_tokens": 10, "max_output_tokens": 10, "cost_usd": estimate},
}

test_allows_under_the_cap if {
	count(cost_cap.deny) == 0 with input.run as run_with_cost(1.25) with input.step as step_costing("gpt-4o", 0.5)
}

test_allows_exactly_at_the_cap if {
	count(cost_cap.deny) == 0 with input.run as run_with_cost(9.5) with input.step as step_costing("gpt-4o", 0.5)
}

test_denies_over_the_cap if {
	count(cost_cap.deny) == 1 with input.run as run_with_cost(9.5) with input.step as step_costing("gpt-4o", 0.75)
}

test_message_names_projected_cost_and_cap if {
	some msg in cost_cap.deny with input.run as run_with_cost(9.5) with input.step as step_costing("gpt-4o", 0.75)
	contains(msg, "$10.2500")
	contains(msg, "cap of $10.00")
}

test_unpriced_model_warns_instead_of_denying if {
	count(cost_cap.deny) == 0 with input.run as run_with_cost(50) with input.step as step_costing("mystery-1", null)
	count(cost_cap.warn) == 1 with input.run as run_with_cost(50) with input.step as step_costing("mystery-1", null)
}

test_unpriced_warning_names_the_model if {
	some msg in cost_cap.warn with input.run as run_with_cost(0) with input.step as step_costing("mystery-1", null)
	contains(msg, "mystery-1")
}

test_priced_step_does_not_warn if {
	count(cost_cap.warn) == 0 with input.run as run_with_cost(0) with input.step as step_costing("gpt-4o", 0.01)
}

test_default_cap_is_ten_dollars if {
	cost_cap.cap == 10
}

test_tenant_override_wins if {
	count(cost_cap.deny) == 1 with input.tenant_id as "frugal"
		with input.run as run_with_cost(0.75)
		with input.step as step_costing("gpt-4o", 0.5)
		with data.missioncontrol.config.tenants as {"frugal": {"max_cost_usd_per_run": 1}}
}

test_metadata_is_complete if {
	cost_cap.metadata.id == "cost_cap"
	cost_cap.metadata.severity == "high"
	startswith(cost_cap.metadata.runbook_url, "https://")
}

run_with_reserved_cost(cost, reserved) := {
	"run_id": "r1", "status": "running", "tokens_used": 0, "cost_usd": cost,
	"cost_reserved_usd": reserved, "violated": [],
}

test_reserved_cost_counts_as_spent if {
	count(cost_cap.deny) == 1 with input.run as run_with_reserved_cost(4, 5) with input.step as step_costing("gpt-4o", 1.5)
}

test_reserved_cost_within_the_cap_still_allows if {
	count(cost_cap.deny) == 0 with input.run as run_with_reserved_cost(4, 5) with input.step as step_costing("gpt-4o", 1)
}
