// The approval queue (GET /v1/approvals): approve or reject each waiting step with a reason,
// its SLA (due time, time left, escalated) and a link to its execution.
import { add, links, seconds, when } from "./flow-common.js";

export async function renderApprovals(el, ctx) {
  const { api, h, empty, failure, toast, onLeave, query } = ctx;
  const only = query.execution_id || null;
  const results = h("div", {});
  const refreshButton = h("button", { type: "button", onclick: () => load() }, "Refresh the queue");
  add(el,
    only ? h("p", {}, `Steps of execution ${only} · `, h("a", { href: links.execution(only) }, "open the execution"), " · ",
      h("a", { href: links.approvals() }, "show every waiting step")) : null,
    h("div", { class: "pager" }, refreshButton), results);
  const clocks = [];
  const tick = setInterval(() => { for (const fn of clocks) fn(); }, 1000);
  onLeave(() => clearInterval(tick));

  const decide = async (entry, verb, input) => {
    const reason = input.value.trim();
    if (!reason) {
      input.setAttribute("aria-invalid", "true");
      toast(`A reason is required to ${verb} ${entry.step_id}.`, "error");
      input.focus();
      return;
    }
    try {
      await api(`/v1/executions/${encodeURIComponent(entry.execution_id)}/steps/${encodeURIComponent(entry.step_id)}/${verb}`,
        { method: "POST", body: { reason } });
      toast(`${entry.step_id} of ${entry.execution_id}: ${verb === "approve" ? "approved" : "rejected"}.`);
      await load();
    } catch (e) { toast(`${e.code || "error"}: ${e.message}`, "error"); }
  };

  const load = async () => {
    clocks.length = 0;
    let queue;
    try { queue = await api("/v1/approvals"); } catch (e) { results.replaceChildren(failure(e)); return; }
    const entries = (queue.approvals || []).filter((a) => !only || a.execution_id === only);
    if (!entries.length) {
      results.replaceChildren(empty(only ? "No step of this execution waits for approval." :
        "No step waits for approval. Steps of a gated risk tier (irreversible by default) wait here."));
      return;
    }
    // Escalation is on the execution's step (GET /v1/executions/{id}): one read per execution.
    const executions = new Map();
    await Promise.all([...new Set(entries.map((a) => a.execution_id))].map(async (e) => {
      try { executions.set(e, await api(`/v1/executions/${encodeURIComponent(e)}`)); } catch { /* shown as unknown */ }
    }));
    const loadedAt = Date.now();
    const rows = entries.map((a, i) => {
      const step = executions.get(a.execution_id)?.steps?.find((s) => s.step_id === a.step_id);
      const escalated = step?.approval ? (step.approval.escalated ? "escalated" : "no") : "unknown";
      const left = h("span", {});
      const show = () => {
        const s = a.sla_left_s - (Date.now() - loadedAt) / 1000;
        left.className = s < 0 ? "deny" : s < 600 ? "warn" : "";
        left.textContent = s < 0 ? `overdue by ${seconds(-s)}` : seconds(s);
      };
      show(); clocks.push(show);
      const input = h("input", { id: `reason-${i}`, name: "reason", required: true, autocomplete: "off", maxlength: 500 });
      return h("tr", { "data-approval": `${a.execution_id}/${a.step_id}` },
        h("th", { scope: "row" }, a.step_id, h("div", { class: "muted" }, a.workflow_id)),
        h("td", {}, h("a", { href: links.execution(a.execution_id) }, a.execution_id)),
        h("td", {}, a.risk_tier),
        h("td", {}, `${a.approvals} of ${a.required}`, h("div", { class: "muted" }, `role ${a.role}`)),
        h("td", {}, `waiting ${seconds(a.age_s)}`, h("div", { class: "muted" }, when(a.requested_at))),
        h("td", {}, when(a.expires_at)),
        h("td", { "data-sla-left": "" }, left),
        h("td", {}, escalated),
        h("td", {}, h("label", { for: input.id }, `Reason for ${a.step_id}`), input,
          h("div", { class: "pager" },
            h("button", { type: "button", class: "primary", onclick: () => decide(a, "approve", input) }, `Approve ${a.step_id}`),
            h("button", { type: "button", onclick: () => decide(a, "reject", input) }, `Reject ${a.step_id}`))));
    });
    results.replaceChildren(h("table", { "aria-label": "Steps waiting for approval" },
      h("thead", {}, h("tr", {}, ["Step", "Execution", "Risk tier", "Approvals", "Requested", "Due", "SLA left", "Escalated", "Decision"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows)));
  };
  await load();
}
