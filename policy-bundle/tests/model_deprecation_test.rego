package missioncontrol.tests.model_deprecation

import rego.v1

import data.missioncontrol.hooks.on_review_open
import data.missioncontrol.rules.model_deprecation

model_deprecation_cases := [
	{"agent": {"model": {"name": "gpt-4"}}, "warns": 1, "replacement": "gpt-4o"},
	{"agent": {"model": {"name": "gpt-3.5-turbo"}}, "warns": 1, "replacement": "gpt-4o-mini"},
	{"agent": {"model": "gpt-4"}, "warns": 1, "replacement": "gpt-4o"},
	{"agent": {"model": {"name": "gpt-4o"}}, "warns": 0, "replacement": null},
	{"agent": {}, "warns": 0, "replacement": null},
]

test_model_deprecation_table if {
	every case in model_deprecation_cases {
		count(model_deprecation.warn) == case.warns with input.agent as case.agent
		count(model_deprecation.mutations) == case.warns with input.agent as case.agent
		object.get(model_deprecation.suggested, "model.name", null) == case.replacement with input.agent as case.agent
	}
}

test_model_deprecation_mutation_replaces_model_name if {
	some m in model_deprecation.mutations with input.agent as {"model": {"name": "gpt-4"}}
	m.op == "replace"
	m.path == "model.name"
	m.value == "gpt-4o"
}

test_model_deprecation_follows_the_tenant_setting if {
	count(model_deprecation.warn) == 1 with input.agent as {"model": {"name": "old"}}
		with input.settings as {"deprecated_models": {"old": "new"}}
	count(model_deprecation.warn) == 0 with input.agent as {"model": {"name": "gpt-4"}}
		with input.settings as {"deprecated_models": {}}
}

test_model_deprecation_reaches_the_review_hook_as_a_warning if {
	count(on_review_open.decision.deny) == 0 with input.agent as {"model": {"name": "gpt-4"}}
	some e in on_review_open.decision.warn with input.agent as {"model": {"name": "gpt-4"}}
	e.policy_id == "model_deprecation"
	some m in on_review_open.decision.mutations with input.agent as {"model": {"name": "gpt-4"}}
	m.policy_id == "model_deprecation"
}
