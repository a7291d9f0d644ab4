// What every panel shares: the data table (filter, sort, paginate, keyboard operable), summary
// cards, detail lists, timelines, charts with a text alternative, links between entities, and
// calls that turn an API's 404 into an honest empty state.
import { h, panelHref, viewHref, empty, failure, ApiError } from "../app.js";

// -- links between entities (the console's URL conventions) --------------------------------

const RUNNING = new Set(["running"]);

export const href = {
  run: (id, status) => panelHref(RUNNING.has(status) ? "ACT-LLM-LIVE" : "ACT-LLM-COMP", "O3", { run_id: id }),
  incident: (id) => panelHref("INC-EV-ACT", "O3", { incident_id: id }),
  policy: (id) => panelHref("POL-GOV-ACT", "O3", { policy_id: id }),
  trace: (runId) => panelHref("LOG-REC-LLM", "O5", { run_id: runId }),
  cost: (runId) => panelHref("ANL-INS-COST", "O3", { run_id: runId }),
  execution: (id) => viewHref("execution", id),
  approvals: (executionId) => viewHref("approvals", null, executionId ? { execution_id: executionId } : null),
  replay: (runId) => viewHref("replay", runId),
  agent: (id) => viewHref("agent", id),
  workflow: (id) => panelHref("LOG-REC-AUD", "O2", { workflow_id: id }),
  incidentsOfRun: (runId) => panelHref("INC-EV-ACT", "O2", { run_id: runId }),
  incidentsOfPolicy: (policyId) => panelHref("INC-EV-ACT", "O2", { policy_id: policyId }),
};

/** A link to an entity, or a dash when there is no id. */
export function link(kind, id, extra) {
  if (id === undefined || id === null || id === "") return "—";
  return h("a", { href: href[kind](id, extra), "data-link": kind, "data-id": id }, String(id));
}

// -- formatting ---------------------------------------------------------------------------

export const fmt = {
  time: (t) => (t ? new Date(t).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "—"),
  usd: (v) => (v === null || v === undefined || v === "" ? "—" : `$${Number(v).toFixed(Number(v) < 1 ? 4 : 2)}`),
  num: (v) => (v === null || v === undefined ? "—" : Number(v).toLocaleString("en")),
  text: (v) => (v === null || v === undefined || v === "" ? "—" : String(v)),
  status: (s) => h("span", { class: STATUS_CLASS[s] || "" }, fmt.text(s)),
};
const STATUS_CLASS = {
  stopped_by_policy: "deny", failed: "deny", open: "deny", deny: "deny", critical: "deny", high: "deny",
  warn: "warn", acknowledged: "warn", medium: "warn", running: "warn",
  completed: "ok", resolved: "ok", allow: "ok", low: "ok",
};

// -- calls --------------------------------------------------------------------------------

/**
 * The API's answer, or null when the route answers 404 (a capability this build does not have):
 * the caller shows an empty state naming what is missing. Other errors propagate.
 */
export async function optional(ctx, path, options) {
  try {
    return await ctx.api(path, options);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) return null;
    throw e;
  }
}

/** An empty state for a route this build does not answer. */
export function missing(what, route) {
  return empty(`${what} needs ${route}, which this gateway does not answer (404). Nothing is shown rather than invented figures.`);
}

// -- building blocks ----------------------------------------------------------------------

/** Append the nodes that are there (null, undefined and false are skipped). */
export function put(el, ...nodes) {
  el.append(...nodes.flat().filter((n) => n !== null && n !== undefined && n !== false));
}

/** Summary cards: [{label, value, href?}]. */
export function cards(items) {
  return h("div", { class: "cards", role: "list" }, items.map((c) =>
    h("div", { class: "card", role: "listitem" },
      h("div", { class: "value" }, c.href ? h("a", { href: c.href }, fmt.text(c.value)) : fmt.text(c.value)),
      h("div", { class: "label" }, c.label))));
}

/** A definition list of an entity's fields: [[label, value-or-node], ...]. */
export function details(pairs) {
  return h("dl", { class: "details" }, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v instanceof Node ? v : fmt.text(v))]));
}

/** A row of action links and buttons. */
export function actions(...items) {
  return h("div", { class: "actions" }, items.flat());
}

/** A section with a heading. */
export function section(title, ...children) {
  return h("section", { class: "block" }, h("h2", {}, title), ...children);
}

/** A timeline of events in order: [{at, title, detail?, inflection?, link?}]. */
export function timeline(items, emptyText) {
  if (!items.length) return empty(emptyText);
  return h("ol", { class: "timeline" }, items.map((i) =>
    h("li", { class: i.inflection ? "inflection" : "", "data-inflection": i.inflection ? "true" : null },
      h("time", { datetime: i.at || "" }, fmt.time(i.at)), " ",
      h("strong", {}, i.title),
      i.inflection ? h("span", { class: "deny" }, " — inflection point") : null,
      i.detail ? h("div", { class: "muted" }, i.detail) : null,
      i.links ? h("div", {}, i.links) : null)));
}

/** The query's id, or an empty state asking for one (with where to pick it). */
export function needId(el, ctx, key, what, pickHref) {
  const id = ctx.query[key];
  if (id) return id;
  el.append(h("p", { class: "empty", role: "note" }, `Pick ${what} to see its detail: `, h("a", { href: pickHref }, `the list of ${what}s`), "."));
  return null;
}

// -- audit events --------------------------------------------------------------------------

/** The columns of an audit event table; every id is a link. */
export const AUDIT_COLUMNS = [
  { key: "occurred_at", label: "When", render: (e) => fmt.time(e.occurred_at) },
  { key: "event_type", label: "Event" },
  { key: "outcome", label: "Outcome", render: (e) => (e.outcome ? fmt.status(e.outcome) : "—") },
  { key: "run_id", label: "Run", render: (e) => link("run", e.run_id) },
  { key: "policy_ids", label: "Policies", value: (e) => (e.policy_ids || []).join(","), render: (e) => (e.policy_ids || []).length ? (e.policy_ids || []).flatMap((p, i) => [i ? ", " : "", link("policy", p)]) : "—" },
  { key: "incident_id", label: "Incident", render: (e) => link("incident", e.incident_id) },
  { key: "execution_id", label: "Execution", render: (e) => (e.execution_id ? h("span", {}, link("execution", e.execution_id),
    e.workflow_id ? [" of ", link("workflow", e.workflow_id)] : null,
    String(e.event_type).startsWith("execution.approval") || String(e.event_type).startsWith("execution.step_approved")
      ? [" · ", h("a", { href: href.approvals(e.execution_id), "data-link": "approvals", "data-id": e.execution_id }, "approvals")] : null) : "—") },
  { key: "agent_id", label: "Agent", render: (e) => link("agent", e.agent_id) },
  { key: "actor", label: "Actor" },
  { key: "excerpt", label: "Excerpt", sort: false, render: (e) => (e.excerpt ? h("span", { class: "excerpt" }, String(e.excerpt).slice(0, 160)) : "—") },
];

/** A loader over GET /v1/audit/search with its cursor. */
export function auditLoader(ctx, fixed = {}) {
  return async ({ filters, cursor, limit }) => {
    const res = await ctx.api("/v1/audit/search", { query: { ...fixed, ...filters, cursor, limit } });
    return { rows: res.events, next: res.next_cursor };
  };
}

/** The audit filters a table offers (the names are the route's own). */
export const AUDIT_FILTERS = [
  { name: "q", label: "Text" },
  { name: "outcome", label: "Outcome", options: ["", "allow", "warn", "deny"] },
  { name: "run_id", label: "Run id" },
  { name: "policy_id", label: "Policy id" },
  { name: "since", label: "Since (ISO time)" },
];

// -- the data table ------------------------------------------------------------------------

let tableSeq = 0;

/**
 * A table over an API listing, reused by every panel's O2.
 *
 * columns: [{key, label, render?(row) -> node|text, value?(row) -> sortable value, sort?: false}]
 * filters: [{name, label, options?: [...]}] passed to load (the API's own filters); initial
 *          values come from the route's query (so a cross-link can open a filtered list)
 * paging:  "offset" (limit/offset; load gets {offset, limit}), "cursor" (load gets {cursor}
 *          and returns next), or "client" (load returns every row; the table pages them)
 * load:    async ({filters, offset, cursor, limit}) -> {rows, next?}
 *
 * Sorting orders the rows of the page shown; "Find in rows" narrows them by text. Every
 * control is a labelled input or a <button>, so Tab and Enter/Space operate it all.
 */
/**
 * Put a table's applied filters into the page's address, so that a reload, a shared link or the
 * Back button from a detail page shows the same rows. The address is replaced, not pushed: each
 * filter change is not a page of its own in the history. A filter with an initial value that
 * was cleared is written empty ("status="), which the table reads as "any", not as the initial.
 */
function writeFilters(filters, values) {
  const hash = location.hash || "#/";
  const cut = hash.indexOf("?");
  const params = new URLSearchParams(cut < 0 ? "" : hash.slice(cut + 1));
  for (const f of filters) {
    if (values[f.name]) params.set(f.name, values[f.name]);
    else if (f.initial) params.set(f.name, "");
    else params.delete(f.name);
  }
  const q = params.toString();
  history.replaceState(history.state, "", `${cut < 0 ? hash : hash.slice(0, cut)}${q ? `?${q}` : ""}`);
}

export function dataTable(ctx, { caption, columns, filters = [], paging = "client", pageSize = 25, load, emptyText, rowKey }) {
  const id = `t${++tableSeq}`;
  const state = { filters: {}, sort: null, dir: 1, page: 0, cursors: [null], rows: [], next: null, all: null, find: "" };
  for (const f of filters) {
    const v = ctx.query[f.name] ?? f.initial;
    if (v) state.filters[f.name] = v;
  }

  const root = h("div", { class: "datatable", id });
  const status = h("p", { class: "muted", role: "status", "aria-live": "polite" });
  const body = h("div", { class: "table-wrap" });
  const pager = h("div", { class: "pager" });

  const inputs = filters.map((f) => {
    const fid = `${id}-${f.name}`;
    const input = f.options
      ? h("select", { id: fid, name: f.name }, f.options.map((o) => h("option", { value: o, selected: state.filters[f.name] === o ? true : null }, o || "any")))
      : h("input", { id: fid, name: f.name, value: state.filters[f.name] || "", autocomplete: "off" });
    return { f, input, node: h("label", { for: fid }, f.label, input) };
  });
  const findId = `${id}-find`;
  const find = h("input", { id: findId, type: "search", autocomplete: "off" });
  find.addEventListener("input", () => { state.find = find.value.toLowerCase(); draw(); });
  const form = h("form", { class: "filters", role: "search", "aria-label": `Filter ${caption}` },
    inputs.map((i) => i.node),
    filters.length ? h("button", { type: "submit" }, "Apply filters") : null,
    h("label", { for: findId }, "Find in rows", find));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.filters = {};
    for (const { f, input } of inputs) if (input.value) state.filters[f.name] = input.value;
    state.page = 0; state.cursors = [null]; state.all = null;
    writeFilters(filters, state.filters);
    fetchPage();
  });
  root.append(form, status, body, pager);

  const valueOf = (c, row) => (c.value ? c.value(row) : row[c.key]);
  const cell = (c, row) => {
    if (c.render) return c.render(row);
    const v = row[c.key];
    return v === null || v === undefined || v === "" ? "—" : String(v);
  };

  function visibleRows() {
    let rows = paging === "client" ? state.all || [] : state.rows;
    if (state.find) {
      rows = rows.filter((r) => columns.some((c) => String(valueOf(c, r) ?? "").toLowerCase().includes(state.find)));
    }
    if (state.sort) {
      const c = columns.find((x) => x.key === state.sort);
      rows = [...rows].sort((a, b) => {
        const x = valueOf(c, a), y = valueOf(c, b);
        if (x === y) return 0;
        if (x === null || x === undefined) return 1;
        if (y === null || y === undefined) return -1;
        const nx = Number(x), ny = Number(y);
        const cmp = !Number.isNaN(nx) && !Number.isNaN(ny) && x !== "" && y !== "" ? nx - ny : String(x).localeCompare(String(y));
        return cmp * state.dir;
      });
    }
    if (paging === "client") rows = rows.slice(state.page * pageSize, (state.page + 1) * pageSize);
    return rows;
  }

  function draw() {
    const rows = visibleRows();
    const head = h("tr", {}, columns.map((c) => {
      const sorted = state.sort === c.key;
      const ariaSort = sorted ? (state.dir > 0 ? "ascending" : "descending") : null;
      if (c.sort === false) return h("th", { scope: "col" }, c.label);
      return h("th", { scope: "col", "aria-sort": ariaSort },
        h("button", { type: "button", class: "sort", "data-sort": c.key, onclick: () => {
          if (state.sort === c.key) state.dir = -state.dir; else { state.sort = c.key; state.dir = 1; }
          draw();
          root.querySelector(`button[data-sort="${c.key}"]`)?.focus();
        } }, c.label, h("span", { "aria-hidden": "true" }, sorted ? (state.dir > 0 ? " ▲" : " ▼") : "")));
    }));
    const tbody = h("tbody", {}, rows.map((r) => h("tr", { "data-key": rowKey ? rowKey(r) : null }, columns.map((c) => h("td", {}, cell(c, r))))));
    if (!rows.length) {
      body.replaceChildren(empty(state.find ? "No row on this page matches the text." : emptyText || `No ${caption} yet.`));
    } else {
      body.replaceChildren(h("table", { "aria-describedby": `${id}-cap` }, h("caption", { id: `${id}-cap` }, caption), h("thead", {}, head), tbody));
    }
    const total = paging === "client" ? (state.all || []).length : null;
    const hasNext = paging === "client" ? (state.page + 1) * pageSize < total : Boolean(state.next);
    const from = state.page * pageSize;
    status.textContent = paging === "client"
      ? `${total} ${caption}; page ${state.page + 1} of ${Math.max(1, Math.ceil(total / pageSize))}`
      : `${caption}: page ${state.page + 1}, rows ${rows.length ? from + 1 : 0}–${from + state.rows.length}`;
    pager.replaceChildren(
      h("button", { type: "button", disabled: state.page === 0, "data-page": "prev", onclick: () => { state.page -= 1; turn(); } }, "Previous page"),
      h("button", { type: "button", disabled: !hasNext, "data-page": "next", onclick: () => { state.page += 1; turn(); } }, "Next page"));
  }

  function turn() {
    if (paging === "client") draw(); else fetchPage();
  }

  async function fetchPage() {
    status.textContent = `Loading ${caption}…`;
    root.setAttribute("aria-busy", "true");
    try {
      if (paging === "client") {
        if (!state.all) state.all = (await load({ filters: state.filters })).rows;
      } else if (paging === "offset") {
        const res = await load({ filters: state.filters, offset: state.page * pageSize, limit: pageSize + 1 });
        state.rows = res.rows.slice(0, pageSize);
        state.next = res.rows.length > pageSize;
      } else {
        const res = await load({ filters: state.filters, cursor: state.cursors[state.page], limit: pageSize });
        state.rows = res.rows;
        state.next = res.next || null;
        state.cursors[state.page + 1] = res.next || null;
      }
      draw();
    } catch (e) {
      body.replaceChildren(failure(e));
      status.textContent = "";
    } finally {
      root.removeAttribute("aria-busy");
    }
  }

  root.ready = fetchPage();
  /** Load again from the API (live panels call it when an event arrives). */
  root.reload = () => { state.all = null; return fetchPage(); };
  return root;
}

// -- charts --------------------------------------------------------------------------------

const PALETTE = ["#0a58ca", "#b42318", "#1a7f37", "#8a5a00", "#6f42c1", "#0e7490", "#be185d", "#4d5562"];
// Series that mean the same thing have the same colour on every chart.
const MEANING = { deny: "#b42318", stopped: "#b42318", critical: "#b42318", warn: "#8a5a00", high: "#c2410c", medium: "#8a5a00",
  allow: "#1a7f37", completed: "#1a7f37", low: "#0e7490", failed: "#4d5562", opened: "#b42318", resolved: "#1a7f37" };
const colourOf = (label, i) => MEANING[label] || PALETTE[i % PALETTE.length];

/**
 * A Chart.js chart with a text alternative: the canvas carries an aria-label summary and a
 * visually hidden table holds every figure. With no data, an empty state instead.
 * spec: {title, type, labels, series: [{label, data}], summary, emptyText, stacked?}
 */
export function chart({ title, type = "bar", labels, series, summary, emptyText, stacked = false, unit = "" }) {
  const hasData = labels.length && series.some((s) => s.data.some((v) => Number(v) !== 0 && v !== null));
  if (!hasData) return h("figure", { class: "chart-figure" }, h("figcaption", {}, title), empty(emptyText));
  const canvas = h("canvas", { role: "img", "aria-label": `${title}. ${summary}` });
  const table = h("table", { class: "visually-hidden" }, h("caption", {}, `${title} (figures)`),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Label"), series.map((s) => h("th", { scope: "col" }, s.label)))),
    h("tbody", {}, labels.map((l, i) => h("tr", {}, h("th", { scope: "row" }, String(l)), series.map((s) => h("td", {}, `${unit}${s.data[i] ?? 0}`))))));
  const fig = h("figure", { class: "chart-figure", "data-chart": title }, h("figcaption", {}, title), h("div", { class: "chart" }, canvas), table);
  const draw = () => {
    if (typeof Chart === "undefined") { fig.append(empty("The chart library did not load; the figures are in the table.")); return; }
    const round = type === "doughnut" || type === "pie";
    new Chart(canvas, {
      type,
      data: { labels, datasets: series.map((s, i) => round
        ? { label: s.label, data: s.data, backgroundColor: labels.map((_, j) => PALETTE[j % PALETTE.length]) }
        : { label: s.label, data: s.data, backgroundColor: colourOf(s.label, i), borderColor: colourOf(s.label, i) }) },
      options: { responsive: true, maintainAspectRatio: false, animation: false,
        scales: round ? {} : { x: { stacked }, y: { stacked, beginAtZero: true } } },
    });
  };
  queueMicrotask(draw);
  return fig;
}

/** Pivot rows [{[x]:.., [s]:.., [v]:..}] into chart labels and series. */
export function pivot(rows, x, s, v) {
  const labels = [...new Set(rows.map((r) => r[x]))].sort();
  const names = [...new Set(rows.map((r) => (s ? r[s] : v)))];
  const series = names.map((name) => ({ label: String(name ?? "—"), data: labels.map((l) =>
    rows.filter((r) => r[x] === l && (!s || r[s] === name)).reduce((a, r) => a + Number(r[v] || 0), 0)) }));
  return { labels, series };
}

/** Rows of an analytics answer ({columns, rows}) as objects. */
export function records(answer) {
  if (!answer) return [];
  return answer.rows.map((r) => Object.fromEntries(answer.columns.map((c, i) => [c, r[i]])));
}

export { h, empty, failure, panelHref, viewHref };
