# The fields of input.agent (the agent spec, a JSON object) the lifecycle policies read, with the
# shapes they accept, so each policy does not re-parse the spec its own way.
package missioncontrol.lib.agent

import rego.v1

# identity.owner, trimmed; "" when missing or not a string.
default owner := ""

owner := trim_space(input.agent.identity.owner) if is_string(input.agent.identity.owner)

# model.model (the registry's canonical spec), model.name, or model as a bare string; undefined
# when the spec names no model.
model_name := input.agent.model.model if is_string(input.agent.model.model)

model_name := input.agent.model.name if {
	not is_string(input.agent.model.model)
	is_string(input.agent.model.name)
}

model_name := input.agent.model if is_string(input.agent.model)

# tools: a list of names or of objects with a name.
tool_names contains name if {
	some name in input.agent.tools
	is_string(name)
}

tool_names contains tool.name if {
	some tool in input.agent.tools
	is_object(tool)
	is_string(tool.name)
}

# memory.retention_days; undefined when not set.
retention_days := input.agent.memory.retention_days if is_number(input.agent.memory.retention_days)
