// One workflow execution (#/view/execution/E): its DAG drawn as SVG with the executed path and
// the critical path marked, each step's state, cost, duration, turns, attempts (the chosen one
// marked) and admission checks, updated live from GET /v1/executions/{id}/events.
import { badge, fill, field, links, ms, runLinks, svg, tokens, usd, when } from "./flow-common.js";

const ENDED = new Set(["completed", "failed", "aborted"]);
const RUN_ENDED = new Set(["completed", "failed", "stopped_by_policy"]);
const STEP_ENDED = new Set(["completed", "failed", "blocked", "rejected"]);
const FILL = {
  completed: "#e6f4ea", running: "#fff4d6", failed: "#fde8e7", blocked: "#fde8e7",
  rejected: "#fde8e7", waiting: "#f3f5f7", skipped: "#f3f5f7",
};

/** Layers of a DAG: each step one column right of its deepest dependency. */
function layout(steps) {
  const byId = new Map(steps.map((s) => [s.step_id, s]));
  const depth = new Map();
  const visit = (id, seen = new Set()) => {
    if (depth.has(id)) return depth.get(id);
    if (seen.has(id)) return 0;
    seen.add(id);
    const deps = (byId.get(id)?.depends_on || []).filter((d) => byId.has(d));
    const d = deps.length ? Math.max(...deps.map((x) => visit(x, seen) + 1)) : 0;
    depth.set(id, d);
    return d;
  };
  steps.forEach((s) => visit(s.step_id));
  const columns = [];
  for (const s of steps) (columns[depth.get(s.step_id)] ||= []).push(s.step_id);
  const pos = new Map();
  columns.forEach((col, x) => col.forEach((id, y) => pos.set(id, { x, y })));
  return { pos, width: columns.length, height: Math.max(1, ...columns.map((c) => c.length)) };
}

/** The highest call a trace holds a record of (0: none, or no trace yet). */
function recordedIn(trace) {
  return Math.max(0, ...(trace?.steps || []).filter((t) => t.status !== "denied").map((t) => t.step_index));
}

const W = 170, H = 58, GX = 60, GY = 22, PAD = 12;

function drawDag(execution) {
  const steps = execution.steps || [];
  const { pos, width, height } = layout(steps);
  const critical = new Set(execution.critical_path || []);
  const started = (s) => s && s.state !== "waiting";
  const byId = new Map(steps.map((s) => [s.step_id, s]));
  const vw = PAD * 2 + width * W + (width - 1) * GX, vh = PAD * 2 + height * H + (height - 1) * GY;
  const at = (id) => { const p = pos.get(id); return { x: PAD + p.x * (W + GX), y: PAD + p.y * (H + GY) }; };
  const edges = [], nodes = [];
  for (const s of steps) {
    for (const dep of s.depends_on || []) {
      if (!pos.has(dep)) continue;
      const a = at(dep), b = at(s.step_id);
      const executed = started(byId.get(dep)) && started(s);
      const crit = executed && critical.has(dep) && critical.has(s.step_id);
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
      edges.push(svg("path", {
        d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 6},${y2}`, fill: "none",
        stroke: executed ? (crit ? "#0a58ca" : "#1b1f24") : "#8c959f",
        "stroke-width": executed ? (crit ? 4 : 2.5) : 1.5, "stroke-dasharray": executed ? null : "5 4",
        "marker-end": "url(#arrow)", "data-edge": `${dep}->${s.step_id}`, "data-executed": executed ? "true" : "false",
      }));
    }
    const p = at(s.step_id);
    nodes.push(svg("g", { "data-step": s.step_id, "data-state": s.state },
      svg("rect", { x: p.x, y: p.y, width: W, height: H, rx: 8, fill: FILL[s.state] || "#ffffff",
        stroke: critical.has(s.step_id) ? "#0a58ca" : "#57606a", "stroke-width": critical.has(s.step_id) ? 3 : 1.5 }),
      svg("text", { x: p.x + 10, y: p.y + 22, "font-size": 14, "font-weight": 600, fill: "#1b1f24" }, s.step_id.slice(0, 20)),
      svg("text", { x: p.x + 10, y: p.y + 42, "font-size": 12, fill: "#1b1f24" },
        `${s.state}${s.attempt > 1 ? ` · attempt ${s.attempt}` : ""}${s.duration_ms != null ? ` · ${ms(s.duration_ms)}` : ""}`)));
  }
  const summary = steps.map((s) => `${s.step_id}: ${s.state}`).join("; ");
  return svg("svg", { viewBox: `0 0 ${vw} ${vh}`, width: vw, height: vh, role: "img", class: "dag",
    "aria-label": `Workflow graph of ${steps.length} steps. ${summary}. Critical path: ${(execution.critical_path || []).join(" → ") || "none yet"}.` },
  svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 5, refY: 5, markerWidth: 10, markerHeight: 10, markerUnits: "userSpaceOnUse", orient: "auto-start-reverse" },
    svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#57606a" }))),
  edges, nodes);
}

export async function renderExecution(el, ctx) {
  const { api, sse, h, empty, failure, toast, onLeave, id } = ctx;
  if (!id) { el.append(empty("No execution chosen: open one from the executions list."), h("a", { href: "#/view/executions" }, "Executions")); return; }
  const state = { execution: null, workflow: null, runs: new Map(), traces: new Map(), recorded: new Map(), live: new Map(), left: false };
  const connection = h("p", { role: "status", class: "muted", "data-connection": "connecting" }, "Live updates: connecting…");
  const head = h("div", {});
  const graph = h("div", { class: "dag-wrap", style: "overflow-x:auto;margin:8px 0" });
  const table = h("div", {});
  const details = h("div", {});
  const reason = h("input", { id: "abort-reason", name: "reason", required: true, autocomplete: "off", maxlength: 500 });
  const abortForm = h("form", { class: "filters", "aria-label": "Abort the execution", onsubmit: async (ev) => {
    ev.preventDefault();
    if (!reason.value.trim()) { toast("Give a reason to abort.", "error"); reason.focus(); return; }
    try {
      state.execution = await api(`/v1/executions/${encodeURIComponent(id)}/abort`, { method: "POST", body: { reason: reason.value.trim() } });
      toast("Execution aborted.");
      reason.value = "";
      await refresh();
    } catch (e) { toast(`${e.code || "error"}: ${e.message}`, "error"); }
  } }, field("Reason to abort", reason), h("button", { type: "submit", class: "primary" }, "Abort execution"));
  el.append(head, connection, abortForm, h("h2", {}, "Graph"), graph, h("h2", {}, "Steps"), table, details);

  const runOf = async (runId, force) => {
    const known = state.runs.get(runId);
    if (known && !force && RUN_ENDED.has(known.status) && (known.status !== "stopped_by_policy" || known.incident_ids.length)) return known;
    try { const r = await api(`/v1/runs/${encodeURIComponent(runId)}`); state.runs.set(runId, r); return r; } catch { return known || null; }
  };
  const traceOf = async (runId) => {
    const run = state.runs.get(runId);
    const known = state.traces.get(runId);
    if (known && run && RUN_ENDED.has(run.status) && known.run.status === run.status && known.steps.length >= (run.last_step_index || 0)) return known;
    try { const t = await api(`/v1/runs/${encodeURIComponent(runId)}/trace`); state.traces.set(runId, t); return t; } catch { return known || null; }
  };

  const loadDetails = async () => {
    const ex = state.execution;
    const jobs = [];
    for (const s of ex.steps || []) {
      for (let n = 1; n <= (s.attempt || 0); n += 1) {
        const runId = `${ex.execution_id}:${s.step_id}:${n}`;
        jobs.push(runOf(runId).then(() => (runId === s.run_id ? traceOf(runId) : null)));
      }
    }
    await Promise.all(jobs);
  };

  const stepCost = (s) => {
    let total = 0, any = false;
    for (let n = 1; n <= (s.attempt || 0); n += 1) {
      const r = state.runs.get(`${state.execution.execution_id}:${s.step_id}:${n}`);
      if (r && r.cost_usd != null) { total += Number(r.cost_usd); any = true; }
    }
    return any ? total : null;
  };

  const renderAll = () => {
    const ex = state.execution;
    if (!ex) return;
    const doc = state.workflow?.document || {};
    const defs = new Map((doc.steps || []).map((s) => [s.id, s]));
    fill(head,
      h("p", { "data-execution-status": ex.status },
        "Workflow ", h("strong", {}, ex.workflow_id), ` version ${ex.workflow_version} · status `, badge(ex.status),
        ` · started ${when(ex.started_at)}`, ex.finished_at ? ` · finished ${when(ex.finished_at)}` : "",
        ` · critical path ${ms(ex.critical_path_ms)}`),
      ex.reason ? h("p", { class: `banner ${ex.status === "completed" ? "info" : "deny"}`, role: "note", "data-reason": "" }, ex.reason) : null,
      (ex.steps || []).some((s) => s.approval?.pending)
        ? h("p", {}, h("a", { href: links.approvals(ex.execution_id) }, "Steps of this execution wait for approval")) : null);
    abortForm.hidden = ENDED.has(ex.status);
    abortForm.style.display = ENDED.has(ex.status) ? "none" : "";
    graph.replaceChildren(drawDag(ex), h("p", { class: "muted" },
      "Solid edges: the executed path; thick blue: the critical path; dashed: not reached."));
    const rows = (ex.steps || []).map((s) => {
      const trace = s.run_id ? state.traces.get(s.run_id) : null;
      const live = state.live.get(s.step_id);
      const run = s.run_id ? state.runs.get(s.run_id) : null;
      const turns = trace ? trace.steps.filter((t) => t.status !== "denied").length : null;
      const maxAttempts = 1 + Number(defs.get(s.step_id)?.retries || 0);
      return h("tr", { "data-step": s.step_id },
        h("th", { scope: "row" }, s.step_id),
        h("td", {}, s.agent_id), h("td", {}, s.risk_tier),
        h("td", {}, badge(s.state), s.reason ? h("div", { class: "muted" }, s.reason) : null),
        h("td", {}, s.attempt ? `${s.attempt} of ${maxAttempts}` : "–"),
        h("td", {}, ms(s.duration_ms), s.running_ms != null ? h("div", { class: "muted" }, `all attempts ${ms(s.running_ms)}`) : null),
        h("td", {}, usd(stepCost(s))),
        h("td", {}, run ? tokens(run.tokens_used) : "–",
          live ? h("div", { class: "muted", "data-live": "" }, `live: ${tokens(live.input_tokens + live.output_tokens)} tokens, ${usd(live.cost_usd)}`) : null),
        h("td", {}, turns ?? "–"));
    });
    table.replaceChildren(h("table", { "aria-label": "Steps of the execution" },
      h("thead", {}, h("tr", {}, ["Step", "Agent", "Risk tier", "State", "Attempt", "Duration", "Cost", "Tokens", "Turns"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows)));
    details.replaceChildren(h("h2", {}, "Attempts and checks"),
      ...(ex.steps || []).map((s) => stepDetails(s)));
  };

  const stepDetails = (s) => {
    const ex = state.execution;
    const attempts = [];
    for (let n = 1; n <= (s.attempt || 0); n += 1) {
      const runId = `${ex.execution_id}:${s.step_id}:${n}`;
      const r = state.runs.get(runId);
      const chosen = runId === s.run_id;
      attempts.push(h("li", { "data-attempt": n, "data-chosen": chosen ? "true" : "false" },
        `Attempt ${n}${chosen ? " (chosen)" : ""}: `, r ? badge(r.status) : h("span", { class: "muted" }, "not projected yet"),
        r ? ` · ${tokens(r.tokens_used)} tokens · ${usd(r.cost_usd)}` : "",
        r?.stop_reason ? h("span", { class: "deny" }, ` · ${r.stop_reason}`) : "", " · ",
        runLinks(runId, r ? !RUN_ENDED.has(r.status) : true),
        ...(r?.incident_ids || []).map((i) => h("span", {}, " · ", h("a", { href: links.incident(i), "data-incident": i }, `incident ${i.slice(0, 8)}`)))));
    }
    const trace = s.run_id ? state.traces.get(s.run_id) : null;
    const checks = (trace?.steps || []).filter((t) => t.decision).map((t) => {
      const d = t.decision;
      const passed = d.outcome === "allow";
      return h("li", { "data-check": d.outcome, class: t.inflection ? "inflection" : null },
        h("span", { class: passed ? "ok" : "deny" }, passed ? "passed" : `failed (${d.outcome})`),
        ` · call ${t.step_index}${t.model ? ` (${t.model})` : ""}`,
        d.policy_ids?.length ? [" · policies ", ...d.policy_ids.map((p, i) => [i ? ", " : "", h("a", { href: links.policy(p) }, p)])].flat() : "",
        (d.reasons || []).length ? h("ul", {}, d.reasons.map((r) => h("li", {}, `${r.policy_id ? `${r.policy_id}: ` : ""}${r.message || r.reason || JSON.stringify(r)}`))) : null);
    });
    const approval = s.approval;
    return h("section", { class: "step-detail", "data-step": s.step_id, "aria-label": `Step ${s.step_id}` },
      h("h3", {}, s.step_id, " ", badge(s.state)),
      approval ? h("p", {}, `Approvals ${approval.approvers.length} of ${approval.required}${approval.role ? ` (${approval.role})` : ""}`,
        approval.approvers.length ? `: ${approval.approvers.join(", ")}` : "", approval.escalated ? " · escalated" : "",
        approval.expires_at ? ` · due ${when(approval.expires_at)}` : "",
        approval.pending ? [" · ", h("a", { href: links.approvals(ex.execution_id) }, "decide in the approval queue")] : "") : null,
      attempts.length ? h("ul", { "aria-label": `Attempts of ${s.step_id}` }, attempts) : h("p", { class: "muted" }, "Not dispatched yet."),
      s.run_id ? (checks.length ? h("ul", { class: "timeline", "aria-label": `Admission checks of ${s.step_id}` }, checks)
        : h("p", { class: "muted" }, "No admission check recorded for the chosen attempt yet.")) : null);
  };

  let pending = null, polls = 0;
  const refresh = async () => {
    try {
      const ex = await api(`/v1/executions/${encodeURIComponent(id)}`);
      state.execution = ex;
      if (!state.workflow || state.workflow.version !== ex.workflow_version) {
        state.workflow = await api(`/v1/workflows/${encodeURIComponent(ex.workflow_id)}`, { query: { version: ex.workflow_version } }).catch(() => null);
      }
      await loadDetails();
    } catch (e) { if (!state.execution) { el.replaceChildren(failure(e)); return; } }
    if (state.left) return;
    renderAll();
    // A run stopped by policy opens its incident a moment later, through another service:
    // look again (a few times) until its id shows.
    const waiting = [...state.runs.values()].some((r) => r.status === "stopped_by_policy" && !r.incident_ids.length)
      || (state.execution.steps || []).some((s) => s.run_id && (!state.traces.get(s.run_id)
        || (STEP_ENDED.has(s.state) && !RUN_ENDED.has(state.runs.get(s.run_id)?.status))))
      || (state.execution.steps || []).some((s) => s.run_id && recordedIn(state.traces.get(s.run_id)) < (state.recorded.get(s.run_id) || 0));
    if (waiting && polls < 40) { polls += 1; schedule(polls < 20 ? 1000 : 3000); }
  };
  const schedule = (delay = 250) => {
    clearTimeout(pending);
    pending = setTimeout(refresh, delay);
  };

  await refresh();
  if (!state.execution) return;
  const setConn = (s, error) => {
    const text = { open: "connected", retrying: ctx.retryMessage(error), closed: "closed (the execution has ended)",
      failed: `refused (${error?.message || "the stream was refused"})` }[s] || s;
    connection.dataset.connection = s;
    connection.textContent = `Live updates: ${text}`;
  };
  const stop = sse(`/v1/executions/${encodeURIComponent(id)}/events`, (type, data) => {
    polls = 0;
    if (type === "run.step_recorded" && data?.payload?.run_id) {
      // The trace is a projection: it may answer before it holds this call; look until it does.
      const { run_id: runId, step_index: n } = data.payload;
      state.recorded.set(runId, Math.max(state.recorded.get(runId) || 0, Number(n) || 0));
    }
    if (type === "usage") {
      state.live.set(data.step_id, data);
      renderAll();
    } else if (type === "snapshot" && data && data.steps) {
      state.execution = data; renderAll(); schedule();
    } else if (type !== "end") {
      schedule();
    } else {
      schedule(0);
    }
  }, { onState: setConn });
  onLeave(() => { state.left = true; stop(); clearTimeout(pending); });
}
