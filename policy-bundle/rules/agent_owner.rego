# METADATA
# title: Agent must name an owner
# description: >-
#   Denies creating, promoting or keeping an agent whose spec names no owner (identity.owner):
#   every agent needs someone answerable for it when a policy fires or an incident opens.
# custom:
#   id: agent_owner
#   severity: medium
#   runbook_url: https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/agent_owner.md
package missioncontrol.rules.agent_owner

import rego.v1

import data.missioncontrol.lib.agent

metadata := {
	"id": "agent_owner",
	"title": "Agent must name an owner",
	"description": concat(" ", [
		"Denies creating, promoting or keeping an agent whose spec names no owner",
		"(identity.owner): every agent needs someone answerable for it when a policy fires or",
		"an incident opens.",
	]),
	"severity": "medium",
	"runbook_url": "https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/agent_owner.md",
}

hooks := {"on_create_attempt", "on_promotion_attempt", "on_policy_update"}

deny contains "the agent names no owner: set identity.owner to the person or team answerable for it" if {
	agent.owner == ""
}
