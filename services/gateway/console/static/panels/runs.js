// A run at each level: its table, its detail with links, its timeline and its trace (evidence).
// The Activity and Logs panels share these.
import { h, put, dataTable, details, actions, section, timeline, link, href, fmt, cards, needId, failure, empty } from "./lib.js";

export const RUN_COLUMNS = [
  { key: "run_id", label: "Run", render: (r) => link("run", r.run_id, r.status) },
  { key: "agent_id", label: "Agent", render: (r) => link("agent", r.agent_id) },
  { key: "status", label: "Status", render: (r) => fmt.status(r.status) },
  { key: "started_at", label: "Started", render: (r) => fmt.time(r.started_at) },
  { key: "ended_at", label: "Ended", render: (r) => fmt.time(r.ended_at) },
  { key: "stopped_at_step", label: "Stopped at step" },
  { key: "violation_policy_id", label: "Violated policy", render: (r) => link("policy", r.violation_policy_id) },
  { key: "tokens_used", label: "Tokens", render: (r) => fmt.num(r.tokens_used) },
  { key: "cost_usd", label: "Cost", render: (r) => (r.cost_usd === null || r.cost_usd === undefined ? "—" : h("a", { href: href.cost(r.run_id) }, fmt.usd(r.cost_usd))) },
];

/** A table of runs over GET /v1/runs (its status and agent filters, limit/offset pages). */
export function runsTable(ctx, { caption = "runs", statuses = ["", "running", "completed", "failed", "stopped_by_policy"], initial, linkTo } = {}) {
  const columns = linkTo
    ? [{ ...RUN_COLUMNS[0], render: (r) => h("a", { href: linkTo(r), "data-link": "run", "data-id": r.run_id }, r.run_id) }, ...RUN_COLUMNS.slice(1)]
    : RUN_COLUMNS;
  return dataTable(ctx, {
    caption, columns, paging: "offset", rowKey: (r) => r.run_id,
    filters: [{ name: "status", label: "Status", options: statuses, initial }, { name: "agent_id", label: "Agent id" }],
    load: async ({ filters, offset, limit }) => ({ rows: (await ctx.api("/v1/runs", { query: { ...filters, offset, limit } })).runs }),
  });
}

/** Counts of runs by status (each figure from the API: a page of up to 500 per status). */
export async function runCards(ctx, statuses) {
  const counts = await Promise.all(statuses.map(async (s) => {
    const res = await ctx.api("/v1/runs", { query: { status: s, limit: 500 } });
    const n = res.runs.length;
    return { label: `${s.replaceAll("_", " ")} runs${n === 500 ? " (newest 500)" : ""}`, value: n, href: ctx.panelHref(s === "running" ? "ACT-LLM-LIVE" : "ACT-LLM-COMP", "O2", { status: s }) };
  }));
  return cards(counts);
}

/** The links every run detail offers (seed 000 §5.2: incidents, logs, cost; plus replay, agent). */
export function runLinks(run) {
  return actions(
    h("a", { href: href.trace(run.run_id) }, "Trace and logs"),
    h("a", { href: href.cost(run.run_id) }, "Cost"),
    h("a", { href: href.incidentsOfRun(run.run_id) }, "Incidents of this run"),
    h("a", { href: href.replay(run.run_id) }, "Replay"),
    h("a", { href: href.agent(run.agent_id) }, "Agent"),
    run.violation_policy_id ? h("a", { href: href.policy(run.violation_policy_id) }, "Violated policy") : null,
    h("a", { href: ctx_auditHref(run.run_id) }, "Audit events"));
}
const ctx_auditHref = (runId) => `#/panel/LOG-REC-AUD/O2?run_id=${encodeURIComponent(runId)}`;

/** O3 of a run: status, where it stopped, the policy, tokens, cost, its incidents, links. */
export async function runDetail(el, ctx, pick) {
  const id = needId(el, ctx, "run_id", "run", pick);
  if (!id) return;
  const run = await ctx.api(`/v1/runs/${encodeURIComponent(id)}`);
  put(el, 
    h("h2", { "data-entity": "run", "data-id": run.run_id }, `Run ${run.run_id}`),
    run.status === "stopped_by_policy"
      ? h("p", { class: "banner deny", role: "note" }, `Stopped by policy ${run.violation_policy_id || ""} at step ${run.stopped_at_step ?? "?"}${run.stop_reason ? `: ${run.stop_reason}` : ""}`)
      : null,
    details([
      ["Status", fmt.status(run.status)],
      ["Agent", link("agent", run.agent_id)],
      ["Started", fmt.time(run.started_at)],
      ["Ended", fmt.time(run.ended_at)],
      ["Stopped at step", run.stopped_at_step],
      ["Violated policy", link("policy", run.violation_policy_id)],
      ["Stop reason", run.stop_reason],
      ["Last step", run.last_step_index],
      ["Tokens", fmt.num(run.tokens_used)],
      ["Cost", run.cost_usd === null ? "—" : h("a", { href: href.cost(run.run_id) }, fmt.usd(run.cost_usd))],
      ["Unpriced steps", run.unpriced_steps],
      ["Incidents", (run.incident_ids || []).length ? h("span", {}, (run.incident_ids || []).flatMap((i, n) => [n ? ", " : "", link("incident", i)])) : "none"],
    ]),
    runLinks(run));
  return run;
}

/** O4 of a run: its steps from the trace and its audit events, in order. */
export async function runTimeline(el, ctx, pick) {
  const id = needId(el, ctx, "run_id", "run", pick);
  if (!id) return;
  const [trace, audit] = await Promise.all([
    ctx.api(`/v1/runs/${encodeURIComponent(id)}/trace`),
    ctx.api("/v1/audit/search", { query: { run_id: id, limit: 200 } }).catch(() => ({ events: [] })),
  ]);
  const items = [
    ...trace.steps.map((s) => ({
      at: s.occurred_at, inflection: s.inflection,
      title: `step ${s.step_index} · ${s.kind || "step"} · ${s.status}`,
      detail: [s.model, s.tool, s.decision ? `decision ${s.decision.outcome || ""} ${(s.decision.policy_ids || []).join(",")}` : null, s.error].filter(Boolean).join(" · "),
    })),
    ...audit.events.filter((e) => e.event_type !== "run.step_recorded").map((e) => ({
      at: e.occurred_at, title: e.event_type,
      detail: [e.outcome, e.actor, e.excerpt].filter(Boolean).join(" · "),
      links: e.incident_id ? h("span", {}, "incident ", link("incident", e.incident_id)) : null,
    })),
  ].sort((a, b) => String(a.at).localeCompare(String(b.at)));
  put(el, h("h2", { "data-entity": "run", "data-id": id }, `Timeline of run ${id}`), runLinks(trace.run), timeline(items, "The run has no recorded event yet."));
}

/** O5 of a run: the trace with the inflection point marked, and the exports. */
export async function runEvidence(el, ctx, pick) {
  const id = needId(el, ctx, "run_id", "run", pick);
  if (!id) return;
  const trace = await ctx.api(`/v1/runs/${encodeURIComponent(id)}/trace`);
  const ip = trace.inflection_point;
  const enc = encodeURIComponent(id);
  const exportButton = (label, path, file, query) => h("button", { type: "button", onclick: async () => {
    try { await ctx.download(path, file, query); ctx.toast(`Downloaded ${file}`); } catch (e) { ctx.toast(e.message, "error"); }
  } }, label);
  put(el, 
    h("h2", { "data-entity": "run", "data-id": id }, "Trace of run ", link("run", id, trace.run.status)),
    ip ? h("p", { class: "banner deny", role: "note" }, `Inflection point: step ${ip.step_index}, policy `, link("policy", ip.policy_id), ip.reason ? ` — ${ip.reason}` : "")
      : h("p", { class: "banner info", role: "note" }, "No inflection point: no step was denied."),
    actions(
      exportButton("Export JSON", `/v1/runs/${enc}/export`, `run-${id}.json`, { format: "json" }),
      exportButton("Export CSV", `/v1/runs/${enc}/export`, `run-${id}.csv`, { format: "csv" }),
      exportButton("Full export (NDJSON, with proof)", `/v1/runs/${enc}/full-export`, `run-${id}.ndjson`),
      ...(trace.run.incident_ids || []).map((i) => exportButton(`Debrief of ${i} (Markdown)`, `/v1/incidents/${encodeURIComponent(i)}/debrief`, `debrief-${i}.md`, { format: "md" }))),
    dataTable(ctx, {
      caption: `steps of run ${id}`, paging: "client", pageSize: 50,
      columns: [
        { key: "step_index", label: "Step", render: (s) => (s.inflection ? h("strong", { class: "deny", "data-inflection": "true" }, `${s.step_index} ⚑ inflection`) : String(s.step_index)) },
        { key: "occurred_at", label: "At", render: (s) => fmt.time(s.occurred_at) },
        { key: "kind", label: "Kind" },
        { key: "model", label: "Model" },
        { key: "tool", label: "Tool" },
        { key: "status", label: "Status", render: (s) => fmt.status(s.status) },
        { key: "decision", label: "Decision", value: (s) => s.decision?.outcome, render: (s) => (s.decision ? h("span", {}, fmt.status(s.decision.outcome), " ", (s.decision.policy_ids || []).flatMap((p, i) => [i ? ", " : "", link("policy", p)])) : "—") },
        { key: "tokens", label: "Tokens in/out", value: (s) => s.input_tokens + s.output_tokens, render: (s) => `${s.input_tokens} / ${s.output_tokens}` },
        { key: "cost", label: "Cost", value: (s) => s.cost?.total_cost_usd, render: (s) => (s.cost ? (s.cost.total_cost_usd === null ? s.cost.pricing_status : fmt.usd(s.cost.total_cost_usd)) : "—") },
        { key: "error", label: "Error" },
      ],
      load: async () => ({ rows: trace.steps }),
      emptyText: "The run has no step yet.",
    }));
}

/** O3 of a running run: its detail, then its events as they happen (GET /v1/runs/{id}/events). */
export async function liveRun(el, ctx) {
  const run = await runDetail(el, ctx, ctx.panelHref("ACT-LLM-LIVE", "O2"));
  if (!run) return;
  const list = h("ol", { class: "timeline", "aria-live": "polite", "aria-label": "Events of the run as they arrive" });
  const state = h("p", { class: "muted", role: "status" }, "Following the run's events…");
  put(el, section("Live events", state, list));
  const stop = ctx.sse(`/v1/runs/${encodeURIComponent(run.run_id)}/events`, (type, data) => {
    if (type === "heartbeat") return;
    const e = data && data.event_type ? data : data?.event || data;
    list.append(h("li", {}, h("time", {}, fmt.time(e?.occurred_at)), " ", h("strong", {}, e?.event_type || type),
      e?.payload?.step_index !== undefined ? ` step ${e.payload.step_index}` : ""));
    if (type === "end") state.textContent = "The run has ended.";
  }, { onState: (s, error) => {
    state.textContent = s === "open" ? "Following the run's events (live)."
      : s === "retrying" ? (error ? `Live events ${ctx.retryMessage(error)}` : "Connection lost; reconnecting…")
      : "Stopped following.";
  } });
  ctx.onLeave(stop);
}

/** O3, O4 and O5 of a panel listing runs: detail, timeline, trace; "pick" links to its O2. */
export function runLevels(panelId) {
  const pick = (ctx) => ctx.panelHref(panelId, "O2");
  return {
    O3: async (el, ctx) => { await runDetail(el, ctx, pick(ctx)); },
    O4: (el, ctx) => runTimeline(el, ctx, pick(ctx)),
    O5: (el, ctx) => runEvidence(el, ctx, pick(ctx)),
  };
}

export { failure, empty };
