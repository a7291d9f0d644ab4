# METADATA
# title: Production promotion requires passing tests and validation
# description: >-
#   Denies promoting an agent to production unless its policy validation passed
#   (request.validation_passed) and, when the request reports tests, they passed
#   (request.tests_passed).
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
		"Denies promoting an agent to production unless its policy validation passed",
		"(request.validation_passed) and, when the request reports tests, they passed",
		"(request.tests_passed).",
	]),
	"severity": "high",
	"runbook_url": "https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/promotion_checks.md",
}

hooks := {"on_promotion_attempt"}

# Tests are the caller's to report (the registry runs none): when a promotion reports them, they
# must have passed. Validation the registry always reports.
deny contains "promotion to production needs passing tests (request.tests_passed is not true)" if {
	input.environment == "production"
	"tests_passed" in object.keys(input.request)
	not input.request.tests_passed == true
}

deny contains "promotion to production needs a passing validation (request.validation_passed is not true)" if {
	input.environment == "production"
	not input.request.validation_passed == true
}
