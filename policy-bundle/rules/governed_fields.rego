# METADATA
# title: Governed fields are locked
# description: >-
#   Marks the fields the tenant governs (governed_fields) as locked on every create, review and
#   promotion, and denies a change to one of them by anyone but an admin.
# custom:
#   id: governed_fields
#   severity: high
#   runbook_url: https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/governed_fields.md
package missioncontrol.rules.governed_fields

import rego.v1

import data.missioncontrol.lib.config

metadata := {
	"id": "governed_fields",
	"title": "Governed fields are locked",
	"description": concat(" ", [
		"Marks the fields the tenant governs (governed_fields) as locked on every create,",
		"review and promotion, and denies a change to one of them by anyone but an admin.",
	]),
	"severity": "high",
	"runbook_url": "https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/governed_fields.md",
}

hooks := {"on_create_attempt", "on_review_open", "on_promotion_attempt"}

governed := config.setting("governed_fields", ["identity.owner", "limits", "policies"])

locked_fields contains {"field": field, "message": "governed by the tenant: only an admin may change it"} if {
	some field in governed
}

# A change names the dotted paths it sets; a governed field is touched by a change to it or to
# anything under it ("limits" covers "limits.max_steps_per_run").
touched contains field if {
	some field in governed
	some path in input.change.fields
	_governed_covers(field, path)
}

_governed_covers(field, path) if field == path

_governed_covers(field, path) if startswith(path, concat("", [field, "."]))

deny contains msg if {
	some field in touched
	not "admin" in object.get(input.actor, "roles", [])
	msg := concat("", ["the change sets ", field, ", a field the tenant governs; only an admin may change it"])
}
