package missioncontrol.tests.promotion_checks

import rego.v1

import data.missioncontrol.hooks.on_promotion_attempt
import data.missioncontrol.rules.promotion_checks

promotion_checks_cases := [
	{"env": "production", "request": {"tests_passed": true, "validation_passed": true}, "denies": 0},
	{"env": "production", "request": {"tests_passed": true}, "denies": 1},
	{"env": "production", "request": {"validation_passed": true}, "denies": 0},
	{"env": "production", "request": {"tests_passed": false, "validation_passed": true}, "denies": 1},
	{"env": "production", "request": {"tests_passed": "yes", "validation_passed": true}, "denies": 1},
	{"env": "production", "request": {"tests_passed": false}, "denies": 2},
	{"env": "production", "request": {}, "denies": 1},
	{"env": "sandbox", "request": {}, "denies": 0},
]

test_promotion_checks_table if {
	every case in promotion_checks_cases {
		count(promotion_checks.deny) == case.denies with input.environment as case.env
			with input.request as case.request
	}
}

test_promotion_checks_deny_reaches_the_promotion_hook if {
	some e in on_promotion_attempt.decision.deny with input.environment as "production"
		with input.request as {"validation_passed": true, "tests_passed": false}
		with input.agent as {"identity": {"owner": "team"}}
	e.policy_id == "promotion_checks"
	contains(e.message, "tests")
}

test_promotion_checks_only_on_promotion if {
	promotion_checks.hooks == {"on_promotion_attempt"}
}
