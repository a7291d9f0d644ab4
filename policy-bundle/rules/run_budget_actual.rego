# METADATA
# title: Recorded usage within the run's limits
# description: >-
#   After a step ran, denies when the run's recorded tokens or priced cost exceed the run's
#   token limit or cost cap: admission decides on the caller's estimate, this checks what the
#   step really used.
# custom:
#   id: run_budget_actual
#   severity: high
#   runbook_url: https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/run_budget_actual.md
package missioncontrol.rules.run_budget_actual

import rego.v1

import data.missioncontrol.lib.config

metadata := {
	"id": "run_budget_actual",
	"title": "Recorded usage within the run's limits",
	"description": concat(" ", [
		"After a step ran, denies when the run's recorded tokens or priced cost exceed the run's",
		"token limit or cost cap: admission decides on the caller's estimate, this checks what",
		"the step really used.",
	]),
	"severity": "high",
	"runbook_url": "https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/run_budget_actual.md",
}

hooks := {"after_execute"}

token_limit := config.setting("max_tokens_per_run", 10000)

cost_cap := config.setting("max_cost_usd_per_run", 10.00)

deny contains msg if {
	used := input.request.run.tokens_used
	used > token_limit
	msg := sprintf(
		"after step %v the run has used %v tokens, over the limit of %v",
		[input.request.step.index, used, token_limit],
	)
}

deny contains msg if {
	cost := input.request.run.cost_usd
	cost > cost_cap
	msg := sprintf(
		"after step %v the run has cost $%.4f, over the cap of $%.2f",
		[input.request.step.index, cost, cost_cap],
	)
}
