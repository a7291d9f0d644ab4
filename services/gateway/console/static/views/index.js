// The views: {name: {title, nav (listed in the side navigation), render: async (el, ctx) => void}};
// ctx.id is the route's id (#/view/<name>/<id>), ctx.query its query.
import { renderExecutions } from "./executions.js";
import { renderExecution } from "./execution.js";
import { renderApprovals } from "./approvals.js";
import { renderReplay } from "./replay.js";
import { renderIncident } from "./incident.js";
import { renderEvidence } from "./evidence.js";
import { diff } from "./diff.js";
import { agent, agents } from "./agents.js";
import { agentNew } from "./wizard.js";
import { policy } from "./policy.js";

export const VIEWS = {
  executions: { title: "Workflow executions", nav: true, render: renderExecutions },
  execution: { title: "Execution flow", nav: false, render: renderExecution },
  approvals: { title: "Approval queue", nav: true, render: renderApprovals },
  replay: { title: "Run replay", nav: false, render: renderReplay },
  incident: { title: "Incident", nav: false, render: renderIncident },
  evidence: { title: "Evidence exports", nav: true, render: renderEvidence },
  diff,
  agents,
  agent,
  "agent-new": agentNew,
  policy,
};
