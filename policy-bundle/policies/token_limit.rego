# METADATA
# title: Token limit per run
# description: >-
#   Denies a step when the tokens the run has used so far, plus those reserved by steps admitted
#   but not yet recorded, plus the step's estimated input tokens and its maximum output tokens
#   would exceed the run's token limit.
# custom:
#   id: token_limit
#   severity: high
#   runbook_url: https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/token_limit.md
package missioncontrol.policies.token_limit

import rego.v1

import data.missioncontrol.lib.config

# The METADATA block above, as a rule: not every Rego engine exposes annotations at run time.
metadata := {
	"id": "token_limit",
	"title": "Token limit per run",
	"description": concat(" ", [
		"Denies a step when the tokens the run has used so far, plus those reserved by steps",
		"admitted but not yet recorded, plus the step's estimated input tokens and its maximum",
		"output tokens would exceed the run's token limit.",
	]),
	"severity": "high",
	"runbook_url": "https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/token_limit.md",
}

limit := config.setting("max_tokens_per_run", 10000)

# Steps admitted but not recorded yet hold their estimate: without this, steps admitted in
# parallel would each see the same "used so far" and together overrun the limit.
committed := input.run.tokens_used + object.get(input.run, "tokens_reserved", 0)

# The worst case: the step is charged its whole output budget, not an expected output length.
projected := (committed + input.step.estimate.input_tokens) + input.step.estimate.max_output_tokens

deny contains msg if {
	projected > limit
	msg := sprintf(
		"step would bring the run to %v tokens (%v used or reserved + %v input + %v max output), over the limit of %v",
		[
			projected, committed, input.step.estimate.input_tokens,
			input.step.estimate.max_output_tokens, limit,
		],
	)
}
