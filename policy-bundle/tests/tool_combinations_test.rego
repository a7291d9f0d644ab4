package missioncontrol.tests.tool_combinations

import rego.v1

import data.missioncontrol.rules.tool_combinations

tool_combinations_cases := [
	{"tools": [], "denies": 0},
	{"tools": ["shell"], "denies": 0},
	{"tools": ["http_request", "search"], "denies": 0},
	{"tools": ["shell", "http_request"], "denies": 1},
	{"tools": [{"name": "shell"}, {"name": "http_request"}], "denies": 1},
	{"tools": ["shell", {"name": "http_request"}, "search"], "denies": 1},
]

test_tool_combinations_table if {
	every case in tool_combinations_cases {
		count(tool_combinations.deny) == case.denies with input.agent as {"tools": case.tools}
	}
}

test_tool_combinations_from_settings if {
	count(tool_combinations.deny) == 1 with input.agent as {"tools": ["a", "b", "c"]}
		with input.settings as {"forbidden_tool_combinations": [["a", "c"]]}
	count(tool_combinations.deny) == 0 with input.agent as {"tools": ["a", "b"]}
		with input.settings as {"forbidden_tool_combinations": [["a", "c"]]}
}

test_tool_combinations_empty_combination_denies_nothing if {
	count(tool_combinations.deny) == 0 with input.agent as {"tools": ["a"]}
		with input.settings as {"forbidden_tool_combinations": [[]]}
}

test_tool_combinations_message_names_the_tools if {
	some msg in tool_combinations.deny with input.agent as {"tools": ["shell", "http_request"]}
	contains(msg, "shell + http_request")
}
