// Shared by the execution, approval, replay, incident and evidence views: formatting, state
// badges, the cross-link conventions and an SVG element builder.
import { h, panelHref, viewHref } from "../app.js";

const BAD = new Set(["failed", "blocked", "aborted", "stopped_by_policy", "denied", "deny", "rejected", "open", "critical", "high"]);
const GOOD = new Set(["completed", "allow", "resolved", "ok", "priced"]);
const BUSY = new Set(["running", "pending", "waiting", "acknowledged", "live", "retrying"]);

/** A state as text with a class the palette colours (text first: never colour alone). */
export function badge(state) {
  const s = String(state ?? "unknown");
  const cls = BAD.has(s) ? "deny" : GOOD.has(s) ? "ok" : BUSY.has(s) ? "warn" : "muted";
  return h("span", { class: `${cls} state`, "data-state": s }, s.replaceAll("_", " "));
}

export function usd(value) {
  if (value === null || value === undefined || value === "") return "–";
  const n = Number(value);
  if (!Number.isFinite(n)) return String(value);
  return `$${n < 0.01 && n > 0 ? n.toPrecision(3) : n.toFixed(n < 1 ? 4 : 2)}`;
}

export function ms(value) {
  if (value === null || value === undefined) return "–";
  const n = Number(value);
  if (n < 1000) return `${Math.round(n)} ms`;
  if (n < 120000) return `${(n / 1000).toFixed(1)} s`;
  return `${Math.floor(n / 60000)} min ${Math.round((n % 60000) / 1000)} s`;
}

export function seconds(value) {
  if (value === null || value === undefined) return "–";
  const sign = value < 0 ? "-" : "";
  const s = Math.abs(Math.round(value));
  if (s < 60) return `${sign}${s} s`;
  if (s < 3600) return `${sign}${Math.floor(s / 60)} min ${s % 60} s`;
  return `${sign}${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

export function tokens(n) {
  return n === null || n === undefined ? "–" : Number(n).toLocaleString("en");
}

/** The cross-link conventions of the console (docs of issue 11). */
export const links = {
  run: (runId, running) => panelHref(running ? "ACT-LLM-LIVE" : "ACT-LLM-COMP", "O3", { run_id: runId }),
  trace: (runId) => panelHref("LOG-REC-LLM", "O5", { run_id: runId }),
  cost: (runId) => panelHref("ANL-INS-COST", "O3", { run_id: runId }),
  policy: (policyId) => panelHref("POL-GOV-ACT", "O3", { policy_id: policyId }),
  incident: (id) => viewHref("incident", id),
  replay: (runId) => viewHref("replay", runId),
  execution: (id) => viewHref("execution", id),
  approvals: (executionId) => viewHref("approvals", null, executionId ? { execution_id: executionId } : null),
};

/** The links of one run, as a list of anchors. */
export function runLinks(runId, running) {
  return h("span", { class: "links" },
    h("a", { href: links.run(runId, running) }, "run"), " · ",
    h("a", { href: links.trace(runId) }, "trace"), " · ",
    h("a", { href: links.cost(runId) }, "cost"), " · ",
    h("a", { href: links.replay(runId) }, "replay"));
}

const SVG = "http://www.w3.org/2000/svg";
/** Build an SVG element; text children become text nodes. */
export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** A labelled control: <label for=id>text</label> + the control. */
export function field(text, control) {
  return h("label", { for: control.id }, text, control);
}

/** A date input's value as the start of that day in UTC (ISO 8601 with a zone). */
export function dayStart(value) {
  return value ? `${value}T00:00:00Z` : "";
}

/** YYYY-MM-DD of a Date (UTC). */
export function isoDay(d) {
  return d.toISOString().slice(0, 10);
}

/** Children without the null, undefined and false that conditional parts leave, flattened. */
function kids(list) {
  return list.flat(Infinity).filter((k) => k !== null && k !== undefined && k !== false);
}
/** el.replaceChildren, skipping empty conditional parts. */
export function fill(el, ...children) { el.replaceChildren(...kids(children)); }
/** el.append, skipping empty conditional parts. */
export function add(el, ...children) { el.append(...kids(children)); }
