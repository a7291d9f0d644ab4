# Per-tenant settings with bundle-wide defaults, shared by every policy.
package missioncontrol.lib.config

import rego.v1

# Both documents are optional in data.json: a bundle without them runs on each policy's fallback.
default tenants := {}

tenants := data.missioncontrol.config.tenants

default defaults := {}

defaults := data.missioncontrol.config.defaults

# setting(name, fallback) is the tenant's setting of `name` from `PUT /v1/policy-settings`
# (policy-admission passes it as input.settings, so a change applies without reloading the
# bundle), else the tenant's override in data.json, else the bundle default, else `fallback`.
# An override wins even when it is "smaller" (an empty allowlist disables the check for that
# tenant), so a tenant can be exempted as well as restricted.
setting(name, fallback) := value if {
	value := input.settings[name]
} else := value if {
	value := tenants[input.tenant_id][name]
} else := value if {
	value := defaults[name]
} else := fallback
