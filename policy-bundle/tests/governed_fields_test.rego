package missioncontrol.tests.governed_fields

import rego.v1

import data.missioncontrol.hooks.on_review_open
import data.missioncontrol.rules.governed_fields

governed_fields_cases := [
	{"name": "no change", "change": null, "roles": ["operator"], "denies": 0},
	{"name": "ungoverned field", "change": {"fields": ["model.name"]}, "roles": ["operator"], "denies": 0},
	{"name": "governed field", "change": {"fields": ["identity.owner"]}, "roles": ["operator"], "denies": 1},
	{"name": "under a governed field", "change": {"fields": ["limits.max_steps_per_run"]}, "roles": ["operator"], "denies": 1},
	{"name": "prefix is not a parent", "change": {"fields": ["limitsx"]}, "roles": ["operator"], "denies": 0},
	{"name": "two governed fields", "change": {"fields": ["policies", "limits"]}, "roles": [], "denies": 2},
	{"name": "admin may change", "change": {"fields": ["identity.owner"]}, "roles": ["admin"], "denies": 0},
]

test_governed_fields_table if {
	every case in governed_fields_cases {
		count(governed_fields.deny) == case.denies with input.change as case.change
			with input.actor as {"id": "user:u", "roles": case.roles}
	}
}

test_governed_fields_are_locked_by_default if {
	{l.field | some l in governed_fields.locked_fields} == {"identity.owner", "limits", "policies"}
}

test_governed_fields_follow_the_tenant_setting if {
	{l.field | some l in governed_fields.locked_fields} == {"tools"} with input.settings as {"governed_fields": ["tools"]}
	count(governed_fields.deny) == 1 with input.settings as {"governed_fields": ["tools"]}
		with input.change as {"fields": ["tools"]}
		with input.actor as {"id": "user:u", "roles": []}
}

test_governed_fields_locks_reach_the_review_hook if {
	some lock in on_review_open.decision.locked_fields
	lock.policy_id == "governed_fields"
	lock.field == "policies"
	count(on_review_open.decision.deny) == 0
}

test_governed_fields_message_names_the_field if {
	some msg in governed_fields.deny with input.change as {"fields": ["limits.max_cost_usd_per_run"]}
		with input.actor as {"id": "user:u", "roles": []}
	contains(msg, "sets limits,")
}
