# METADATA
# title: Production promotion requires passing tests and validation
# description: >-
#   Denies promoting an agent to production unless the promotion request reports its tests and
#   its policy validation as passed (request.tests_passed, request.validation_passed).
# custom:
#   id: promotion_checks
#   severity: high
#   runbook_url: https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/promotion_checks.md
package missioncontrol.rules.promotion_checks

import rego.v1

metadata := {
	"id": "promotion_checks",
	"title": "Production promotion requires passing tests and validation",
	"description": concat(" ", [
		"Denies promoting an agent to production unless the promotion request reports its tests",
		"and its policy validation as passed (request.tests_passed, request.validation_passed).",
	]),
	"severity": "high",
	"runbook_url": "https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/promotion_checks.md",
}

hooks := {"on_promotion_attempt"}

deny contains "promotion to production needs passing tests (request.tests_passed is not true)" if {
	input.environment == "production"
	not input.request.tests_passed == true
}

deny contains "promotion to production needs a passing validation (request.validation_passed is not true)" if {
	input.environment == "production"
	not input.request.validation_passed == true
}
