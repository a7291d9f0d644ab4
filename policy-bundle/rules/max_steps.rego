# METADATA
# title: Maximum steps per run
# description: >-
#   Denies an agent whose step limit (limits.max_steps_per_run) is over the tenant's ceiling
#   (max_steps_per_run), so a looping agent is stopped by its own limit; warns about an agent
#   that declares no step limit. A ceiling of 0 turns the check off.
# custom:
#   id: max_steps
#   severity: medium
#   runbook_url: https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/max_steps.md
package missioncontrol.rules.max_steps

import rego.v1

import data.missioncontrol.lib.config

metadata := {
	"id": "max_steps",
	"title": "Maximum steps per run",
	"description": concat(" ", [
		"Denies an agent whose step limit (limits.max_steps_per_run) is over the tenant's",
		"ceiling (max_steps_per_run), so a looping agent is stopped by its own limit; warns",
		"about an agent that declares no step limit. A ceiling of 0 turns the check off.",
	]),
	"severity": "medium",
	"runbook_url": "https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/max_steps.md",
}

hooks := {"on_create_attempt", "on_promotion_attempt", "on_policy_update"}

ceiling := config.setting("max_steps_per_run", 200)

declared := input.agent.limits.max_steps_per_run if is_number(input.agent.limits.max_steps_per_run)

deny contains msg if {
	ceiling > 0
	declared > ceiling
	msg := sprintf("the agent allows %v steps per run, over the tenant's ceiling of %v", [declared, ceiling])
}

warn contains msg if {
	ceiling > 0
	not declared
	msg := sprintf("the agent declares no step limit (limits.max_steps_per_run); runs may loop up to the ceiling of %v", [ceiling])
}

mutations contains {"op": "add", "path": "limits.max_steps_per_run", "value": ceiling, "message": msg} if {
	ceiling > 0
	not declared
	msg := sprintf("declare limits.max_steps_per_run (at most %v)", [ceiling])
}
