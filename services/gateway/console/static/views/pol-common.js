// What the policy, agent and diff views share: their stylesheet and the policy banners.

let styled = false;

/** Load views/pol.css once. */
export function useStyles() {
  if (styled) return;
  styled = true;
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = "/console/views/pol.css";
  document.head.append(link);
}

/** A banner of reasons ({policy_id, message, runbook_url}) of one kind (deny, warn, info). */
export function reasonsBanner(h, kind, title, reasons) {
  return h("div", { class: `banner ${kind}`, role: kind === "deny" ? "alert" : "status", "data-banner": kind },
    h("strong", {}, title),
    h("ul", {}, reasons.map((r) => h("li", {},
      r.policy_id ? h("code", {}, r.policy_id) : null, r.policy_id ? ": " : null, r.message,
      r.runbook_url ? [" ", h("a", { href: r.runbook_url, target: "_blank", rel: "noopener" }, "runbook")] : null))));
}

/** A date-time as the reader's locale shows it (or an em dash). */
export function when(value) {
  if (!value) return "—";
  const d = new Date(value);
  return Number.isNaN(d.getTime()) ? String(value) : d.toLocaleString();
}

/** A table of rows with a header; `cols` are [label, (row) => cell]. */
export function table(h, label, cols, rows) {
  return h("table", { "aria-label": label },
    h("thead", {}, h("tr", {}, cols.map(([c]) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, cols.map(([, f]) => h("td", {}, f(r)))))));
}
