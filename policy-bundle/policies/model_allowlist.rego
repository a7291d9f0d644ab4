# METADATA
# title: Model allowlist
# description: >-
#   Denies a step that names a model when the tenant has a non-empty model allowlist and the model
#   is not on it. An empty or missing allowlist allows every model.
# custom:
#   id: model_allowlist
#   severity: medium
#   runbook_url: https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/model_allowlist.md
package missioncontrol.policies.model_allowlist

import rego.v1

import data.missioncontrol.lib.config

# The METADATA block above, as a rule: not every Rego engine exposes annotations at run time.
metadata := {
	"id": "model_allowlist",
	"title": "Model allowlist",
	"description": concat(" ", [
		"Denies a step that names a model when the tenant has a non-empty model allowlist and the",
		"model is not on it. An empty or missing allowlist allows every model.",
	]),
	"severity": "medium",
	"runbook_url": "https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/model_allowlist.md",
}

allowlist := config.setting("model_allowlist", [])

deny contains msg if {
	model := input.step.model
	model != null
	count(allowlist) > 0
	not model in allowlist
	# concat, not sprintf("%v", [concat(...)]): regopy quotes computed strings inside sprintf.
	msg := concat("", [sprintf("model %v is not on the model allowlist (", [model]), concat(", ", allowlist), ")"])
}
