package missioncontrol.tests.agent_owner

import rego.v1

import data.missioncontrol.hooks.on_create_attempt
import data.missioncontrol.rules.agent_owner

# Table-driven: each case is an agent spec and how many denies it gets (see the bundle README for
# the engine's conventions; `with` takes a local variable bound by `some`, never a rule).
agent_owner_cases := [
	{"name": "owner named", "agent": {"identity": {"owner": "team-payments"}}, "denies": 0},
	{"name": "owner padded", "agent": {"identity": {"owner": "  ana  "}}, "denies": 0},
	{"name": "no identity", "agent": {"model": {"name": "gpt-4o"}}, "denies": 1},
	{"name": "empty owner", "agent": {"identity": {"owner": ""}}, "denies": 1},
	{"name": "blank owner", "agent": {"identity": {"owner": "   "}}, "denies": 1},
	{"name": "owner not a string", "agent": {"identity": {"owner": 42}}, "denies": 1},
	{"name": "no agent at all", "agent": null, "denies": 1},
]

test_agent_owner_table if {
	every case in agent_owner_cases {
		count(agent_owner.deny) == case.denies with input.agent as case.agent
	}
}

test_agent_owner_reaches_the_create_hook_decision if {
	some e in on_create_attempt.decision.deny with input.agent as {"identity": {"owner": ""}}
	e.policy_id == "agent_owner"
	e.severity == "medium"
	endswith(e.runbook_url, "runbooks/agent_owner.md")
}

test_agent_owner_serves_create_promotion_and_scan if {
	agent_owner.hooks == {"on_create_attempt", "on_promotion_attempt", "on_policy_update"}
}
