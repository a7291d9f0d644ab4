package missioncontrol.tests.model_allowlist

import rego.v1

import data.missioncontrol.policies.model_allowlist

# Conventions forced by the embedded engine (regopy); see the bundle README:
# * replace input field by field (`with input.run as ...`), never `with input as {...}`;
# * a `with` value is a literal or a function call, never a rule reference (it reads as undefined);
# * never assign an expression that carries `with` (`d := main.decision with ...`); compare it.
# * strings from `with` values may print quoted in sprintf: check messages with contains().
model_step(model) := {"index": 1, "kind": "llm_call", "model": model, "tool": null}

model_allowlists() := {"acme": {"model_allowlist": ["gpt-4o", "claude-sonnet-4"]}}

test_empty_allowlist_allows_any_model if {
	count(model_allowlist.deny) == 0 with input.step as model_step("anything")
}

test_listed_model_is_allowed if {
	count(model_allowlist.deny) == 0 with input.tenant_id as "acme"
		with input.step as model_step("claude-sonnet-4")
		with data.missioncontrol.config.tenants as model_allowlists()
}

test_unlisted_model_is_denied if {
	count(model_allowlist.deny) == 1 with input.tenant_id as "acme"
		with input.step as model_step("gpt-4o-mini")
		with data.missioncontrol.config.tenants as model_allowlists()
}

test_message_names_the_model if {
	some msg in model_allowlist.deny with input.tenant_id as "acme"
		with input.step as model_step("gpt-4o-mini")
		with data.missioncontrol.config.tenants as model_allowlists()
	contains(msg, "gpt-4o-mini")
	contains(msg, "not on the model allowlist (gpt-4o, claude-sonnet-4)")
}

test_step_without_model_is_not_checked if {
	count(model_allowlist.deny) == 0 with input.tenant_id as "acme"
		with input.step as model_step(null)
		with data.missioncontrol.config.tenants as model_allowlists()
}

test_bundle_default_allowlist_applies_to_every_tenant if {
	count(model_allowlist.deny) == 1 with input.tenant_id as "anyone"
		with input.step as model_step("gpt-4o-mini")
		with data.missioncontrol.config.defaults.model_allowlist as ["gpt-4o"]
}

test_metadata_is_complete if {
	model_allowlist.metadata.id == "model_allowlist"
	model_allowlist.metadata.severity == "medium"
}

test_settings_in_input_override_data_json if {
	count(model_allowlist.deny) == 0 with input.tenant_id as "acme"
		with input.step as model_step("gpt-4o-mini")
		with input.settings as {"model_allowlist": ["gpt-4o-mini"]}
		with data.missioncontrol.config.tenants as model_allowlists()
}

test_settings_in_input_restrict_a_tenant if {
	count(model_allowlist.deny) == 1 with input.tenant_id as "acme"
		with input.step as model_step("gpt-4o")
		with input.settings as {"model_allowlist": ["claude-sonnet-4"]}
}
