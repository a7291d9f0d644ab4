// Logs (LLM Runs, System Logs, Audit Logs) and Analytics (Cost Intelligence, Policies Usage,
// Productivity).
import { h, put, dataTable, cards, actions, section, link, href, fmt, optional, missing, records, chart, pivot, AUDIT_COLUMNS, AUDIT_FILTERS, auditLoader, empty } from "./lib.js";
import { runsTable, runLevels } from "./runs.js";
import { budgetBurn } from "./governance.js";

const SYSTEM_TYPES = ["", "anchor.checkpointed", "tenant.created", "api_key.issued", "api_key.revoked", "user.created", "user.role_granted", "user.role_revoked", "user.disabled",
  "policy.bundle_uploaded", "policy.bundle_activated", "policy.settings_changed", "policy.signing_key_registered", "cost.price_table_published", "budget.set", "budget.timezone_set"];

async function countOf(ctx, query) {
  const res = await ctx.api("/v1/audit/search", { query: { ...query, limit: 200 } });
  return res.next_cursor ? `${res.events.length}+` : res.events.length;
}

/** The ISO time `days` ago. */
const ago = (days) => new Date(Date.now() - days * 86400000).toISOString();

export const LOGS = [
  {
    id: "LOG-REC-LLM", domain: "Logs", topic: "LLM Runs", defaultLevel: "O2",
    levels: {
      O1: async (el, ctx) => {
        const res = await ctx.api("/v1/runs", { query: { limit: 500 } });
        const steps = res.runs.reduce((a, r) => a + r.last_step_index + 1, 0);
        put(el, cards([{ label: "runs with logs", value: res.runs.length }, { label: "steps recorded", value: steps },
          { label: "tokens", value: fmt.num(res.runs.reduce((a, r) => a + r.tokens_used, 0)) }]));
      },
      O2: async (el, ctx) => { put(el, runsTable(ctx, { caption: "run logs", linkTo: (r) => href.trace(r.run_id) })); },
      ...runLevels("LOG-REC-LLM"),
    },
  },
  {
    id: "LOG-REC-SYS", domain: "Logs", topic: "System Logs", defaultLevel: "O2",
    levels: {
      O1: async (el, ctx) => {
        put(el, cards(await Promise.all([["checkpoints signed", "anchor.checkpointed"], ["bundles activated", "policy.bundle_activated"], ["API keys issued", "api_key.issued"], ["price tables published", "cost.price_table_published"]]
          .map(async ([label, t]) => ({ label, value: await countOf(ctx, { event_type: t }), href: ctx.panelHref("LOG-REC-SYS", "O2", { event_type: t }) })))));
      },
      O2: async (el, ctx) => {
        put(el, h("p", { class: "muted" }, "What the system did: checkpoints, keys, users, bundles, prices and budgets."),
          dataTable(ctx, { caption: "system events", columns: AUDIT_COLUMNS, paging: "cursor",
            filters: [{ name: "event_type", label: "Kind", options: SYSTEM_TYPES, initial: "anchor.checkpointed" }, { name: "actor", label: "Actor" }, { name: "since", label: "Since (ISO time)" }],
            load: auditLoader(ctx), emptyText: "No system event of this kind." }));
      },
    },
  },
  {
    id: "LOG-REC-AUD", domain: "Logs", topic: "Audit Logs", defaultLevel: "O2",
    levels: {
      O1: async (el, ctx) => {
        put(el, cards(await Promise.all([["events today", { since: ago(1) }], ["denials today", { since: ago(1), outcome: "deny" }], ["events this week", { since: ago(7) }]]
          .map(async ([label, q]) => ({ label, value: await countOf(ctx, q), href: ctx.panelHref("LOG-REC-AUD", "O2", q) })))));
      },
      O2: async (el, ctx) => {
        put(el, dataTable(ctx, { caption: "audit events", columns: AUDIT_COLUMNS, paging: "cursor",
          filters: [...AUDIT_FILTERS, { name: "event_type", label: "Event type" }, { name: "incident_id", label: "Incident id" }, { name: "execution_id", label: "Execution id" },
            { name: "workflow_id", label: "Workflow id" }, { name: "agent_id", label: "Agent id" }, { name: "actor", label: "Actor" }, { name: "until", label: "Until (ISO time)" }],
          load: auditLoader(ctx), emptyText: "No audit event matches." }));
      },
      O5: async (el, ctx) => {
        const from = h("input", { id: "ev-from", type: "date", value: ago(30).slice(0, 10) });
        const to = h("input", { id: "ev-to", type: "date", value: ago(-1).slice(0, 10) });
        const get = (path, name, format) => h("button", { type: "button", onclick: async () => {
          try {
            await ctx.download(path, `${name}-${from.value}-${to.value}.${format}`, { from: `${from.value}T00:00:00Z`, to: `${to.value}T00:00:00Z`, format });
            ctx.toast(`Downloaded ${name} (${format})`);
          } catch (e) { ctx.toast(e.message, "error"); }
        } }, `${name === "soc2" ? "SOC2 evidence" : "Executive debrief"} (${format.toUpperCase()})`);
        put(el, h("p", {}, "Signed evidence of a period, from the event store (each file carries its signature)."),
          h("div", { class: "filters" }, h("label", { for: "ev-from" }, "From", from), h("label", { for: "ev-to" }, "To (excluded)", to)),
          actions(get("/v1/evidence/soc2", "soc2", "pdf"), get("/v1/evidence/soc2", "soc2", "json"), get("/v1/evidence/soc2", "soc2", "csv"),
            get("/v1/debriefs", "debrief", "md"), get("/v1/debriefs", "debrief", "pdf")),
          h("p", {}, h("a", { href: ctx.viewHref("evidence") }, "Attestations and every evidence export")));
      },
    },
  },
];

// -- analytics ---------------------------------------------------------------------------

const COST_COLUMNS = (groupBy) => [
  { key: "key", label: groupBy, render: (r) => (groupBy === "run" ? link("run", r.key) : groupBy === "agent" ? link("agent", r.key) : groupBy === "workflow" ? link("workflow", r.key) : fmt.text(r.key)) },
  { key: "total_cost_usd", label: "Cost", render: (r) => fmt.usd(r.total_cost_usd) },
  { key: "steps", label: "Steps" }, { key: "priced_steps", label: "Priced" }, { key: "unpriced_steps", label: "Unpriced" },
  { key: "input_tokens", label: "Input tokens", render: (r) => fmt.num(r.input_tokens) },
  { key: "output_tokens", label: "Output tokens", render: (r) => fmt.num(r.output_tokens) },
];

function costChart(title, res, emptyText, type = "bar") {
  const rows = res.rows.filter((r) => r.total_cost_usd !== null);
  const labels = rows.map((r) => String(r.key ?? "—"));
  const data = rows.map((r) => Number(r.total_cost_usd));
  return chart({ title, type, labels, series: [{ label: "cost (USD)", data }], unit: "$",
    summary: rows.map((r, i) => `${labels[i]}: ${fmt.usd(r.total_cost_usd)}`).join("; "), emptyText });
}

export const ANALYTICS = [
  {
    id: "ANL-INS-COST", domain: "Analytics", topic: "Cost Intelligence", defaultLevel: "O1",
    levels: {
      O1: async (el, ctx) => {
        const [model, agent, day] = await Promise.all(["model", "agent", "day"].map((g) => ctx.api("/v1/costs", { query: { group_by: g } })));
        put(el, cards([
          { label: "total spend", value: fmt.usd(model.totals.total_cost_usd) },
          { label: "priced steps", value: model.totals.priced_steps }, { label: "unpriced steps", value: model.totals.unpriced_steps },
          { label: "tokens", value: fmt.num(model.totals.input_tokens + model.totals.output_tokens) },
        ]), h("div", { class: "charts" },
          costChart("Cost by model", model, "No priced step yet: no cost by model.", "doughnut"),
          costChart("Cost by agent", agent, "No priced step yet: no cost by agent."),
          costChart("Cost by day", day, "No priced step yet: no cost by day."),
          await budgetBurn(ctx)));
      },
      O2: async (el, ctx) => {
        const groupBy = ctx.query.group_by || "run";
        put(el, dataTable(ctx, { caption: `cost by ${groupBy}`, columns: COST_COLUMNS(groupBy), paging: "client",
          filters: [{ name: "group_by", label: "Group by", options: ["run", "agent", "model", "workflow", "day"], initial: "run" }, { name: "execution_id", label: "Execution id" }],
          load: async ({ filters }) => {
            if ((filters.group_by || "run") !== groupBy) { ctx.navigate(ctx.panelHref("ANL-INS-COST", "O2", filters)); return { rows: [] }; }
            return { rows: (await ctx.api("/v1/costs", { query: filters })).rows };
          },
          emptyText: "No cost recorded." }));
      },
      O3: async (el, ctx) => {
        const id = ctx.query.run_id;
        if (!id) { put(el, empty("Pick a run to see its cost: "), h("a", { href: ctx.panelHref("ANL-INS-COST", "O2", { group_by: "run" }) }, "costs by run")); return; }
        const res = await ctx.api("/v1/costs", { query: { group_by: "step", run_id: id } });
        put(el, h("h2", { "data-entity": "run", "data-id": id }, "Cost of run ", link("run", id)),
          cards([{ label: "cost", value: fmt.usd(res.totals.total_cost_usd) }, { label: "steps", value: res.totals.steps }, { label: "unpriced steps", value: res.totals.unpriced_steps },
            { label: "tokens in / out", value: `${fmt.num(res.totals.input_tokens)} / ${fmt.num(res.totals.output_tokens)}` }]),
          actions(h("a", { href: href.run(id) }, "Run"), h("a", { href: href.trace(id) }, "Trace")),
          dataTable(ctx, { caption: `cost by step of run ${id}`, columns: COST_COLUMNS("step"), paging: "client", load: async () => ({ rows: res.rows }), emptyText: "No step of this run has a cost yet." }));
      },
    },
  },
  {
    id: "ANL-USG-POL", domain: "Analytics", topic: "Policies Usage", defaultLevel: "O1",
    levels: {
      O1: async (el, ctx) => {
        const res = await optional(ctx, "/v1/analytics/denials_by_policy", { query: { days: 30 } });
        if (!res) { put(el, missing("Denials by policy", "GET /v1/analytics/denials_by_policy"), h("p", {}, h("a", { href: ctx.panelHref("POL-LIM-VIO", "O1") }, "Denials in the audit log"))); return; }
        const rows = records(res);
        put(el, chart({ title: "Denials by policy (30 days)", labels: rows.map((r) => r.policy_id), series: [{ label: "denials", data: rows.map((r) => Number(r.denials)) }],
          summary: rows.map((r) => `${r.policy_id}: ${r.denials}`).join("; "), emptyText: "No policy denied anything in 30 days." }));
      },
      O2: async (el, ctx) => {
        const res = await optional(ctx, "/v1/analytics/denials_by_policy", { query: { days: 30 } });
        const policies = await ctx.api("/v1/policies");
        const denials = Object.fromEntries(records(res).map((r) => [r.policy_id, r]));
        put(el, res ? null : missing("Denial counts", "GET /v1/analytics/denials_by_policy"),
          dataTable(ctx, { caption: "policy usage", paging: "client",
            columns: [
              { key: "policy_id", label: "Policy", render: (p) => link("policy", p.policy_id) }, { key: "title", label: "Title" },
              { key: "denials", label: "Denials (30 days)", value: (p) => denials[p.policy_id]?.denials ?? null, render: (p) => fmt.text(denials[p.policy_id]?.denials ?? (res ? 0 : null)) },
              { key: "last_at", label: "Last denial", value: (p) => denials[p.policy_id]?.last_at, render: (p) => fmt.time(denials[p.policy_id]?.last_at) },
              { key: "incident_count", label: "Incidents", render: (p) => h("a", { href: href.incidentsOfPolicy(p.policy_id) }, String(p.incident_count)) },
            ],
            load: async () => ({ rows: policies.policies }), emptyText: "No policy is in force." }));
      },
    },
  },
  {
    id: "ANL-USG-PROD", domain: "Analytics", topic: "Productivity", defaultLevel: "O1",
    levels: {
      O1: async (el, ctx) => {
        const res = await optional(ctx, "/v1/analytics/productivity", { query: { days: 30 } });
        if (!res) { put(el, missing("Productivity by agent", "GET /v1/analytics/productivity")); return; }
        const rows = records(res);
        put(el, cards([{ label: "agents", value: rows.length }, { label: "runs", value: rows.reduce((a, r) => a + Number(r.runs), 0) },
          { label: "completed", value: rows.reduce((a, r) => a + Number(r.completed), 0) }, { label: "stopped", value: rows.reduce((a, r) => a + Number(r.stopped), 0) }]),
        chart({ title: "Runs by agent and outcome (30 days)", labels: rows.map((r) => r.agent_id), stacked: true,
          series: ["completed", "stopped", "failed"].map((k) => ({ label: k, data: rows.map((r) => Number(r[k])) })),
          summary: rows.map((r) => `${r.agent_id}: ${r.completed} completed, ${r.stopped} stopped, ${r.failed} failed`).join("; "), emptyText: "No run in 30 days." }));
      },
      O2: async (el, ctx) => {
        const res = await optional(ctx, "/v1/analytics/productivity", { query: { days: 30 } });
        if (!res) { put(el, missing("Productivity by agent", "GET /v1/analytics/productivity")); return; }
        put(el, dataTable(ctx, { caption: "productivity by agent (30 days)", paging: "client",
          columns: [
            { key: "agent_id", label: "Agent", render: (r) => link("agent", r.agent_id) }, { key: "runs", label: "Runs" },
            { key: "completed", label: "Completed" }, { key: "stopped", label: "Stopped" }, { key: "failed", label: "Failed" },
            { key: "mean_duration_s", label: "Mean duration (s)", render: (r) => (r.mean_duration_s === null ? "—" : Number(r.mean_duration_s).toFixed(1)) },
            { key: "tokens", label: "Tokens", render: (r) => fmt.num(r.tokens) }, { key: "cost_usd", label: "Cost", render: (r) => fmt.usd(r.cost_usd) },
          ],
          load: async () => ({ rows: records(res) }), emptyText: "No run in 30 days." }));
      },
    },
  },
];

export { section };
