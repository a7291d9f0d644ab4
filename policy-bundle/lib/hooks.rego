# The decision of one lifecycle hook, collected from every policy under data.missioncontrol.rules
# whose `hooks` set names it. Each hooks/<hook>.rego is one line calling hook_decision.
package missioncontrol.lib.hooks

import rego.v1

_hook_reason(meta, msg) := {
	"policy_id": meta.id,
	"severity": meta.severity,
	"message": msg,
	"runbook_url": meta.runbook_url,
}

# A policy without a deny, warn, locked_fields or mutations rule simply adds nothing of that kind.
hook_decision(hook) := {
	"deny": [_hook_reason(p.metadata, msg) |
		some p in data.missioncontrol.rules
		hook in p.hooks
		some msg in p.deny
	],
	"warn": [_hook_reason(p.metadata, msg) |
		some p in data.missioncontrol.rules
		hook in p.hooks
		some msg in p.warn
	],
	"locked_fields": [object.union(lock, {"policy_id": p.metadata.id}) |
		some p in data.missioncontrol.rules
		hook in p.hooks
		some lock in p.locked_fields
	],
	"mutations": [object.union(mutation, {"policy_id": p.metadata.id}) |
		some p in data.missioncontrol.rules
		hook in p.hooks
		some mutation in p.mutations
	],
}
