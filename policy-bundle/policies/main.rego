# METADATA
# title: Admission decision
# description: >-
#   Collects the deny and warn messages of every policy under data.missioncontrol.policies into one
#   decision, and denies every step of a run that is not running or has already violated a policy.
package missioncontrol.main

import rego.v1

# The run-state gate lives here rather than in policies/ because it is not a tenant setting: no
# step of a stopped or finished run is ever admitted, whatever the configuration.
run_state_metadata := {
	"id": "run_state",
	"title": "Run must be running",
	"description": concat(" ", [
		"Denies every step of a run that has not started, has finished, or was stopped; and every",
		"step after one that violated a policy, since the run is being stopped at that step.",
	]),
	"severity": "high",
	"runbook_url": "https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/run_state.md",
}

# Not evaluated per admission: policy-admission judges a step recorded without an allowed
# admission, a second time or out of order against it when the step is recorded, with the
# tenant's `admission_required` setting (enforce | warn). Listed so projections can name it.
admission_required_metadata := {
	"id": "admission_required",
	"title": "Steps must be admitted",
	"description": concat(" ", [
		"Every recorded step must hold an allowed admission of its index, be recorded once, and",
		"not fall below a step index already recorded; a step that breaks this is kept, marked",
		"and judged a violation (enforce: the run is stopped and an incident opened; warn: only",
		"recorded).",
	]),
	"severity": "high",
	"runbook_url": "https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/admission_required.md",
}

run_state_deny contains msg if {
	input.run.status != "running"
	msg := sprintf("run %v is %v; no further steps are admitted", [input.run.run_id, input.run.status])
}

# Between a deny and the workflow engine recording the stop, the agent may ask again with a step
# no other policy objects to; the run is already being stopped, so that step is refused too.
run_state_deny contains msg if {
	input.run.status == "running"
	count(input.run.violated) > 0
	# concat, not sprintf("%v", [concat(...)]): regopy quotes computed strings inside sprintf.
	msg := concat("", [
		sprintf("run %v already violated ", [input.run.run_id]),
		concat(", ", input.run.violated),
		" and is being stopped; no further steps are admitted",
	])
}

_entry(meta, msg) := {
	"policy_id": meta.id,
	"severity": meta.severity,
	"message": msg,
	"runbook_url": meta.runbook_url,
}

deny_entries contains _entry(run_state_metadata, msg) if {
	some msg in run_state_deny
}

deny_entries contains _entry(policy.metadata, msg) if {
	some policy in data.missioncontrol.policies
	some msg in policy.deny
}

warn_entries contains _entry(policy.metadata, msg) if {
	some policy in data.missioncontrol.policies
	some msg in policy.warn
}

# The one document admission evaluates per step. Order is not significant: the service sorts
# reasons by severity itself.
decision := {
	"deny": [e | some e in deny_entries],
	"warn": [e | some e in warn_entries],
}

# Every policy's metadata, published with the bundle so projections can name policies.
policies := array.concat(
	[run_state_metadata, admission_required_metadata],
	array.concat(
		[policy.metadata | some policy in data.missioncontrol.policies],
		# The lifecycle hooks' policies (lib/hooks.rego): not evaluated at admission.
		[rule.metadata | some rule in data.missioncontrol.rules],
	),
)
