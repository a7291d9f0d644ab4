// A run's replay (#/view/replay/R): a scrubber over the run's events (stream versions), each
// point the run folded from the event store up to it (GET /v1/runs/{id}/replay?at_version=N),
// with the inflection point (the stopping step) marked, and the trace's calls beside it.
import { add, badge, links, tokens, usd, when } from "./flow-common.js";

export async function renderReplay(el, ctx) {
  const { api, h, empty, failure, id } = ctx;
  if (!id) { el.append(empty("No run chosen: open a replay from a run, an incident or an execution.")); return; }
  const path = `/v1/runs/${encodeURIComponent(id)}`;
  let trace, whole;
  try {
    [trace, whole] = await Promise.all([api(`${path}/trace`), api(`${path}/replay`)]);
  } catch (e) { el.append(failure(e)); return; }
  const run = trace.run;
  if (!whole.state) { el.append(empty("The event store holds no event of this run yet.")); return; }
  const cache = new Map();
  const at = async (v) => {
    if (!cache.has(v)) cache.set(v, await api(`${path}/replay`, { query: { at_version: v } }));
    return cache.get(v);
  };
  const exists = async (v) => { try { await at(v); return true; } catch { return false; } };
  // The scrubber's points are the run stream's events (its versions 1..N); each point folds
  // every event of the run stored up to it (its decisions and costs too). N is found by
  // doubling, then halving: the store answers 422 for a version it does not hold.
  let total = 0;
  if (await exists(1)) {
    let lo = 1, hi = 2;
    while (await exists(hi)) { lo = hi; hi *= 2; }
    while (hi - lo > 1) { const mid = Math.floor((lo + hi) / 2); if (await exists(mid)) lo = mid; else hi = mid; }
    total = lo;
  }
  if (!total) { el.append(empty("The event store holds no event of this run yet.")); return; }
  // The inflection point: the first version at which the run is stopped (a stop never undoes,
  // so a binary search over versions finds it).
  const inflection = whole.inflection_point || trace.inflection_point;
  let stopVersion = null;
  if (inflection && whole.state.stopped_at_step != null) {
    let lo = 1, hi = total;
    while (lo < hi) {
      const mid = Math.floor((lo + hi) / 2);
      const r = await at(mid);
      if (r.state && r.state.stopped_at_step != null) hi = mid; else lo = mid + 1;
    }
    stopVersion = lo;
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
  const marker = stopVersion ? h("div", { "aria-hidden": "true", style: "position:relative;height:14px;max-width:640px" },
    h("span", { class: "deny", style: `position:absolute;left:calc(${((stopVersion - 1) / Math.max(1, total - 1)) * 100}% - 4px)` }, "▲ stop")) : null;
  add(el,
    h("h2", {}, "Timeline"),
    h("label", { for: "replay-scrubber" }, `Event of the run (1 to ${total})`),
    h("div", {}, slider), marker,
    h("p", { id: "replay-help", class: "muted" }, "Arrow keys move one event, Page Up/Down ten, Home and End the first and last."),
    jump, output, h("h2", {}, "Calls"), calls);
  slider.style.width = "100%"; slider.style.maxWidth = "640px";

  let seq = 0;
  const show = async () => {
    const v = Number(slider.value);
    const mine = ++seq;
    slider.setAttribute("aria-valuetext", `event ${v} of ${total}${v === stopVersion ? ", the inflection point" : ""}`);
    let r;
    try { r = await at(v); } catch (e) { output.replaceChildren(failure(e)); return; }
    if (mine !== seq) return;
    const s = r.state;
    output.dataset.version = String(v);
    output.dataset.status = s ? s.status : "none";
    output.dataset.inflection = v === stopVersion ? "true" : "false";
    output.replaceChildren(
      h("div", { class: "label" }, `After event ${v} of ${total}${v === stopVersion ? " — the inflection point" : ""}`),
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
  slider.addEventListener("input", show);
  await show();
}
