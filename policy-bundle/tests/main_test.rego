package missioncontrol.tests.main

import rego.v1

import data.missioncontrol.main

# Conventions forced by the embedded engine (regopy); see the bundle README:
# * replace input field by field (`with input.run as ...`), never `with input as {...}`;
# * a `with` value is a literal or a function call, never a rule reference (it reads as undefined);
# * never assign an expression that carries `with` (`d := main.decision with ...`); compare it.
# * strings from `with` values may print quoted in sprintf: check messages with contains().
run_in(status, used, violated) := {
	"run_id": "r1",
	"status": status,
	"tokens_used": used,
	"cost_usd": 0,
	"violated": violated,
}

llm_step() := {
	"index": 2,
	"kind": "llm_call",
	"model": "gpt-4o",
	"tool": null,
	"estimate": {"input_tokens": 100, "max_output_tokens": 100, "cost_usd": 0.01},
}

unpriced_llm_step() := object.union(llm_step(), {"estimate": {"input_tokens": 1, "max_output_tokens": 1, "cost_usd": null}})

denied_ids contains e.policy_id if {
	some e in main.decision.deny
}

warned_ids contains e.policy_id if {
	some e in main.decision.warn
}

test_running_run_under_every_limit_is_allowed if {
	count(main.decision.deny) == 0 with input.run as run_in("running", 0, []) with input.step as llm_step()
	count(main.decision.warn) == 0 with input.run as run_in("running", 0, []) with input.step as llm_step()
}

test_stopped_run_is_denied_by_run_state if {
	denied_ids == {"run_state"} with input.run as run_in("stopped_by_policy", 0, []) with input.step as llm_step()
}

test_completed_run_is_denied_by_run_state if {
	denied_ids == {"run_state"} with input.run as run_in("completed", 0, []) with input.step as llm_step()
}

test_failed_run_is_denied_by_run_state if {
	denied_ids == {"run_state"} with input.run as run_in("failed", 0, []) with input.step as llm_step()
}

test_run_that_never_started_is_denied_by_run_state if {
	denied_ids == {"run_state"} with input.run as run_in(null, 0, []) with input.step as llm_step()
}

test_run_that_already_violated_is_denied_by_run_state if {
	denied_ids == {"run_state"} with input.run as run_in("running", 0, ["tool_allowlist"]) with input.step as llm_step()
}

test_run_state_message_names_the_violated_policies if {
	some e in main.decision.deny with input.run as run_in("running", 0, ["tool_allowlist", "cost_cap"])
		with input.step as llm_step()
	contains(e.message, "already violated tool_allowlist, cost_cap and is being stopped")
}

test_every_denying_policy_is_reported if {
	denied_ids == {"run_state", "token_limit"} with input.run as run_in("completed", 9950, []) with input.step as llm_step()
}

test_entries_carry_policy_metadata if {
	some e in main.decision.deny with input.run as run_in("running", 9950, []) with input.step as llm_step()
	e.policy_id == "token_limit"
	e.severity == "high"
	startswith(e.runbook_url, "https://")
	contains(e.message, "10150 tokens")
}

test_unpriced_model_is_a_warning_not_a_deny if {
	count(main.decision.deny) == 0 with input.run as run_in("running", 0, []) with input.step as unpriced_llm_step()
	warned_ids == {"cost_cap"} with input.run as run_in("running", 0, []) with input.step as unpriced_llm_step()
}

test_policies_lists_every_policy_once if {
	ids := [p.id | some p in main.policies]
	count(ids) == count({id | some id in ids})
	{id | some id in ids} == {
		"run_state", "admission_required", "token_limit", "cost_cap", "model_allowlist", "tool_allowlist",
		"max_steps", "agent_owner", "governed_fields", "promotion_checks", "tool_combinations",
		"model_deprecation", "memory_retention", "run_budget_actual",
	}
}

test_every_policy_has_title_severity_and_runbook if {
	every p in main.policies {
		p.title != ""
		p.severity in {"low", "medium", "high", "critical"}
		startswith(p.runbook_url, "https://")
	}
}
