// Overview (Highlights, Decisions) and Activity (Live, Completed, Signals).
import { h, put, dataTable, cards, section, link, fmt, optional, missing, records, chart, pivot, AUDIT_COLUMNS, AUDIT_FILTERS, auditLoader, empty } from "./lib.js";
import { runsTable, runCards, runLevels, liveRun, RUN_COLUMNS } from "./runs.js";

/** How many events an audit query finds, up to a page of 200 ("200+" beyond). */
async function auditCount(ctx, query) {
  const res = await ctx.api("/v1/audit/search", { query: { ...query, limit: 200 } });
  return res.next_cursor ? `${res.events.length}+` : res.events.length;
}

const SIGNAL_TYPES = ["", "budget.threshold_crossed", "execution.budget_exceeded", "execution.approval_escalated", "promotion.escalated", "policy.drift_detected", "policy.exception_expired", "policy.canary_rolled_back"];

export const OVERVIEW = [
  {
    id: "OVR-SUM-HIGH", domain: "Overview", topic: "Highlights", defaultLevel: "O1",
    levels: {
      O1: async (el, ctx) => {
        const [incidents, policies, costs, approvals, runs] = await Promise.all([
          ctx.api("/v1/incidents", { query: { status: "open", limit: 500 } }),
          ctx.api("/v1/policies"),
          ctx.api("/v1/costs", { query: { group_by: "day" } }),
          optional(ctx, "/v1/approvals"),
          ctx.api("/v1/runs", { query: { limit: 500 } }),
        ]);
        const by = (s) => runs.runs.filter((r) => r.status === s).length;
        put(el, cards([
          { label: "runs running", value: by("running"), href: ctx.panelHref("ACT-LLM-LIVE", "O2") },
          { label: "runs completed", value: by("completed"), href: ctx.panelHref("ACT-LLM-COMP", "O2", { status: "completed" }) },
          { label: "runs stopped by policy", value: by("stopped_by_policy"), href: ctx.panelHref("ACT-LLM-COMP", "O2", { status: "stopped_by_policy" }) },
          { label: "open incidents", value: incidents.incidents.length, href: ctx.panelHref("INC-EV-ACT", "O2") },
          { label: "policies in force", value: policies.policies.length, href: ctx.panelHref("POL-GOV-ACT", "O2") },
          { label: "pending approvals", value: approvals ? approvals.approvals.length : "—", href: ctx.viewHref("approvals") },
          { label: "spend (all priced steps)", value: fmt.usd(costs.totals.total_cost_usd), href: ctx.panelHref("ANL-INS-COST", "O1") },
        ]),
        h("p", { class: "muted" }, `Counts over the newest ${runs.runs.length} runs.`));
        const stopped = runs.runs.filter((r) => r.status === "stopped_by_policy").slice(0, 5);
        put(el, section("Runs stopped by policy",
          stopped.length ? h("ul", {}, stopped.map((r) => h("li", {}, link("run", r.run_id), ` at step ${r.stopped_at_step ?? "?"} by `, link("policy", r.violation_policy_id))))
            : empty("No run has been stopped by a policy.")));
        const open = incidents.incidents.slice(0, 5);
        put(el, section("Open incidents",
          open.length ? h("ul", {}, open.map((i) => h("li", {}, link("incident", i.incident_id), ` ${i.severity} · ${i.title} · run `, link("run", i.run_id))))
            : empty("No open incident.")));
      },
      O2: async (el, ctx) => {
        put(el, h("p", { class: "muted" }, "The tenant's newest events of every kind."),
          dataTable(ctx, { caption: "recent events", columns: AUDIT_COLUMNS, filters: AUDIT_FILTERS, paging: "cursor", load: auditLoader(ctx) }));
      },
    },
  },
  {
    id: "OVR-SUM-DEC", domain: "Overview", topic: "Decisions", defaultLevel: "O1",
    levels: {
      O1: async (el, ctx) => {
        const [deny, warn, byDay] = await Promise.all([
          auditCount(ctx, { outcome: "deny" }),
          auditCount(ctx, { outcome: "warn" }),
          optional(ctx, "/v1/analytics/decisions_by_day", { query: { days: 30 } }),
        ]);
        put(el, cards([
          { label: "denied decisions", value: deny, href: ctx.panelHref("OVR-SUM-DEC", "O2", { outcome: "deny" }) },
          { label: "warnings", value: warn, href: ctx.panelHref("OVR-SUM-DEC", "O2", { outcome: "warn" }) },
        ]));
        if (!byDay) { put(el, missing("Decisions by day", "GET /v1/analytics/decisions_by_day")); return; }
        const rows = records(byDay);
        const { labels, series } = pivot(rows, "day", "outcome", "decisions");
        put(el, chart({ title: "Decisions by day and outcome", labels, series, stacked: true,
          summary: series.map((s) => `${s.label}: ${s.data.reduce((a, b) => a + b, 0)}`).join("; "),
          emptyText: "No decision in the last 30 days." }));
      },
      O2: async (el, ctx) => {
        put(el, dataTable(ctx, {
          caption: "policy decisions", columns: AUDIT_COLUMNS, paging: "cursor",
          filters: AUDIT_FILTERS.map((f) => (f.name === "outcome" ? { ...f, initial: "deny" } : f)),
          load: auditLoader(ctx, { event_type: "admission.decided" }),
          emptyText: "No decision matches.",
        }));
      },
    },
  },
];

export const ACTIVITY = [
  {
    id: "ACT-LLM-LIVE", domain: "Activity", topic: "Live", defaultLevel: "O2",
    levels: {
      O1: async (el, ctx) => { put(el, await runCards(ctx, ["running"])); },
      O2: async (el, ctx) => {
        const state = h("p", { class: "muted", role: "status" }, "Connecting to live updates…");
        let rows = null;
        const table = dataTable(ctx, {
          caption: "running runs", columns: RUN_COLUMNS, paging: "client", rowKey: (r) => r.run_id,
          load: async () => ({ rows: rows || (await ctx.api("/v1/runs", { query: { status: "running", limit: 500 } })).runs }),
          emptyText: "No run is running.",
        });
        put(el, state, table);
        let timer = null;
        const refresh = () => { clearTimeout(timer); timer = setTimeout(() => { rows = null; table.reload(); }, 300); };
        let failures = 0;
        const stop = ctx.sse("/v1/live", (type, data) => {
          if (type === "snapshot") { rows = data.runs || []; table.reload(); return; }
          if (String(type).startsWith("run.")) refresh();
        }, { onState: (s, error) => {
          if (s === "open") { failures = 0; state.textContent = "Live: updated as runs start, step and end (GET /v1/live)."; }
          // A refusal for load (a tenant at its limit of open streams) says so and keeps
          // trying; the panel gives up only on a stream that keeps failing for no stated reason.
          if (s === "retrying" && error?.retryIn) {
            state.textContent = `Live updates ${ctx.retryMessage(error)}.`;
            return;
          }
          if (s === "failed" || (s === "retrying" && ++failures >= 2)) {
            stop();
            state.replaceChildren("Live updates are not available (GET /v1/live did not answer); ",
              h("button", { type: "button", onclick: () => { rows = null; table.reload(); } }, "Refresh"));
          }
        } });
        ctx.onLeave(() => { stop(); clearTimeout(timer); });
      },
      ...runLevels("ACT-LLM-LIVE"),
      O3: (el, ctx) => liveRun(el, ctx),
    },
  },
  {
    id: "ACT-LLM-COMP", domain: "Activity", topic: "Completed", defaultLevel: "O2",
    levels: {
      O1: async (el, ctx) => { put(el, await runCards(ctx, ["completed", "failed", "stopped_by_policy"])); },
      O2: async (el, ctx) => { put(el, runsTable(ctx, { caption: "finished runs", statuses: ["", "completed", "failed", "stopped_by_policy"] })); },
      ...runLevels("ACT-LLM-COMP"),
    },
  },
  {
    id: "ACT-LLM-SIG", domain: "Activity", topic: "Signals", defaultLevel: "O2",
    levels: {
      O1: async (el, ctx) => {
        const figures = await Promise.all([
          ["warnings", { outcome: "warn" }],
          ["budget thresholds crossed", { event_type: "budget.threshold_crossed" }],
          ["approvals escalated", { event_type: "execution.approval_escalated" }],
          ["policy drift detected", { event_type: "policy.drift_detected" }],
        ].map(async ([label, q]) => ({ label, value: await auditCount(ctx, q), href: ctx.panelHref("ACT-LLM-SIG", "O2", q) })));
        put(el, cards(figures));
      },
      O2: async (el, ctx) => {
        put(el, h("p", { class: "muted" }, "Signals: warnings and events that ask for attention before they become incidents."),
          dataTable(ctx, {
            caption: "signals", columns: AUDIT_COLUMNS, paging: "cursor",
            filters: [
              { name: "event_type", label: "Kind", options: SIGNAL_TYPES },
              { name: "outcome", label: "Outcome", options: ["", "warn", "deny"], initial: ctx.query.event_type ? "" : "warn" },
              { name: "run_id", label: "Run id" },
            ],
            load: auditLoader(ctx),
            emptyText: "No signal matches.",
          }));
      },
    },
  },
];
