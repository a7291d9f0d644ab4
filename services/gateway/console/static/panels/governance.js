// Incidents (Active, Resolved, Historical) and Policies (Active, Lessons, Policy Library,
// Controls, Violations).
import { h, put, dataTable, cards, details, actions, section, timeline, link, href, fmt, optional, missing, records, chart, pivot, needId, AUDIT_COLUMNS, AUDIT_FILTERS, auditLoader, empty } from "./lib.js";
import { runEvidence } from "./runs.js";

// -- incidents ---------------------------------------------------------------------------

const INCIDENT_COLUMNS = [
  { key: "incident_id", label: "Incident", render: (i) => link("incident", i.incident_id) },
  { key: "severity", label: "Severity", render: (i) => fmt.status(i.severity) },
  { key: "status", label: "Status", render: (i) => fmt.status(i.status) },
  { key: "title", label: "Title" },
  { key: "run_id", label: "Source run", render: (i) => link("run", i.run_id) },
  { key: "policy_id", label: "Policy", render: (i) => link("policy", i.policy_id) },
  { key: "step_index", label: "Step" },
  { key: "opened_at", label: "Opened", render: (i) => fmt.time(i.opened_at) },
  { key: "resolved_at", label: "Resolved", render: (i) => fmt.time(i.resolved_at) },
];

const INCIDENT_FILTERS = [{ name: "run_id", label: "Run id" }, { name: "policy_id", label: "Policy id" }];

/** Incidents of the given statuses (GET /v1/incidents once per status, merged, newest first). */
async function incidentsOf(ctx, statuses, filters = {}) {
  const pages = await Promise.all(statuses.map((s) => ctx.api("/v1/incidents", { query: { ...filters, status: s || undefined, limit: 500 } })));
  return pages.flatMap((p) => p.incidents).sort((a, b) => String(b.opened_at).localeCompare(String(a.opened_at)));
}

function incidentTable(ctx, caption, statuses) {
  if (statuses.length === 1) {
    return dataTable(ctx, {
      caption, columns: INCIDENT_COLUMNS, paging: "offset", filters: INCIDENT_FILTERS, rowKey: (i) => i.incident_id,
      load: async ({ filters, offset, limit }) => ({ rows: (await ctx.api("/v1/incidents", { query: { ...filters, status: statuses[0] || undefined, offset, limit } })).incidents }),
    });
  }
  return dataTable(ctx, {
    caption, columns: INCIDENT_COLUMNS, paging: "client", rowKey: (i) => i.incident_id,
    filters: [{ name: "status", label: "Status", options: ["", ...statuses] }, ...INCIDENT_FILTERS],
    load: async ({ filters }) => ({ rows: await incidentsOf(ctx, filters.status ? [filters.status] : statuses, { run_id: filters.run_id, policy_id: filters.policy_id }) }),
  });
}

function incidentCards(list) {
  const sev = (s) => list.filter((i) => i.severity === s).length;
  return cards([
    { label: "incidents", value: list.length },
    { label: "critical", value: sev("critical") }, { label: "high", value: sev("high") },
    { label: "medium", value: sev("medium") }, { label: "low", value: sev("low") },
  ]);
}

/** O3 of an incident: the links of seed 000 §5.2, then the incident view (acknowledge, resolve). */
async function incidentDetail(el, ctx, pick) {
  const id = needId(el, ctx, "incident_id", "incident", pick);
  if (!id) return;
  const inc = await ctx.api(`/v1/incidents/${encodeURIComponent(id)}`);
  put(el, 
    h("h2", { "data-entity": "incident", "data-id": inc.incident_id }, `Incident ${inc.incident_id}`),
    details([["Title", inc.title], ["Status", fmt.status(inc.status)], ["Severity", fmt.status(inc.severity)],
      ["Source run", link("run", inc.run_id)], ["Policy", link("policy", inc.policy_id)], ["Step", inc.step_index],
      ["Opened", fmt.time(inc.opened_at)], ["Resolution", inc.resolution]]),
    actions(
      h("a", { href: href.run(inc.run_id) }, "Source run"),
      h("a", { href: href.policy(inc.policy_id) }, "Policy"),
      h("a", { href: href.trace(inc.run_id) }, "Trace"),
      h("a", { href: href.cost(inc.run_id) }, "Cost of the run"),
      h("a", { href: ctx.panelHref("INC-EV-ACT", "O4", { incident_id: id }) }, "Timeline"),
      h("a", { href: ctx.viewHref("incident", id) }, "Open in the incident view")));
  const embedded = h("div", { class: "embedded-view" });
  put(el, section("Acknowledge or resolve", embedded));
  await ctx.view("incident", embedded, id);
}

async function incidentTimeline(el, ctx, pick) {
  const id = needId(el, ctx, "incident_id", "incident", pick);
  if (!id) return;
  const inc = await ctx.api(`/v1/incidents/${encodeURIComponent(id)}`);
  const [own, ofRun] = await Promise.all([
    ctx.api("/v1/audit/search", { query: { incident_id: id, limit: 200 } }),
    ctx.api("/v1/audit/search", { query: { run_id: inc.run_id, limit: 200 } }),
  ]);
  const seen = new Set();
  const items = [...own.events, ...ofRun.events]
    .filter((e) => !seen.has(e.event_id) && seen.add(e.event_id))
    .map((e) => ({ at: e.occurred_at, title: e.event_type, inflection: e.outcome === "deny",
      detail: [e.outcome, e.actor, e.excerpt].filter(Boolean).join(" · ") }))
    .sort((a, b) => String(a.at).localeCompare(String(b.at)));
  put(el, h("h2", { "data-entity": "incident", "data-id": id }, "Timeline of incident ", link("incident", id), " and its run ", link("run", inc.run_id)),
    timeline(items, "No event names this incident yet."));
}

async function incidentEvidence(el, ctx, pick) {
  const id = needId(el, ctx, "incident_id", "incident", pick);
  if (!id) return;
  const inc = await ctx.api(`/v1/incidents/${encodeURIComponent(id)}`);
  const enc = encodeURIComponent(id);
  put(el, h("h2", { "data-entity": "incident", "data-id": id }, "Evidence of incident ", link("incident", id)),
    actions(["md", "html", "pdf", "json"].map((f) => h("button", { type: "button", onclick: async () => {
      try { await ctx.download(`/v1/incidents/${enc}/debrief`, `debrief-${id}.${f}`, { format: f }); ctx.toast(`Downloaded the debrief (${f})`); } catch (e) { ctx.toast(e.message, "error"); }
    } }, `Debrief (${f.toUpperCase()})`))));
  await runEvidence(el, { ...ctx, query: { run_id: inc.run_id } }, href.trace(inc.run_id));
}

const incidentLevels = (panel, statuses, caption) => ({
  O1: async (el, ctx) => { put(el, incidentCards(await incidentsOf(ctx, statuses))); },
  O2: async (el, ctx) => { put(el, incidentTable(ctx, caption, statuses)); },
  O3: (el, ctx) => incidentDetail(el, ctx, ctx.panelHref(panel, "O2")),
  O4: (el, ctx) => incidentTimeline(el, ctx, ctx.panelHref(panel, "O2")),
  O5: (el, ctx) => incidentEvidence(el, ctx, ctx.panelHref(panel, "O2")),
});

export const INCIDENTS = [
  { id: "INC-EV-ACT", domain: "Incidents", topic: "Active", defaultLevel: "O2", levels: incidentLevels("INC-EV-ACT", ["open", "acknowledged"], "active incidents") },
  {
    id: "INC-EV-RES", domain: "Incidents", topic: "Resolved", defaultLevel: "O2",
    levels: {
      ...incidentLevels("INC-EV-RES", ["resolved"], "resolved incidents"),
      O1: async (el, ctx) => {
        const list = await incidentsOf(ctx, ["resolved"]);
        const spans = list.filter((i) => i.opened_at && i.resolved_at).map((i) => (new Date(i.resolved_at) - new Date(i.opened_at)) / 60000);
        put(el, incidentCards(list), cards([{ label: "mean time to resolve (minutes)", value: spans.length ? (spans.reduce((a, b) => a + b, 0) / spans.length).toFixed(1) : "—" }]));
      },
    },
  },
  {
    id: "INC-EV-HIST", domain: "Incidents", topic: "Historical", defaultLevel: "O1",
    levels: {
      ...incidentLevels("INC-EV-HIST", [""], "incidents"),
      O1: async (el, ctx) => {
        const byDay = await optional(ctx, "/v1/analytics/incidents_by_day", { query: { days: 90 } });
        let rows, source;
        if (byDay) { rows = records(byDay); source = "GET /v1/analytics/incidents_by_day"; } else {
          const list = await incidentsOf(ctx, [""]);
          rows = list.map((i) => ({ day: String(i.opened_at || "").slice(0, 10), severity: i.severity, opened: 1 }));
          source = "GET /v1/incidents (analytics not available)";
          put(el, incidentCards(list));
        }
        const { labels, series } = pivot(rows, "day", "severity", "opened");
        put(el, chart({ title: "Incidents opened per day, by severity", labels, series, stacked: true,
          summary: `${labels.length} days; ${series.map((s) => `${s.label}: ${s.data.reduce((a, b) => a + b, 0)}`).join(", ")}`,
          emptyText: "No incident has been opened." }), h("p", { class: "muted" }, `From ${source}.`));
      },
    },
  },
];

// -- policies ----------------------------------------------------------------------------

const POLICY_COLUMNS = [
  { key: "policy_id", label: "Policy", render: (p) => link("policy", p.policy_id) },
  { key: "title", label: "Title" },
  { key: "severity", label: "Severity", render: (p) => fmt.status(p.severity) },
  { key: "incident_count", label: "Incidents", render: (p) => h("a", { href: href.incidentsOfPolicy(p.policy_id) }, String(p.incident_count)) },
  { key: "open_incidents", label: "Open incidents" },
  { key: "runbook_url", label: "Runbook", sort: false, render: (p) => (p.runbook_url ? h("a", { href: p.runbook_url, rel: "noopener" }, "runbook") : "—") },
];

async function policyDetail(el, ctx) {
  const id = needId(el, ctx, "policy_id", "policy", ctx.panelHref("POL-GOV-ACT", "O2"));
  if (!id) return;
  const all = await ctx.api("/v1/policies");
  const p = all.policies.find((x) => x.policy_id === id);
  if (!p) { put(el, empty(`Policy ${id} is not in the active bundle.`)); }
  put(el, h("h2", { "data-entity": "policy", "data-id": id }, `Policy ${id}`));
  if (p) {
    put(el, details([["Title", p.title], ["Severity", fmt.status(p.severity)], ["Description", p.description],
      ["Incidents", p.incident_count], ["Open incidents", p.open_incidents], ["Bundle", all.bundle_digest], ["Activated", fmt.time(all.activated_at)]]));
  }
  put(el, actions(
    h("a", { href: href.incidentsOfPolicy(id) }, "Incidents of this policy"),
    h("a", { href: ctx.panelHref("POL-LIM-VIO", "O2", { policy_id: id }) }, "Denials by this policy"),
    h("a", { href: ctx.panelHref("POL-GOV-ACT", "O4", { policy_id: id }) }, "Timeline"),
    h("a", { href: ctx.viewHref("policy") }, "Policy lifecycle (bundles, simulations, exceptions)")),
  section("Incidents", dataTable(ctx, {
    caption: `incidents of policy ${id}`, columns: INCIDENT_COLUMNS, paging: "offset",
    load: async ({ offset, limit }) => ({ rows: (await ctx.api("/v1/incidents", { query: { policy_id: id, offset, limit } })).incidents }),
  })));
}

async function policyTimeline(el, ctx) {
  const id = needId(el, ctx, "policy_id", "policy", ctx.panelHref("POL-GOV-ACT", "O2"));
  if (!id) return;
  const res = await ctx.api("/v1/audit/search", { query: { policy_id: id, limit: 200 } });
  const items = res.events.map((e) => ({ at: e.occurred_at, title: e.event_type, inflection: e.outcome === "deny",
    detail: [e.outcome, e.actor, e.excerpt].filter(Boolean).join(" · "),
    links: h("span", {}, e.run_id ? ["run ", link("run", e.run_id)] : null, e.incident_id ? [" incident ", link("incident", e.incident_id)] : null) }))
    .sort((a, b) => String(a.at).localeCompare(String(b.at)));
  put(el, h("h2", { "data-entity": "policy", "data-id": id }, "Timeline of policy ", link("policy", id)),
    res.next_cursor ? h("p", { class: "muted" }, "The first 200 events; the audit log has them all: ", h("a", { href: ctx.panelHref("LOG-REC-AUD", "O2", { policy_id: id }) }, "audit events of this policy"), ".") : null,
    timeline(items, "No event names this policy yet."));
}

const BUDGET_COLUMNS = [
  { key: "budget_id", label: "Budget" }, { key: "scope", label: "Scope" },
  { key: "subject", label: "Subject", render: (b) => (b.scope === "agent" ? link("agent", b.subject) : b.scope === "execution" ? link("execution", b.subject) : fmt.text(b.subject)) },
  { key: "window", label: "Window" },
  { key: "window_key", label: "Period or execution", render: (b) => (b.window === "execution" && b.window_key ? link("execution", b.window_key) : fmt.text(b.window_key)) },
  { key: "cap_usd", label: "Cap", render: (b) => fmt.usd(b.cap_usd) },
  { key: "spent_usd", label: "Spent", render: (b) => fmt.usd(b.spent_usd) },
  { key: "reserved_usd", label: "Reserved", render: (b) => fmt.usd(b.reserved_usd) },
  { key: "remaining_usd", label: "Remaining", render: (b) => fmt.usd(b.remaining_usd) },
  { key: "alerted_pct", label: "Alerted at %" },
];

/**
 * The tenant's budgets (GET /v1/budgets); a budget per execution is listed once per recent
 * execution too (GET /v1/budgets?execution_id=E for the newest ten), with what that one spent.
 */
async function budgetsWithExecutions(ctx, query = {}) {
  const res = await ctx.api("/v1/budgets", { query });
  if (!res.budgets.some((b) => b.window === "execution")) return res;
  const recent = await optional(ctx, "/v1/executions", { query: { limit: 10 } });
  const per = await Promise.all((recent?.executions || []).map((e) => ctx.api("/v1/budgets", { query: { ...query, execution_id: e.execution_id } })));
  const seen = new Set();
  const runs = per.flatMap((p) => p.budgets).filter((b) => b.window_key && !seen.has(`${b.budget_id}/${b.window_key}`) && seen.add(`${b.budget_id}/${b.window_key}`));
  return { ...res, budgets: [...res.budgets, ...runs] };
}

/** The budget burn chart: spent and reserved against each cap. */
export async function budgetBurn(ctx) {
  const res = await budgetsWithExecutions(ctx);
  const list = res.budgets.filter((b) => b.spent_usd !== null && b.spent_usd !== undefined);
  const labels = list.map((b) => `${b.scope}:${b.subject} (${b.window_key ? `${b.window} ${String(b.window_key).slice(0, 8)}` : b.window})`);
  const pct = (v, b) => (Number(b.cap_usd) ? Math.round((Number(v || 0) / Number(b.cap_usd)) * 1000) / 10 : 0);
  return chart({ title: "Budget burn (% of cap)", labels, type: "bar", stacked: true, unit: "",
    series: [{ label: "spent %", data: list.map((b) => pct(b.spent_usd, b)) }, { label: "reserved %", data: list.map((b) => pct(b.reserved_usd, b)) }],
    summary: list.map((b) => `${b.scope} ${b.subject}: ${pct(b.spent_usd, b)}% spent of ${fmt.usd(b.cap_usd)}`).join("; "),
    emptyText: res.budgets.length ? `No spend against the ${res.budgets.length} budget(s) yet.` : "No budget is set (PUT /v1/budgets sets one); nothing burns." });
}

export const POLICIES = [
  {
    id: "POL-GOV-ACT", domain: "Policies", topic: "Active", defaultLevel: "O2",
    levels: {
      O1: async (el, ctx) => {
        const res = await ctx.api("/v1/policies");
        put(el, cards([
          { label: "policies in force", value: res.policies.length },
          { label: "with open incidents", value: res.policies.filter((p) => p.open_incidents > 0).length, href: ctx.panelHref("INC-EV-ACT", "O2") },
          { label: "incidents caught", value: res.policies.reduce((a, p) => a + p.incident_count, 0) },
          { label: "active bundle", value: res.bundle_digest ? res.bundle_digest.slice(0, 12) : "none", href: ctx.panelHref("POL-GOV-LIB", "O2") },
        ]));
      },
      O2: async (el, ctx) => {
        put(el, dataTable(ctx, { caption: "policies in force", columns: POLICY_COLUMNS, paging: "client", rowKey: (p) => p.policy_id,
          load: async () => ({ rows: (await ctx.api("/v1/policies")).policies }), emptyText: "No policy is in force: activate a bundle (Policy Library)." }));
      },
      O3: policyDetail,
      O4: policyTimeline,
    },
  },
  {
    id: "POL-GOV-LES", domain: "Policies", topic: "Lessons", defaultLevel: "O2",
    levels: {
      O1: async (el, ctx) => {
        const list = await incidentsOf(ctx, ["resolved"]);
        const withText = list.filter((i) => i.resolution);
        put(el, cards([{ label: "resolved incidents", value: list.length }, { label: "with a written resolution", value: withText.length }]),
          h("p", { class: "muted" }, "Lessons are what people wrote when they resolved an incident."));
      },
      O2: async (el, ctx) => {
        put(el, dataTable(ctx, {
          caption: "lessons from resolved incidents", paging: "client", filters: INCIDENT_FILTERS,
          columns: [
            { key: "policy_id", label: "Policy", render: (i) => link("policy", i.policy_id) },
            { key: "resolution", label: "Lesson (resolution)" },
            { key: "incident_id", label: "Incident", render: (i) => link("incident", i.incident_id) },
            { key: "run_id", label: "Run", render: (i) => link("run", i.run_id) },
            { key: "resolved_by", label: "Resolved by" },
            { key: "resolved_at", label: "Resolved", render: (i) => fmt.time(i.resolved_at) },
          ],
          load: async ({ filters }) => ({ rows: await incidentsOf(ctx, ["resolved"], filters) }),
          emptyText: "No incident has been resolved yet, so there is no lesson.",
        }));
      },
    },
  },
  {
    id: "POL-GOV-LIB", domain: "Policies", topic: "Policy Library", defaultLevel: "O2",
    levels: {
      O1: async (el, ctx) => {
        const res = await ctx.api("/v1/policy-bundles");
        put(el, cards([{ label: `bundles (${res.environment})`, value: res.bundles.length }, { label: "active digest", value: res.active_digest ? res.active_digest.slice(0, 12) : "none" }]),
          h("p", {}, h("a", { href: ctx.viewHref("policy") }, "Manage bundles, reloads, simulations and exceptions")));
      },
      O2: async (el, ctx) => {
        put(el, dataTable(ctx, {
          caption: "policy bundles", paging: "client", filters: [{ name: "environment", label: "Environment" }],
          columns: [
            { key: "bundle_digest", label: "Digest", render: (b) => h("code", {}, b.bundle_digest.slice(0, 16)) },
            { key: "revision", label: "Revision" }, { key: "signer_key_id", label: "Signed by" },
            { key: "active", label: "Active", render: (b) => (b.active ? h("span", { class: "ok" }, "active") : "—") },
          ],
          load: async ({ filters }) => ({ rows: (await ctx.api("/v1/policy-bundles", { query: filters })).bundles }),
          emptyText: "No bundle has been uploaded (mctl policy push).",
        }));
      },
    },
  },
  {
    id: "POL-LIM-CTR", domain: "Policies", topic: "Controls", defaultLevel: "O2",
    levels: {
      O1: async (el, ctx) => {
        const res = await ctx.api("/v1/budgets");
        put(el, cards([{ label: "budgets", value: res.budgets.length }, { label: "alerting", value: res.budgets.filter((b) => b.alerted_pct > 0).length }, { label: "budget time zone", value: res.timezone }]),
          await budgetBurn(ctx));
      },
      O2: async (el, ctx) => {
        put(el, dataTable(ctx, { caption: "budgets", columns: BUDGET_COLUMNS, paging: "client",
          filters: [{ name: "scope", label: "Scope", options: ["", "tenant", "agent", "workflow", "execution"] }],
          load: async ({ filters }) => ({ rows: (await budgetsWithExecutions(ctx, filters)).budgets }),
          emptyText: "No budget is set." }));
      },
      O3: async (el, ctx) => {
        const [settings, exceptions] = await Promise.all([ctx.api("/v1/policy-settings"), optional(ctx, "/v1/policy-exceptions")]);
        put(el, section(`Policy settings (version ${settings.version})`,
          Object.keys(settings.settings).length ? details(Object.entries(settings.settings).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : String(v)])) : empty("No setting is set; the defaults apply.")));
        put(el, section("Policy exceptions", exceptions ? dataTable(ctx, {
          caption: "policy exceptions", paging: "client",
          columns: [
            { key: "exception_id", label: "Exception" }, { key: "policy_id", label: "Policy", render: (x) => link("policy", x.policy_id) },
            { key: "agent_id", label: "Agent", render: (x) => link("agent", x.agent_id) }, { key: "run_id", label: "Run", render: (x) => link("run", x.run_id) },
            { key: "status", label: "Status", render: (x) => fmt.status(x.status) }, { key: "reason", label: "Reason" },
            { key: "expires_at", label: "Expires", render: (x) => fmt.time(x.expires_at) },
          ],
          load: async () => ({ rows: exceptions.exceptions }), emptyText: "No policy exception has been granted.",
        }) : missing("Policy exceptions", "GET /v1/policy-exceptions")),
        actions(h("a", { href: ctx.viewHref("policy") }, "Change settings, exceptions and freezes in the policy view")));
      },
    },
  },
  {
    id: "POL-LIM-VIO", domain: "Policies", topic: "Violations", defaultLevel: "O2",
    levels: {
      O1: async (el, ctx) => {
        const res = await ctx.api("/v1/audit/search", { query: { outcome: "deny", limit: 200 } });
        const by = {};
        for (const e of res.events) for (const p of e.policy_ids || []) by[p] = (by[p] || 0) + 1;
        put(el, cards(Object.entries(by).map(([p, n]) => ({ label: `denials by ${p}`, value: n, href: ctx.panelHref("POL-LIM-VIO", "O2", { policy_id: p }) }))),
          Object.keys(by).length ? h("p", { class: "muted" }, `Over the newest ${res.events.length} denials${res.next_cursor ? " (more in the list)" : ""}.`) : empty("No policy has denied anything."));
      },
      O2: async (el, ctx) => {
        put(el, dataTable(ctx, {
          caption: "violations (denied decisions)", columns: AUDIT_COLUMNS, paging: "cursor",
          filters: AUDIT_FILTERS.filter((f) => f.name !== "outcome"),
          load: auditLoader(ctx, { outcome: "deny" }), emptyText: "No violation matches.",
        }));
      },
    },
  },
];

export { missing, pivot, records, chart };
