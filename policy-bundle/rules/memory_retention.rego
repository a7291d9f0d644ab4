# METADATA
# title: Memory retention limit
# description: >-
#   Denies an agent that keeps memory longer than the tenant allows (max_memory_retention_days)
#   and suggests the limit as a mutation of memory.retention_days.
# custom:
#   id: memory_retention
#   severity: medium
#   runbook_url: https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/memory_retention.md
package missioncontrol.rules.memory_retention

import rego.v1

import data.missioncontrol.lib.agent
import data.missioncontrol.lib.config

metadata := {
	"id": "memory_retention",
	"title": "Memory retention limit",
	"description": concat(" ", [
		"Denies an agent that keeps memory longer than the tenant allows",
		"(max_memory_retention_days) and suggests the limit as a mutation of",
		"memory.retention_days.",
	]),
	"severity": "medium",
	"runbook_url": "https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/memory_retention.md",
}

hooks := {"on_create_attempt", "on_promotion_attempt", "on_policy_update"}

limit := config.setting("max_memory_retention_days", 30)

deny contains msg if {
	agent.retention_days > limit
	msg := sprintf("the agent keeps memory for %v days, over the limit of %v days", [agent.retention_days, limit])
}

mutations contains {"op": "replace", "path": "memory.retention_days", "value": limit, "message": msg} if {
	agent.retention_days > limit
	msg := sprintf("lower memory.retention_days to %v", [limit])
}
