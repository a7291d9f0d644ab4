# The on_promotion_attempt hook's decision (see lib/hooks.rego and the bundle README).
package missioncontrol.hooks.on_promotion_attempt

import rego.v1

import data.missioncontrol.lib.hooks as hooklib

decision := hooklib.hook_decision("on_promotion_attempt")
