package missioncontrol.tests.memory_retention

import rego.v1

import data.missioncontrol.rules.memory_retention

memory_retention_cases := [
	{"memory": {"retention_days": 1}, "denies": 0},
	{"memory": {"retention_days": 30}, "denies": 0},
	{"memory": {"retention_days": 31}, "denies": 1},
	{"memory": {"retention_days": 30.5}, "denies": 1},
	{"memory": {"retention_days": "forever"}, "denies": 0},
	{"memory": {}, "denies": 0},
]

test_memory_retention_table if {
	every case in memory_retention_cases {
		count(memory_retention.deny) == case.denies with input.agent as {"memory": case.memory}
		count(memory_retention.mutations) == case.denies with input.agent as {"memory": case.memory}
	}
}

test_memory_retention_mutation_suggests_the_limit if {
	some m in memory_retention.mutations with input.agent as {"memory": {"retention_days": 90}}
	m.path == "memory.retention_days"
	m.value == 30
}

test_memory_retention_tenant_setting_wins if {
	count(memory_retention.deny) == 1 with input.agent as {"memory": {"retention_days": 8}}
		with input.settings as {"max_memory_retention_days": 7}
}
