# METADATA
# title: Forbidden tool combinations
# description: >-
#   Denies an agent whose tools include every tool of a forbidden combination
#   (forbidden_tool_combinations): each tool may be fine alone, together they are a risk, such as
#   running code and reaching the network.
# custom:
#   id: tool_combinations
#   severity: high
#   runbook_url: https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/tool_combinations.md
package missioncontrol.rules.tool_combinations

import rego.v1

import data.missioncontrol.lib.agent
import data.missioncontrol.lib.config

metadata := {
	"id": "tool_combinations",
	"title": "Forbidden tool combinations",
	"description": concat(" ", [
		"Denies an agent whose tools include every tool of a forbidden combination",
		"(forbidden_tool_combinations): each tool may be fine alone, together they are a risk,",
		"such as running code and reaching the network.",
	]),
	"severity": "high",
	"runbook_url": "https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/tool_combinations.md",
}

hooks := {"on_create_attempt", "on_promotion_attempt", "on_policy_update"}

combinations := config.setting("forbidden_tool_combinations", [["shell", "http_request"]])

deny contains msg if {
	some combination in combinations
	count(combination) > 0
	every tool in combination {
		tool in agent.tool_names
	}
	msg := concat("", ["the agent's tools combine ", concat(" + ", combination), ", a forbidden combination"])
}
