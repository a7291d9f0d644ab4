// The views: {name: {title, nav (listed in the side navigation), render: async (el, ctx) => void}};
// ctx.id is the route's id (#/view/<name>/<id>), ctx.query its query.
import { diff } from "./diff.js";
import { agent, agents } from "./agents.js";
import { agentNew } from "./wizard.js";
import { policy } from "./policy.js";

export const VIEWS = {
  diff,
  agents,
  agent,
  "agent-new": agentNew,
  policy,
};
