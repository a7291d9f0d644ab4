# Per-tenant settings with bundle-wide defaults, shared by every policy.
package missioncontrol.lib.config

import rego.v1

# Both documents are optional in data.json: a bundle without them runs on each policy's fallback.
default tenants := {}

tenants := data.missioncontrol.config.tenants

default defaults := {}

defaults := data.missioncontrol.config.defaults

# setting(name, fallback) is the tenant's override of `name`, else the bundle default, else
# `fallback`. An override wins even when it is "smaller" (an empty allowlist disables the check
# for that tenant), so a tenant can be exempted as well as restricted.
setting(name, fallback) := value if {
	value := tenants[input.tenant_id][name]
} else := value if {
	value := defaults[name]
} else := fallback
