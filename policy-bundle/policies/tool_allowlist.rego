# METADATA
# title: Tool allowlist
# description: >-
#   Denies a step that names a tool when the tenant has a non-empty tool allowlist and the tool is
#   not on it. An empty or missing allowlist allows every tool.
# custom:
#   id: tool_allowlist
#   severity: high
#   runbook_url: https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/tool_allowlist.md
package missioncontrol.policies.tool_allowlist

import rego.v1

import data.missioncontrol.lib.config

# The METADATA block above, as a rule: not every Rego engine exposes annotations at run time.
metadata := {
	"id": "tool_allowlist",
	"title": "Tool allowlist",
	"description": concat(" ", [
		"Denies a step that names a tool when the tenant has a non-empty tool allowlist and the",
		"tool is not on it. An empty or missing allowlist allows every tool.",
	]),
	"severity": "high",
	"runbook_url": "https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/tool_allowlist.md",
}

allowlist := config.setting("tool_allowlist", [])

deny contains msg if {
	tool := input.step.tool
	tool != null
	count(allowlist) > 0
	not tool in allowlist
	# concat, not sprintf("%v", [concat(...)]): regopy quotes computed strings inside sprintf.
	msg := concat("", [sprintf("tool %v is not on the tool allowlist (", [tool]), concat(", ", allowlist), ")"])
}
