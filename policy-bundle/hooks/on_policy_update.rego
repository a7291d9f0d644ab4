# The on_policy_update hook's decision (see lib/hooks.rego and the bundle README).
package missioncontrol.hooks.on_policy_update

import rego.v1

import data.missioncontrol.lib.hooks as hooklib

decision := hooklib.hook_decision("on_policy_update")
