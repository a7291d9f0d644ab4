# The after_execute hook's decision (see lib/hooks.rego and the bundle README).
package missioncontrol.hooks.after_execute

import rego.v1

import data.missioncontrol.lib.hooks as hooklib

decision := hooklib.hook_decision("after_execute")
