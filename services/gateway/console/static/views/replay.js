// A run's replay (#/view/replay/R): a scrubber over the run's events (stream versions), each
// point the run folded from the event store up to it (GET /v1/runs/{id}/replay?at_version=N),
// with the inflection point (the stopping step) marked, a jump to the end of any call
// (?at_step=N), and the trace's calls beside it.
import { add, badge, field, links, tokens, usd, when } from "./flow-common.js";

export async function renderReplay(el, ctx) {
  const { api, h, empty, failure, id } = ctx;
  if (!id) { el.append(empty("No run chosen: open a replay from a run, an incident or an execution.")); return; }
  const path = `/v1/runs/${encodeURIComponent(id)}`;
  let trace, whole;
  try {
    [trace, whole] = await Promise.all([api(`${path}/trace`), api(`${path}/replay`)]);
  } catch (e) { el.append(failure(e)); return; }
  const run = trace.run;
  // The scrubber's points are the run stream's events (its versions 1..N); each point folds
  // every event of the run stored up to it (its decisions and costs too). Every replay answer
  // says N (events_total).
  const total = whole.events_total;
  if (!whole.state || !total) { el.append(empty("The event store holds no event of this run yet.")); return; }
  const cache = new Map();
  const at = async (v) => {
    if (!cache.has(v)) cache.set(v, await api(`${path}/replay`, { query: { at_version: v } }));
    return cache.get(v);
  };
  const atCall = (n) => api(`${path}/replay`, { query: { at_step: n } });
  // The inflection point: the first version at which the run is stopped, the run stream's
  // version at the end of the stopped call.
  const inflection = whole.inflection_point || trace.inflection_point;
  let stopVersion = null;
  if (inflection && whole.state.stopped_at_step != null) {
    try { stopVersion = (await atCall(whole.state.stopped_at_step)).at_version || null; } catch (e) { el.append(failure(e)); return; }
  }

  const incidents = run.incident_ids || [];
  add(el,
    h("p", {}, `Run ${run.run_id} of agent ${run.agent_id} · `, badge(run.status),
      ` · ${tokens(run.tokens_used)} tokens · ${usd(run.cost_usd)} · started ${when(run.started_at)}`),
    h("p", { class: "links" },
      h("a", { href: links.run(run.run_id, run.status === "running") }, "Run"), " · ",
      h("a", { href: links.trace(run.run_id) }, "Trace"), " · ",
      h("a", { href: links.cost(run.run_id) }, "Cost"),
      ...incidents.map((i) => [" · ", h("a", { href: links.incident(i), "data-incident": i }, `Incident ${i.slice(0, 8)}`)]),
      inflection?.policy_id ? [" · ", h("a", { href: links.policy(inflection.policy_id) }, `Policy ${inflection.policy_id}`)] : ""),
    inflection ? h("p", { class: "banner deny", role: "note" },
      `Inflection point: call ${inflection.step_index}${inflection.policy_id ? `, stopped by ${inflection.policy_id}` : ""}`,
      inflection.reason ? ` — ${inflection.reason}` : "",
      stopVersion ? ` (event ${stopVersion} of ${total})` : "") : h("p", { class: "muted" }, "No inflection point: no policy stopped this run."));

  const ticks = h("datalist", { id: "replay-ticks" }, stopVersion ? h("option", { value: stopVersion, label: "inflection" }) : null);
  const slider = h("input", {
    id: "replay-scrubber", type: "range", min: 1, max: total, step: 1, value: total, list: "replay-ticks",
    "aria-describedby": "replay-help",
  });
  const output = h("output", { for: "replay-scrubber", "aria-live": "polite", class: "card", style: "display:block" });
  const calls = h("ol", { class: "timeline", "aria-label": "Calls of the run" });
  const jump = stopVersion ? h("button", { type: "button", onclick: () => { slider.value = stopVersion; show(); slider.focus(); } }, "Go to the inflection point") : null;
  const lastCall = trace.steps.reduce((m, t) => Math.max(m, t.step_index), 0);
  const callInput = h("input", { id: "replay-call", type: "number", min: 0, max: lastCall, step: 1, required: true, value: whole.at_step });
  const toCall = h("form", { class: "filters", "aria-label": "Go to a call", onsubmit: (ev) => { ev.preventDefault(); goToCall(Number(callInput.value)); } },
    field(`Go to the end of call (0 to ${lastCall}; 0 is before the first)`, callInput), h("button", { type: "submit" }, "Go"));
  const marker = stopVersion ? h("div", { "aria-hidden": "true", style: "position:relative;height:14px;max-width:640px" },
    h("span", { class: "deny", style: `position:absolute;left:calc(${((stopVersion - 1) / Math.max(1, total - 1)) * 100}% - 4px)` }, "▲ stop")) : null;
  add(el,
    h("h2", {}, "Timeline"),
    h("label", { for: "replay-scrubber" }, `Event of the run (1 to ${total})`),
    h("div", {}, slider), marker,
    h("p", { id: "replay-help", class: "muted" }, "Arrow keys move one event, Page Up/Down ten, Home and End the first and last."),
    jump, toCall, output, h("h2", {}, "Calls"), calls);
  slider.style.width = "100%"; slider.style.maxWidth = "640px";

  let seq = 0;
  // One answer shown: the run after event v of the run stream (after call n when reached by it).
  const render = (v, r, n) => {
    const s = r.state;
    const where = `event ${v} of ${total}${v === stopVersion ? ", the inflection point" : ""}`;
    slider.setAttribute("aria-valuetext", n == null ? where : `end of call ${n}, ${where}`);
    output.dataset.version = String(v);
    output.dataset.step = String(r.at_step);
    output.dataset.endOfCall = n == null ? "" : String(n);
    output.dataset.status = s ? s.status : "none";
    output.dataset.inflection = v === stopVersion ? "true" : "false";
    output.replaceChildren(
      h("div", { class: "label" }, n == null ? `After event ${v} of ${total}` : `After call ${n} (event ${v} of ${total})`,
        v === stopVersion ? " — the inflection point" : ""),
      s ? h("div", {}, "Status ", badge(s.status), ` · ${tokens(s.tokens_used)} tokens · cost ${usd(s.cost_usd)} · last call ${s.last_step_index}`,
        s.stopped_at_step != null ? h("span", { class: "deny" }, ` · stopped at call ${s.stopped_at_step}${s.stop_reason ? `: ${s.stop_reason}` : ""}`) : "")
        : h("div", { class: "muted" }, "Nothing of the run yet."));
    const last = s ? s.last_step_index : 0;
    calls.replaceChildren(...trace.steps.map((t) => h("li", {
      class: t.inflection ? "inflection" : null, "data-call": t.step_index,
      "aria-current": s && t.step_index === (s.stopped_at_step ?? last) ? "step" : null,
    }, `Call ${t.step_index} · `, t.step_index > last && !(s && s.stopped_at_step === t.step_index) ? "(later) " : "", badge(t.status), ` · ${t.model || t.tool || t.kind || ""} · ${tokens(t.input_tokens + t.output_tokens)} tokens`,
    t.cost ? ` · ${usd(t.cost.total_cost_usd)}` : "", t.inflection ? h("strong", {}, " · inflection") : "",
    t.decision && t.decision.outcome !== "allow" ? h("div", { class: "deny" }, (t.decision.reasons || []).map((x) => x.message || x.policy_id).join("; ")) : null)));
  };
  // Answers may arrive out of order: only the latest request's is shown.
  const latest = async (load, then) => {
    const mine = ++seq;
    let r;
    try { r = await load(); } catch (e) { if (mine === seq) output.replaceChildren(failure(e)); return; }
    if (mine === seq) then(r);
  };
  const show = () => {
    const v = Number(slider.value);
    return latest(() => at(v), (r) => render(v, r, null));
  };
  // A call's end folds its cost too, which may be stored after the run stream's event there, so
  // the answer is shown as it is and the scrubber moves to the run stream's version at that end.
  const goToCall = (n) => latest(() => atCall(n), (r) => {
    slider.value = String(Math.max(1, r.at_version));
    render(Number(slider.value), r, n);
  });
  slider.addEventListener("input", show);
  await show();
}
