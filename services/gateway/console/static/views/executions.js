// The workflow executions, newest first (GET /v1/executions), with filters and keyset paging.
import { badge, dayStart, field, links, when } from "./flow-common.js";

const STATUSES = ["", "pending", "running", "completed", "failed", "aborted"];

export async function renderExecutions(el, ctx) {
  const { api, h, empty, failure, query, viewHref } = ctx;
  const status = h("select", { id: "ex-status", name: "status" },
    STATUSES.map((s) => h("option", { value: s, selected: s === (query.status || "") }, s || "any")));
  const workflow = h("input", { id: "ex-workflow", name: "workflow_id", value: query.workflow_id || "", autocomplete: "off" });
  const after = h("input", { id: "ex-after", name: "started_after", type: "date", value: query.started_after || "" });
  const before = h("input", { id: "ex-before", name: "started_before", type: "date", value: query.started_before || "" });
  const results = h("div", { "aria-live": "polite" });
  const cursors = [null];

  const load = async () => {
    results.replaceChildren(h("p", { class: "muted" }, "Loading executions…"));
    let page;
    try {
      page = await api("/v1/executions", {
        query: {
          status: status.value, workflow_id: workflow.value.trim(),
          started_after: dayStart(after.value), started_before: dayStart(before.value),
          cursor: cursors[cursors.length - 1], limit: 50,
        },
      });
    } catch (e) { results.replaceChildren(failure(e)); return; }
    const rows = page.executions || [];
    if (!rows.length) {
      results.replaceChildren(empty("No execution matches. Start one with POST /v1/workflows/{id}/executions or `mctl workflow run`."));
      return;
    }
    const prev = h("button", { type: "button", disabled: cursors.length < 2,
      onclick: () => { cursors.pop(); load(); } }, "Previous page");
    const next = h("button", { type: "button", disabled: !page.next_cursor,
      onclick: () => { cursors.push(page.next_cursor); load(); } }, "Next page");
    results.replaceChildren(
      h("table", { "aria-label": "Workflow executions" },
        h("thead", {}, h("tr", {}, ["Execution", "Workflow", "Status", "Started", "Finished", "Approvals"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, rows.map((x) => h("tr", { "data-execution": x.execution_id },
          h("td", {}, h("a", { href: links.execution(x.execution_id) }, x.execution_id)),
          h("td", {}, h("a", { href: viewHref("executions", null, { workflow_id: x.workflow_id }), "aria-label": `Executions of ${x.workflow_id}` }, x.workflow_id),
            ` v${x.workflow_version}`),
          h("td", {}, badge(x.status)),
          h("td", {}, when(x.started_at)),
          h("td", {}, when(x.finished_at)),
          h("td", {}, x.status === "running" ? h("a", { href: links.approvals(x.execution_id) }, "waiting steps") : "–"))))),
      h("div", { class: "pager" }, prev, next, h("span", { class: "muted" }, `page ${cursors.length}`)));
  };

  const form = h("form", { class: "filters", onsubmit: (ev) => { ev.preventDefault(); cursors.splice(1); load(); } },
    field("Status", status), field("Workflow", workflow),
    field("Started on or after", after), field("Started before", before),
    h("button", { type: "submit" }, "Filter"));
  el.append(form, results);
  await load();
}
