package missioncontrol.tests.run_budget_actual

import rego.v1

import data.missioncontrol.hooks.after_execute
import data.missioncontrol.rules.run_budget_actual

run_budget_actual_cases := [
	{"tokens": 9999, "cost": 1.0, "denies": 0},
	{"tokens": 10000, "cost": 10.0, "denies": 0},
	{"tokens": 10001, "cost": 1.0, "denies": 1},
	{"tokens": 100, "cost": 10.0001, "denies": 1},
	{"tokens": 20000, "cost": 20.0, "denies": 2},
]

test_run_budget_actual_table if {
	every case in run_budget_actual_cases {
		count(run_budget_actual.deny) == case.denies with input.request as {
			"run": {"tokens_used": case.tokens, "cost_usd": case.cost},
			"step": {"index": 3},
		}
	}
}

test_run_budget_actual_reaches_the_after_execute_hook if {
	some e in after_execute.decision.deny with input.request as {"run": {"tokens_used": 10001, "cost_usd": 0}, "step": {"index": 2}}
	e.policy_id == "run_budget_actual"
	contains(e.message, "after step 2")
	contains(e.message, "10001 tokens")
}

test_run_budget_actual_uses_the_tenant_limit if {
	count(run_budget_actual.deny) == 1 with input.request as {"run": {"tokens_used": 101, "cost_usd": 0}, "step": {"index": 1}}
		with input.settings as {"max_tokens_per_run": 100}
}
