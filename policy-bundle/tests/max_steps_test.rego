package missioncontrol.tests.max_steps

import rego.v1

import data.missioncontrol.rules.max_steps

max_steps_cases := [
	{"limits": {"max_steps_per_run": 10}, "ceiling": 200, "denies": 0, "warns": 0},
	{"limits": {"max_steps_per_run": 200}, "ceiling": 200, "denies": 0, "warns": 0},
	{"limits": {"max_steps_per_run": 201}, "ceiling": 200, "denies": 1, "warns": 0},
	{"limits": {}, "ceiling": 200, "denies": 0, "warns": 1},
	{"limits": {"max_steps_per_run": "many"}, "ceiling": 200, "denies": 0, "warns": 1},
	{"limits": {"max_steps_per_run": 5000}, "ceiling": 0, "denies": 0, "warns": 0},
	{"limits": {}, "ceiling": 0, "denies": 0, "warns": 0},
]

test_max_steps_table if {
	every case in max_steps_cases {
		count(max_steps.deny) == case.denies with input.agent as {"limits": case.limits}
			with input.settings as {"max_steps_per_run": case.ceiling}
		count(max_steps.warn) == case.warns with input.agent as {"limits": case.limits}
			with input.settings as {"max_steps_per_run": case.ceiling}
		count(max_steps.mutations) == case.warns with input.agent as {"limits": case.limits}
			with input.settings as {"max_steps_per_run": case.ceiling}
	}
}

test_max_steps_default_ceiling_is_200 if {
	max_steps.ceiling == 200
	count(max_steps.deny) == 1 with input.agent as {"limits": {"max_steps_per_run": 201}}
}

test_max_steps_message_names_both_numbers if {
	some msg in max_steps.deny with input.agent as {"limits": {"max_steps_per_run": 500}}
	contains(msg, "500 steps per run")
	contains(msg, "ceiling of 200")
}
