# METADATA
# title: Deprecated model
# description: >-
#   Warns about an agent built on a deprecated model (deprecated_models maps each to its
#   replacement) and suggests the replacement as a mutation of model.name.
# custom:
#   id: model_deprecation
#   severity: low
#   runbook_url: https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/model_deprecation.md
package missioncontrol.rules.model_deprecation

import rego.v1

import data.missioncontrol.lib.agent
import data.missioncontrol.lib.config

metadata := {
	"id": "model_deprecation",
	"title": "Deprecated model",
	"description": concat(" ", [
		"Warns about an agent built on a deprecated model (deprecated_models maps each to its",
		"replacement) and suggests the replacement as a mutation of model.name.",
	]),
	"severity": "low",
	"runbook_url": "https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/model_deprecation.md",
}

hooks := {"on_create_attempt", "on_review_open", "on_promotion_attempt", "on_policy_update"}

deprecated := config.setting("deprecated_models", {"gpt-4": "gpt-4o", "gpt-3.5-turbo": "gpt-4o-mini"})

replacement := deprecated[agent.model_name]

warn contains msg if {
	replacement
	msg := concat("", ["model ", agent.model_name, " is deprecated; use ", replacement])
}

mutations contains {"op": "replace", "path": "model.name", "value": replacement, "message": msg} if {
	replacement
	msg := concat("", ["replace the deprecated model ", agent.model_name, " with ", replacement])
}

# The mutations by path, for callers and tests that want the suggested value of one field.
suggested := {m.path: m.value | some m in mutations}
