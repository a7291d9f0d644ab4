package missioncontrol.tests.tool_allowlist

import rego.v1

import data.missioncontrol.policies.tool_allowlist

# Conventions forced by the embedded engine (regopy); see the bundle README:
# * replace input field by field (`with input.run as ...`), never `with input as {...}`;
# * a `with` value is a literal or a function call, never a rule reference (it reads as undefined);
# * never assign an expression that carries `with` (`d := main.decision with ...`); compare it.
# * strings from `with` values may print quoted in sprintf: check messages with contains().
tool_step(tool) := {"index": 1, "kind": "tool_call", "model": null, "tool": tool}

tool_allowlists() := {"acme": {"tool_allowlist": ["search", "calculator"]}}

test_empty_allowlist_allows_any_tool if {
	count(tool_allowlist.deny) == 0 with input.step as tool_step("shell")
}

test_listed_tool_is_allowed if {
	count(tool_allowlist.deny) == 0 with input.tenant_id as "acme"
		with input.step as tool_step("search")
		with data.missioncontrol.config.tenants as tool_allowlists()
}

test_unlisted_tool_is_denied if {
	count(tool_allowlist.deny) == 1 with input.tenant_id as "acme"
		with input.step as tool_step("shell")
		with data.missioncontrol.config.tenants as tool_allowlists()
}

test_message_names_the_tool if {
	some msg in tool_allowlist.deny with input.tenant_id as "acme"
		with input.step as tool_step("shell")
		with data.missioncontrol.config.tenants as tool_allowlists()
	contains(msg, "shell")
	contains(msg, "not on the tool allowlist (search, calculator)")
}

test_step_without_tool_is_not_checked if {
	count(tool_allowlist.deny) == 0 with input.tenant_id as "acme"
		with input.step as tool_step(null)
		with data.missioncontrol.config.tenants as tool_allowlists()
}

test_tenant_override_can_exempt_a_tenant if {
	count(tool_allowlist.deny) == 0 with input.tenant_id as "trusted"
		with input.step as tool_step("shell")
		with data.missioncontrol.config.defaults.tool_allowlist as ["search"]
		with data.missioncontrol.config.tenants as {"trusted": {"tool_allowlist": []}}
}

test_metadata_is_complete if {
	tool_allowlist.metadata.id == "tool_allowlist"
	tool_allowlist.metadata.severity == "high"
}
