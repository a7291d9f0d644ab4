# The on_review_open hook's decision (see lib/hooks.rego and the bundle README).
package missioncontrol.hooks.on_review_open

import rego.v1

import data.missioncontrol.lib.hooks as hooklib

decision := hooklib.hook_decision("on_review_open")
