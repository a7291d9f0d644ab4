# METADATA
# title: Cost cap per run
# description: >-
#   Denies a step when the run's cost so far (including the estimates reserved by steps admitted
#   but not yet recorded) plus the step's estimated cost (its input tokens and maximum output
#   tokens at the tenant's prices) would exceed the run's cost cap. A step whose
#   model has no price cannot be checked and is admitted with a warning.
# custom:
#   id: cost_cap
#   severity: high
#   runbook_url: https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/cost_cap.md
package missioncontrol.policies.cost_cap

import rego.v1

import data.missioncontrol.lib.config

# The METADATA block above, as a rule: not every Rego engine exposes annotations at run time.
metadata := {
	"id": "cost_cap",
	"title": "Cost cap per run",
	"description": concat(" ", [
		"Denies a step when the run's cost so far (including the estimates reserved by steps",
		"admitted but not yet recorded) plus the step's estimated cost (its input tokens and",
		"maximum output tokens at the tenant's prices) would exceed the run's cost cap. A step",
		"whose model has no price cannot be checked and is admitted with a warning.",
	]),
	"severity": "high",
	"runbook_url": "https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/cost_cap.md",
}

# USD. The seed's "threshold_cents: 1000" is the same cap.
cap := config.setting("max_cost_usd_per_run", 10.00)

# Reserved: the estimates of steps admitted in parallel and not recorded yet (see token_limit).
spent := input.run.cost_usd + object.get(input.run, "cost_reserved_usd", 0)

deny contains msg if {
	estimate := input.step.estimate.cost_usd
	estimate != null
	projected := spent + estimate
	projected > cap
	msg := sprintf(
		"step would bring the run to $%.4f ($%.4f so far + $%.4f estimated), over the cap of $%.2f",
		[projected, spent, estimate, cap],
	)
}

# An unknown price is not a zero price: say so instead of silently admitting the step as free.
warn contains msg if {
	input.step.estimate.cost_usd == null
	msg := sprintf(
		"model %v has no price for this tenant, so the cost cap of $%.2f cannot be checked for this step",
		[input.step.model, cap],
	)
}
