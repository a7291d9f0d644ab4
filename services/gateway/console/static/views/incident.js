// One incident (#/view/incident/I): what happened, its timeline, acknowledge and resolve, the
// links to its run, policy, trace, cost and replay, and its debrief as a file.
import { badge, fill, links, tokens, when } from "./flow-common.js";

const DEBRIEFS = [["md", "Markdown"], ["html", "HTML"], ["pdf", "PDF"], ["json", "JSON"]];

export async function renderIncident(el, ctx) {
  const { api, download, h, empty, failure, toast, id } = ctx;
  if (!id) { el.append(empty("No incident chosen: open one from the incidents panel."), h("a", { href: "#/panel/INC-EV-ACT/O2" }, "Incidents")); return; }
  const path = `/v1/incidents/${encodeURIComponent(id)}`;
  const body = h("div", { class: "incident", "data-incident": id });
  el.append(body);

  const render = async (inc) => {
    let trace = null;
    try { trace = await api(`/v1/runs/${encodeURIComponent(inc.run_id)}/trace`); } catch { /* the run's trace is linked */ }
    const events = [
      ["opened", inc.opened_at, `Opened: ${inc.title}`],
      ["acknowledged", inc.acknowledged_at, `Acknowledged by ${inc.acknowledged_by}`],
      ["resolved", inc.resolved_at, `Resolved by ${inc.resolved_by}: ${inc.resolution}`],
    ].filter(([, at]) => at);
    const stopStep = trace?.steps?.find((t) => t.inflection);
    if (stopStep?.occurred_at) events.push(["stopped", stopStep.occurred_at, `Run stopped at call ${stopStep.step_index} by ${inc.policy_id}`]);
    events.sort((a, b) => String(a[1]).localeCompare(String(b[1])));

    const note = h("textarea", { id: "resolution", name: "resolution", required: true, rows: 3, cols: 60, maxlength: 2000 });
    const ack = h("button", { type: "button", class: "primary", onclick: async () => {
      try { await render(await api(`${path}/acknowledge`, { method: "POST" })); toast("Incident acknowledged."); }
      catch (e) { toast(`${e.code || "error"}: ${e.message}`, "error"); }
    } }, "Acknowledge");
    const resolve = h("form", { "aria-label": "Resolve the incident", onsubmit: async (ev) => {
      ev.preventDefault();
      if (!note.value.trim()) { note.setAttribute("aria-invalid", "true"); toast("Write the resolution first.", "error"); note.focus(); return; }
      try { await render(await api(`${path}/resolve`, { method: "POST", body: { resolution: note.value.trim() } })); toast("Incident resolved."); }
      catch (e) { toast(`${e.code || "error"}: ${e.message}`, "error"); }
    } }, h("label", { for: "resolution" }, "Resolution (what was done)"), h("div", {}, note), h("button", { type: "submit" }, "Resolve"));

    fill(body,
      h("h2", {}, inc.title),
      h("p", { "data-status": inc.status }, "Status ", badge(inc.status), " · severity ", badge(inc.severity),
        ` · policy ${inc.policy_id} · call ${inc.step_index} · opened ${when(inc.opened_at)}`),
      h("p", { class: "links" },
        h("a", { href: links.run(inc.run_id, trace?.run?.status === "running") }, "Run"), " · ",
        h("a", { href: links.policy(inc.policy_id) }, "Policy"), " · ",
        h("a", { href: links.trace(inc.run_id) }, "Trace"), " · ",
        h("a", { href: links.cost(inc.run_id) }, "Cost"), " · ",
        h("a", { href: links.replay(inc.run_id) }, "Replay")),
      trace ? h("p", { class: "muted" }, `The run used ${tokens(trace.run.tokens_used)} tokens before it stopped${trace.inflection_point?.reason ? `: ${trace.inflection_point.reason}` : ""}.`) : null,
      h("h3", {}, "Timeline"),
      h("ol", { class: "timeline", "aria-label": "Incident timeline" },
        events.map(([kind, at, text]) => h("li", { "data-event": kind, class: kind === "stopped" ? "inflection" : null }, `${when(at)} · ${text}`))),
      h("h3", {}, "Act"),
      inc.status === "open" ? h("p", {}, ack) : null,
      inc.status !== "resolved" ? resolve : h("p", { class: "ok" }, `Resolved: ${inc.resolution}`),
      h("h3", {}, "Debrief"),
      h("div", { class: "pager" }, DEBRIEFS.map(([fmt, label]) => h("button", { type: "button", "data-format": fmt, onclick: async () => {
        try { await download(`${path}/debrief`, `debrief-${inc.incident_id}.${fmt}`, { format: fmt }); }
        catch (e) { toast(`${e.code || "error"}: ${e.message}`, "error"); }
      } }, `Debrief (${label})`))));
  };

  try { await render(await api(path)); } catch (e) { body.replaceChildren(failure(e)); }
}
