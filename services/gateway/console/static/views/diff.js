// The diff viewer (#/view/diff/<diff_hash>): two agent specs or two bundles compared, row by row,
// with locked and enforced rows marked and the policy notes shown. A diff may hold 100,000 rows:
// pages come from the server by cursor (GET /v1/diffs/{hash}), and only the rows in sight are
// in the DOM (a table between two spacer rows), so a 10,000-row diff scrolls as a 10-row one.
//
// Without an id, the view is a form that creates a diff (POST /v1/diffs) from two uploaded
// bundles or two agent specs, then opens it; below it, the tenant's recent diffs (GET
// /v1/diffs), each opening its viewer.
import { dataTable } from "../panels/lib.js";
import { useStyles, when } from "./pol-common.js";

const ROW_HEIGHT = 30; // px; every row is one line (long values are cut, the whole in a tooltip)
const VIEWPORT_ROWS = 16; // rows in sight at once
const OVERSCAN = 8; // rows rendered above and below the viewport
const PAGE = 1000; // rows per request (the server's maximum)
const CELL_CHARS = 160; // characters of a value shown in a cell

/** A value as one line of text (compact JSON for anything that is not a string). */
function text(value) {
  if (value === undefined || value === null) return "";
  return typeof value === "string" ? value : JSON.stringify(value);
}

function cut(value) {
  const t = text(value);
  return t.length > CELL_CHARS ? `${t.slice(0, CELL_CHARS)}…` : t;
}

/** The pages of one diff in one view, fetched in order as the reader needs them. */
class Pages {
  constructor(api, hash, view) {
    this.api = api; this.hash = hash; this.view = view;
    this.rows = []; this.cursor = undefined; this.head = null; this.pending = null;
  }

  get total() { return this.head ? this.head.total : 0; }
  get complete() { return this.head !== null && this.cursor === null; }

  /** Follow the cursors until at least `count` rows are held (or the diff ends). */
  async until(count) {
    while (!this.complete && this.rows.length < count) {
      if (!this.pending) {
        this.pending = this.api(`/v1/diffs/${encodeURIComponent(this.hash)}`, {
          query: { limit: PAGE, view: this.view, cursor: this.cursor || undefined },
        }).then((page) => {
          if (!this.head) this.head = page;
          for (const row of page.rows) this.rows[row.index] = row;
          this.cursor = page.next_cursor;
        }).finally(() => { this.pending = null; });
      }
      await this.pending;
    }
  }
}

function marks(h, row) {
  return h("span", { class: "marks" },
    row.locked ? h("span", { class: "badge locked", title: "A locked field: it may not change without an admin" }, "locked") : null,
    row.enforced ? h("span", { class: "badge enforced", title: "Changes what admission decides" }, "enforced") : null);
}

function notes(h, row) {
  const parts = [...row.notes];
  if (row.policies.length) parts.unshift(`policies: ${row.policies.join(", ")}`);
  const t = parts.join("; ");
  return h("td", { class: "cell", title: t }, t);
}

const COLUMNS = {
  structured: ["#", "Section", "Path", "Change", "Old", "New", "Marks", "Policy notes"],
  "side-by-side": ["#", "Section", "Path", "Change", "Left", "Right", "Marks", "Policy notes"],
};

function cells(h, row, view) {
  const change = h("td", {}, h("span", { class: `change ${row.change}` }, row.change));
  const lead = [
    h("td", { class: "num" }, h("button", { type: "button", class: "link", "data-detail": String(row.index), "aria-label": `Row ${row.index + 1}: show it whole` }, String(row.index + 1))),
    h("td", { class: "cell", title: row.section }, row.section),
    h("td", { class: "cell", title: row.path }, row.path),
    change,
  ];
  let left, right;
  if (view === "side-by-side") {
    const side = (c) => (c === null || c === undefined ? "" : c.truncated ? "(over 16 KiB: not shown)" : `${c.line !== null ? `${c.line}: ` : ""}${c.text}`);
    left = side(row.left); right = side(row.right);
  } else {
    const line = (n) => (n === null || n === undefined ? "" : `${n}: `);
    left = row.kind === "line" ? `${line(row.old_line)}${text(row.old)}` : text(row.old);
    right = row.kind === "line" ? `${line(row.new_line)}${text(row.new)}` : text(row.new);
  }
  return [
    ...lead,
    h("td", { class: "cell old", title: left.slice(0, 2000) }, cut(left)),
    h("td", { class: "cell new", title: right.slice(0, 2000) }, cut(right)),
    h("td", {}, marks(h, row)),
    notes(h, row),
  ];
}

function matches(row, filter) {
  if (filter.locked && !row.locked) return false;
  if (filter.enforced && !row.enforced) return false;
  if (filter.change && row.change !== filter.change) return false;
  if (!filter.text) return true;
  const hay = `${row.section} ${row.path} ${row.notes.join(" ")} ${row.policies.join(" ")} ${text(row.old)} ${text(row.new)}`;
  return hay.toLowerCase().includes(filter.text);
}

/** The viewer of one diff. */
async function viewer(el, ctx) {
  const { api, h, toast, failure, empty } = ctx;
  const hash = ctx.id;
  let view = ctx.query.view === "side-by-side" ? "side-by-side" : "structured";
  let pages = new Pages(api, hash, view);
  let order = null; // the filtered rows' indexes, or null for every row
  const filter = { text: "", locked: false, enforced: false, change: "" };
  let seenEnd = false;

  const status = h("p", { class: "muted", role: "status", "aria-live": "polite" });
  const summary = h("div", { class: "cards" });
  const identity = h("p", { class: "muted" });
  const head = h("thead", {});
  const body = h("tbody", {});
  const table = h("table", { class: "diff-table", "aria-label": "Diff rows", "aria-rowcount": "0" }, head, body);
  const scroller = h("div", {
    class: "diff-scroll", tabindex: "0", role: "region",
    "aria-label": "Diff rows: arrow keys, Page Up, Page Down, Home and End scroll",
    style: `height:${(VIEWPORT_ROWS + 1) * ROW_HEIGHT}px`,
  }, table);

  const count = () => (order ? order.length : pages.total);
  const rowAt = (i) => pages.rows[order ? order[i] : i];

  function header() {
    head.replaceChildren(h("tr", {}, COLUMNS[view].map((c) => h("th", { scope: "col" }, c))));
  }

  let drawing = false, again = false;
  async function draw() {
    if (drawing) { again = true; return; }
    drawing = true;
    try {
      do {
        again = false;
        const n = count();
        const first = Math.max(0, Math.floor(scroller.scrollTop / ROW_HEIGHT) - OVERSCAN);
        const last = Math.min(n, first + VIEWPORT_ROWS + 2 * OVERSCAN + 1);
        if (!order && last > pages.rows.length) {
          status.textContent = `Loading rows ${pages.rows.length + 1} to ${last}…`;
          await pages.until(last);
        }
        // Near the end of what is held: ask for the next page before the reader gets there.
        if (!order && !pages.complete && pages.rows.length - last < PAGE / 2) {
          pages.until(pages.rows.length + 1).catch(() => { /* shown when the rows are needed */ });
        }
        const rows = [];
        for (let i = first; i < last; i += 1) {
          const row = rowAt(i);
          if (!row) continue;
          rows.push(h("tr", { "data-row": String(row.index), "aria-rowindex": String(i + 2), class: row.locked ? "locked" : null }, cells(h, row, view)));
        }
        const spacer = (px) => h("tr", { class: "spacer", "aria-hidden": "true", style: `height:${px}px` }, h("td", { colspan: String(COLUMNS[view].length) }));
        body.replaceChildren(spacer(first * ROW_HEIGHT), ...rows, spacer(Math.max(0, (n - last) * ROW_HEIGHT)));
        table.setAttribute("aria-rowcount", String(n + 1));
        if (n > 0 && last >= n && !seenEnd) { seenEnd = true; ackReady(); }
        status.textContent = n === 0
          ? (order ? "No row matches the filter." : "The two sides are the same: no row.")
          : `Rows ${Math.min(first + OVERSCAN, n - 1) + 1} to ${Math.min(last, first + OVERSCAN + VIEWPORT_ROWS)} of ${n.toLocaleString()}${order ? ` (filtered from ${pages.total.toLocaleString()})` : ""}.`;
      } while (again);
    } catch (e) {
      status.replaceChildren(failure(e));
    } finally {
      drawing = false;
    }
  }

  function scrollBy(rows) {
    scroller.scrollTop = Math.max(0, scroller.scrollTop + rows * ROW_HEIGHT);
  }
  scroller.addEventListener("scroll", () => { draw(); });
  scroller.addEventListener("keydown", (ev) => {
    const moves = { ArrowDown: 1, ArrowUp: -1, PageDown: VIEWPORT_ROWS, PageUp: -VIEWPORT_ROWS };
    if (ev.key in moves) { scrollBy(moves[ev.key]); ev.preventDefault(); }
    else if (ev.key === "Home") { scroller.scrollTop = 0; ev.preventDefault(); }
    else if (ev.key === "End") { scroller.scrollTop = scroller.scrollHeight; ev.preventDefault(); }
  });

  async function applyFilter() {
    const active = filter.text || filter.locked || filter.enforced || filter.change;
    if (active) {
      if (!pages.complete) {
        status.textContent = `Loading all ${pages.total.toLocaleString()} rows to filter them…`;
        await pages.until(pages.total);
      }
      order = [];
      for (let i = 0; i < pages.total; i += 1) if (matches(pages.rows[i], filter)) order.push(i);
    } else {
      order = null;
    }
    scroller.scrollTop = 0;
    await draw();
  }

  // -- acknowledgement: after the last row was in sight, or with an explicit checkbox --------
  const ackList = h("ul", { class: "acks" });
  const ackButton = h("button", { type: "button", class: "primary", disabled: true }, "Acknowledge this diff");
  const ackCheck = h("input", { type: "checkbox", id: "diff-ack-anyway" });
  const ackNote = h("p", { class: "muted", id: "diff-ack-note" }, "Scroll to the last row, or tick the box, to acknowledge.");
  function ackReady() {
    ackButton.disabled = false;
    ackNote.textContent = "You have seen the last row.";
  }
  ackCheck.addEventListener("change", () => { if (ackCheck.checked) ackButton.disabled = false; else if (!seenEnd) ackButton.disabled = true; });
  ackButton.addEventListener("click", async () => {
    try {
      const res = await api(`/v1/diffs/${encodeURIComponent(hash)}/acknowledge`, { method: "POST" });
      ackList.replaceChildren(...res.acknowledgements.map((a) => h("li", {}, `${a.actor} at ${a.acknowledged_at}`)));
      toast("Diff acknowledged.");
    } catch (e) {
      ackList.replaceChildren(h("li", {}, failure(e)));
    }
  });

  // -- controls ---------------------------------------------------------------------------------
  const search = h("input", { id: "diff-filter", type: "search", placeholder: "path, section, note, value" });
  const locked = h("input", { id: "diff-locked", type: "checkbox" });
  const enforced = h("input", { id: "diff-enforced", type: "checkbox" });
  const change = h("select", { id: "diff-change" },
    h("option", { value: "" }, "any"), h("option", { value: "added" }, "added"),
    h("option", { value: "removed" }, "removed"), h("option", { value: "changed" }, "changed"));
  let typing = null;
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { filter.text = search.value.trim().toLowerCase(); applyFilter(); }, 200);
  });
  locked.addEventListener("change", () => { filter.locked = locked.checked; applyFilter(); });
  enforced.addEventListener("change", () => { filter.enforced = enforced.checked; applyFilter(); });
  change.addEventListener("change", () => { filter.change = change.value; applyFilter(); });

  // Structured or side by side: two buttons, the current one pressed.
  const modes = ["structured", "side-by-side"].map((m) => h("button", {
    type: "button", "aria-pressed": String(m === view), "data-mode": m,
  }, m === "structured" ? "Structured" : "Side by side"));
  const toggle = h("span", { role: "group", "aria-label": "Diff view", class: "modes" }, modes);
  for (const button of modes) {
    button.addEventListener("click", async () => {
      if (button.dataset.mode === view) return;
      view = button.dataset.mode;
      for (const b of modes) b.setAttribute("aria-pressed", String(b.dataset.mode === view));
      const keep = scroller.scrollTop;
      // Both views are the same rows: the rows already held are fetched again in the new view.
      const held = pages.rows.length;
      pages = new Pages(api, hash, view);
      try { await pages.until(Math.max(held, 1)); } catch (e) { status.replaceChildren(failure(e)); return; }
      header();
      if (order) await applyFilter(); else { scroller.scrollTop = keep; await draw(); }
    });
  }

  // One row whole: its values as indented JSON, its notes and the policies it touches.
  const detail = h("section", { id: "diff-row-detail", "aria-live": "polite", "aria-label": "The row shown whole" });
  scroller.addEventListener("click", (ev) => {
    const button = ev.target.closest("button[data-detail]");
    if (!button) return;
    const row = pages.rows[Number(button.dataset.detail)];
    const pretty = (v) => (v === undefined || v === null ? "—" : typeof v === "string" ? v : JSON.stringify(v, null, 2));
    const sides = view === "side-by-side" ? [row.left && row.left.text, row.right && row.right.text] : [row.old, row.new];
    detail.replaceChildren(
      h("h2", {}, `Row ${row.index + 1}: ${row.change} ${row.kind} `, h("code", {}, row.path)),
      h("p", {}, `Section ${row.section}. `, marks(h, row)),
      h("div", { class: "sides" },
        h("div", {}, h("h3", {}, view === "side-by-side" ? "Left" : "Old"), h("pre", { class: "spec", tabindex: "0" }, pretty(sides[0]))),
        h("div", {}, h("h3", {}, view === "side-by-side" ? "Right" : "New"), h("pre", { class: "spec", tabindex: "0" }, pretty(sides[1])))),
      row.policies.length ? h("p", {}, "Policies: ", row.policies.map((id, i) => [i ? ", " : "", h("a", { href: ctx.panelHref("POL-GOV-ACT", "O3", { policy_id: id }) }, id)])) : null,
      row.notes.length ? h("ul", {}, row.notes.map((n) => h("li", {}, n))) : null);
  });

  el.append(
    identity, summary,
    h("div", { class: "filters", role: "group", "aria-label": "Filter the rows" },
      h("label", { for: "diff-filter" }, "Filter", search),
      h("label", { for: "diff-change" }, "Change", change),
      h("label", { for: "diff-locked", class: "inline" }, locked, " locked only"),
      h("label", { for: "diff-enforced", class: "inline" }, enforced, " enforced only"),
      toggle),
    status, scroller, detail,
    h("section", { "aria-labelledby": "diff-ack-h" },
      h("h2", { id: "diff-ack-h" }, "Acknowledgement"), ackNote,
      h("label", { for: "diff-ack-anyway", class: "inline" }, ackCheck, " I reviewed this diff without scrolling to its end"),
      " ", ackButton, ackList),
  );

  try {
    await pages.until(1);
  } catch (e) {
    el.replaceChildren(failure(e));
    return;
  }
  const p = pages.head;
  const side = (x) => x.bundle_digest || x.document || JSON.stringify(x);
  identity.replaceChildren(`${p.kind === "bundles" ? "Bundles" : "Agent specs"} · ${side(p.old)} → ${side(p.new)} · `, h("code", {}, p.diff_hash));
  const s = p.summary;
  summary.replaceChildren(...[["Rows", s.rows], ["Added", s.added], ["Removed", s.removed], ["Changed", s.changed], ["Locked", s.locked], ["Enforced", s.enforced]]
    .map(([label, value]) => h("div", { class: "card" }, h("div", { class: "value" }, Number(value).toLocaleString()), h("div", { class: "label" }, label))));
  if (p.total === 0) el.append(empty("The two sides are the same: this diff has no row."));
  header();
  await draw();
}

const shortHash = (value) => (value ? `${value.slice(0, 19)}…` : "—");

/** The tenant's diffs, the most recently asked for first, a page at a time. */
function recentDiffs(ctx) {
  const { api, h, viewHref } = ctx;
  const side = (x) => (x ? x.bundle_digest || x.document : null);
  const n = (v) => Number(v).toLocaleString("en");
  const counts = (s) => (s
    ? `${n(s.rows)} row${s.rows === 1 ? "" : "s"}: ${n(s.added)} added, ${n(s.removed)} removed, ${n(s.changed)} changed${s.locked ? `, ${n(s.locked)} locked` : ""}`
    : "—");
  return dataTable(ctx, {
    caption: "Recent diffs",
    paging: "cursor",
    pageSize: 10,
    rowKey: (d) => d.diff_hash,
    emptyText: "No diff yet: compare two bundles or two agent specs above.",
    columns: [
      { key: "diff_hash", label: "Diff", render: (d) => h("a", { href: viewHref("diff", d.diff_hash), "data-diff": d.diff_hash, title: d.diff_hash }, shortHash(d.diff_hash)) },
      { key: "kind", label: "Of", render: (d) => (d.kind === "bundles" ? "bundles" : d.kind === "documents" ? "agent specs" : "—") },
      { key: "compared", label: "Compared", value: (d) => `${side(d.old) || ""} ${side(d.new) || ""}`,
        render: (d) => (d.old && d.new ? h("span", {}, h("code", { title: side(d.old) }, shortHash(side(d.old))), " → ", h("code", { title: side(d.new) }, shortHash(side(d.new)))) : "—") },
      { key: "rows", label: "Rows", value: (d) => (d.summary ? d.summary.rows : null), render: (d) => counts(d.summary) },
      { key: "requested_by", label: "Asked by" },
      { key: "requested_at", label: "When", render: (d) => when(d.requested_at) },
    ],
    load: async ({ cursor, limit }) => {
      const res = await api("/v1/diffs", { query: { cursor: cursor || undefined, limit } });
      return { rows: res.diffs, next: res.next_cursor };
    },
  });
}

/** The form that makes a diff: two bundles of the tenant, or two agent specs as JSON. */
async function creator(el, ctx) {
  const { api, h, failure, navigate, viewHref } = ctx;
  const out = h("div", { "aria-live": "polite" });
  const oldDigest = h("input", { id: "diff-old-digest", size: "80", placeholder: "sha256:…", value: ctx.query.old_digest || "" });
  const newDigest = h("input", { id: "diff-new-digest", size: "80", placeholder: "sha256:…", value: ctx.query.new_digest || "" });
  const oldSpec = h("textarea", { id: "diff-old-spec", rows: "8", cols: "60" });
  const newSpec = h("textarea", { id: "diff-new-spec", rows: "8", cols: "60" });
  const lockedFields = h("input", { id: "diff-locked-fields", size: "60", placeholder: "limits, identity.owner" });
  const digests = h("datalist", { id: "diff-digests" });
  try {
    for (const environment of ["production", "sandbox"]) {
      const listing = await api("/v1/policy-bundles", { query: { environment } });
      for (const b of listing.bundles) digests.append(h("option", { value: b.bundle_digest }, `${environment} revision ${b.revision}`));
    }
    oldDigest.setAttribute("list", "diff-digests"); newDigest.setAttribute("list", "diff-digests");
  } catch { /* the digests are typed then */ }
  const fields = () => lockedFields.value.split(",").map((s) => s.trim()).filter(Boolean);
  const submit = async (body) => {
    out.replaceChildren();
    try {
      const page = await api("/v1/diffs", { method: "POST", body: { ...body, locked_fields: fields(), limit: 1 } });
      navigate(viewHref("diff", page.diff_hash));
    } catch (e) { out.replaceChildren(failure(e)); }
  };
  el.append(
    h("p", {}, "Compare two of the tenant's uploaded policy bundles, or two agent specs."),
    h("label", { for: "diff-locked-fields" }, "Locked fields (comma separated, optional) "), lockedFields,
    h("form", { class: "stack", onsubmit: (ev) => { ev.preventDefault(); submit({ old_digest: oldDigest.value.trim(), new_digest: newDigest.value.trim() }); } },
      h("h2", {}, "Two bundles"), digests,
      h("label", { for: "diff-old-digest" }, "Old bundle digest"), oldDigest,
      h("label", { for: "diff-new-digest" }, "New bundle digest"), newDigest,
      h("button", { type: "submit" }, "Compare bundles")),
    h("form", { class: "stack", onsubmit: (ev) => {
      ev.preventDefault();
      let a, b;
      try { a = JSON.parse(oldSpec.value); b = JSON.parse(newSpec.value); } catch (e) { out.replaceChildren(failure(`Both specs must be JSON: ${e.message}`)); return; }
      submit({ old_spec: a, new_spec: b });
    } },
      h("h2", {}, "Two agent specs"),
      h("label", { for: "diff-old-spec" }, "Old spec (JSON)"), oldSpec,
      h("label", { for: "diff-new-spec" }, "New spec (JSON)"), newSpec,
      h("button", { type: "submit" }, "Compare specs")),
    out);
  const recent = recentDiffs(ctx);
  el.append(h("h2", {}, "Recent diffs"), recent);
  await recent.ready;
}

export const diff = {
  title: "Diff",
  nav: false,
  render: async (el, ctx) => { useStyles(); return ctx.id ? viewer(el, ctx) : creator(el, ctx); },
};
