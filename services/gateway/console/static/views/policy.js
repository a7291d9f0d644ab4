// The policy lifecycle of the tenant (#/view/policy[?simulation_id=S]): the freeze and drift
// banners when either is active, what decides in each environment and the uploaded bundles,
// the reloads and their canaries (promote, abort), simulations of a bundle against recorded
// decisions with the recent ones listed, and the policy exceptions with their expiry (grant,
// revoke). See docs/policies.md.
import { dataTable, fmt } from "../panels/lib.js";
import { reasonsBanner, table, useStyles, when } from "./pol-common.js";

const ENVIRONMENTS = ["production", "sandbox"];
const POLL_MS = 1000;

const short = (digest) => (digest ? `${digest.slice(0, 19)}…` : "—");
const code = (h, digest) => h("code", { title: digest || "" }, short(digest));

/** A section whose body is filled by `fill`; an API error is shown in its place. */
async function section(el, ctx, id, title, fill) {
  const { h, failure } = ctx;
  const body = h("div", {});
  el.append(h("section", { class: "section", "aria-labelledby": id }, h("h2", { id }, title), body));
  try { await fill(body); } catch (e) { body.replaceChildren(failure(e)); }
}

/** A reason box and a button that POSTs {reason} (plus what `extra` adds) to `path`, for admins. */
function withReason(ctx, id, label, action) {
  const { h, failure, toast, navigate, viewHref } = ctx;
  const reason = h("input", { id, size: "36" });
  const out = h("span", { "aria-live": "polite" });
  return h("form", { class: "filters", onsubmit: async (ev) => {
    ev.preventDefault();
    out.replaceChildren();
    if (!reason.value.trim()) { out.replaceChildren(failure("Give a reason: it is recorded.")); return; }
    try { await action(reason.value.trim()); toast(`${label}: done.`); navigate(viewHref("policy")); } catch (e) { out.replaceChildren(failure(e)); }
  } }, h("label", { for: id }, "Reason (admins; recorded)", reason), h("button", { type: "submit" }, label), out);
}

/**
 * The freeze and drift banners, kept live: a freeze or drift that starts, ends, is overridden or
 * accepted (policy.freeze_* and policy.drift_* events on GET /v1/live) redraws them without a
 * reload. While an admin is typing a reason in a banner, it is not redrawn under them: a note
 * says it changed, with a button to show it.
 */
async function banners(el, ctx) {
  const { h } = ctx;
  const out = h("div", { id: "policy-banners" });
  el.append(out);
  const draw = async () => out.replaceChildren(...await bannerParts(ctx));
  await draw();
  let timer = null;
  const changed = () => {
    if ([...out.querySelectorAll("input")].some((i) => i.value)) {
      if (!out.querySelector("[data-banners-stale]")) {
        out.prepend(h("p", { class: "muted", role: "status", "data-banners-stale": "" },
          "The freeze or drift has changed since this was shown. ",
          h("button", { type: "button", onclick: draw }, "Show it now")));
      }
      return;
    }
    draw();
  };
  // The banners hold one of the tenant's live streams: when it is refused or lost, they say
  // they are not following instead of silently going stale.
  const following = h("p", { class: "muted", role: "status", "data-banners-live": "" });
  el.append(following);
  const stop = ctx.sse("/v1/live", (type) => {
    if (/^policy\.(freeze|drift)_/.test(String(type))) { clearTimeout(timer); timer = setTimeout(changed, 300); }
  }, { onState: (s, error) => {
    following.textContent = s === "open" ? ""
      : s === "retrying" ? `The banners are not following changes: ${ctx.retryMessage(error)}`
      : s === "failed" ? `The banners are not following changes (${error?.message || "refused"}); reload to see the current state.`
      : "";
  } });
  ctx.onLeave(() => { stop(); clearTimeout(timer); });
}

/** The banners as they stand: one per frozen environment, one for drift, or none. */
async function bannerParts(ctx) {
  const { api, h, failure, panelHref } = ctx;
  const out = [];
  const [freeze, drift] = await Promise.allSettled([api("/v1/policy-freeze"), api("/v1/policy-drift")]);
  if (freeze.status === "rejected") out.push(failure(freeze.reason));
  else {
    for (const env of freeze.value.environments.filter((e) => e.frozen)) {
      const banner = reasonsBanner(h, "deny", `Promotions into ${env.environment} are frozen: ${env.incidents.length} open incident${env.incidents.length === 1 ? "" : "s"} at or above ${env.threshold}`, []);
      banner.dataset.banner = "freeze";
      banner.querySelector("ul").replaceChildren(...env.incidents.map((i) => h("li", {},
        h("a", { href: panelHref("INC-EV-ACT", "O3", { incident_id: i.incident_id }) }, i.title || i.incident_id),
        ` (${i.severity}, opened ${when(i.opened_at)})${i.overridden_by ? `, overridden by ${i.overridden_by}` : ""}`)));
      banner.append(withReason(ctx, `freeze-${env.environment}`, `Let promotions into ${env.environment} through`,
        (reason) => api(`/v1/policy-freeze/${env.environment}:override`, { method: "POST", body: { reason } })));
      out.push(banner);
    }
  }
  if (drift.status === "rejected") out.push(failure(drift.reason));
  else if (drift.value.drifted || drift.value.blocking.length) {
    const d = drift.value;
    const lines = [
      ...d.blocking.map((b) => ({ message: b })),
      ...(d.dimensions.length ? [{ message: `Differs in: ${d.dimensions.join(", ")}` }] : []),
      ...(d.recorded && d.recorded.acknowledged_by ? [{ message: `Accepted by ${d.recorded.acknowledged_by}: ${d.recorded.acknowledged_reason}` }] : []),
    ];
    const banner = reasonsBanner(h, d.blocking.length ? "deny" : "warn", "Sandbox and production have drifted: they do not decide with the same policy", lines);
    banner.dataset.banner = "drift";
    if (d.blocking.length || !(d.recorded && d.recorded.acknowledged_by)) {
      // Accept the drift as it is now: record it (check), then acknowledge that very fingerprint.
      banner.append(withReason(ctx, "drift-reason", "Accept this drift", async (reason) => {
        const checked = await api("/v1/policy-drift:check", { method: "POST" });
        if (!checked.recorded) throw new Error("No drift on record any more: nothing to accept.");
        await api("/v1/policy-drift:acknowledge", { method: "POST", body: { reason, fingerprint: checked.recorded.fingerprint } });
      }));
    }
    out.push(banner);
  }
  return out;
}

async function bundles(body, ctx, policies) {
  const { api, h, empty, viewHref } = ctx;
  body.append(table(h, "What decides in each environment", [
    ["Environment", ([env]) => env],
    ["Bundle", ([, v]) => code(h, v.bundle_digest)],
    ["Source", ([, v]) => (v.source === "tenant" ? "the tenant's own" : "the repository's default")],
    ["Revision", ([, v]) => v.revision || "—"],
    ["Canary", ([, v]) => (v.canary ? `${short(v.canary.bundle_digest)} on ${v.canary.percent}% of runs` : "none")],
  ], Object.entries(policies.environments || {})));
  for (const environment of ENVIRONMENTS) {
    const listing = await api("/v1/policy-bundles", { query: { environment } });
    body.append(h("h3", {}, `Uploaded to ${environment}`));
    if (!listing.bundles.length) { body.append(empty(`No bundle of the tenant's own in ${environment}: the repository's bundle decides. Upload one with mctl policy push.`)); continue; }
    const active = listing.bundles.find((b) => b.active);
    body.append(table(h, `Bundles uploaded to ${environment}`, [
      ["Revision", (b) => b.revision],
      ["Digest", (b) => code(h, b.bundle_digest)],
      ["Signed by", (b) => b.signer_key_id],
      ["Active", (b) => (b.active ? "active" : "—")],
      ["Diff", (b) => (active && !b.active
        ? h("a", { href: viewHref("diff", null, { old_digest: active.bundle_digest, new_digest: b.bundle_digest }) }, "against the active one")
        : "—")],
    ], listing.bundles));
  }
  if (policies.policies.length) {
    body.append(h("h3", {}, "Policies of the active bundle"), table(h, "Policies", [
      ["Policy", (p) => h("a", { href: ctx.panelHref("POL-GOV-ACT", "O3", { policy_id: p.policy_id }) }, p.policy_id)],
      ["Title", (p) => p.title], ["Severity", (p) => p.severity],
      ["Open incidents", (p) => String(p.open_incidents)],
      ["Runbook", (p) => (p.runbook_url ? h("a", { href: p.runbook_url, target: "_blank", rel: "noopener" }, "runbook") : "—")],
    ], policies.policies));
  }
}

async function reloads(body, ctx) {
  const { api, h, empty, failure, toast, navigate, viewHref } = ctx;
  const listing = await api("/v1/policy-reloads");
  if (!listing.reloads.length) { body.append(empty("No reload yet: activating an uploaded bundle starts one, as a canary.")); return; }
  const out = h("div", { "aria-live": "polite" });
  const end = async (r, verb) => {
    out.replaceChildren();
    try {
      await api(`/v1/policy-reloads/${r.reload_id}:${verb}`, { method: "POST", body: { reason: `${verb} from the console` } });
      toast(`Reload ${verb === "promote" ? "promoted" : "aborted"}.`);
      navigate(viewHref("policy"));
    } catch (e) { out.replaceChildren(failure(e)); }
  };
  const arm = (a) => (a ? `${a.decisions} decisions, ${(a.deny_rate * 100).toFixed(1)}% denied, ${a.errors} errors` : "—");
  body.append(table(h, "Reloads, newest first", [
    ["Started", (r) => `${when(r.started_at)} by ${r.started_by}`],
    ["Environment", (r) => r.environment],
    ["Bundle", (r) => h("span", {}, code(h, r.bundle_digest), r.revision ? ` revision ${r.revision}` : "")],
    ["Status", (r) => h("span", { "data-reload-status": r.status }, r.status)],
    ["Canary", (r) => arm(r.figures.canary)],
    ["Stable", (r) => arm(r.figures.stable)],
    ["Outcome", (r) => [r.reason, r.detail].filter(Boolean).join(": ") || "—"],
    ["Actions", (r) => (r.status === "canary"
      ? h("span", { class: "actions" },
        h("button", { type: "button", onclick: () => end(r, "promote") }, "Promote"),
        h("button", { type: "button", onclick: () => end(r, "abort") }, "Abort"))
      : "—")],
  ], listing.reloads), out);
}

function report(h, sim) {
  const r = sim.report;
  return h("div", { id: "simulation-report" },
    h("p", {}, `${r.decisions} decisions replayed: ${r.flipped} flipped, ${r.waived} waived, ${r.errors} errors; ${r.runs_stopped} runs would have stopped, $${r.prevented_cost_usd} prevented.`),
    r.policies.length
      ? table(h, "The simulation per policy", [
        ["Policy", (p) => p.policy_id],
        ["Flips", (p) => String(p.flipped)],
        ["By kind", (p) => Object.entries(p.flips).filter(([, n]) => n).map(([k, n]) => `${k.replace(/_/g, " ")}: ${n}`).join(", ") || "—"],
        ["Runs stopped", (p) => String(p.runs_stopped)],
        ["Cost prevented (USD)", (p) => `${p.prevented_cost_usd}${p.unpriced_steps ? ` (+${p.unpriced_steps} unpriced steps)` : ""}`],
      ], r.policies)
      : h("p", { class: "empty" }, "No policy would decide differently in this window."));
}

/** The tenant's simulations, newest first, a page at a time (GET /v1/policy-simulations). */
function recentSimulations(ctx) {
  const { api, h, viewHref } = ctx;
  const outcome = (s) => {
    if (s.summary) return `${s.summary.flipped} of ${s.summary.decisions} decisions flipped, ${s.summary.runs_stopped} runs stopped`;
    if (s.status === "failed") return (s.error || "failed").slice(0, 120);
    if (s.status === "running" && s.progress.fraction !== undefined) return `${Math.round(s.progress.fraction * 100)}% done`;
    return "—";
  };
  return dataTable(ctx, {
    caption: "Recent simulations",
    paging: "cursor",
    pageSize: 10,
    rowKey: (s) => s.simulation_id,
    filters: [{ name: "status", label: "Status", options: ["", "queued", "running", "done", "failed"] }],
    emptyText: "No simulation yet: simulate an uploaded bundle above.",
    columns: [
      { key: "simulation_id", label: "Simulation", render: (s) => h("a", {
        href: viewHref("policy", null, { simulation_id: s.simulation_id }), "data-simulation": s.simulation_id, title: s.simulation_id,
      }, `${s.simulation_id.slice(0, 8)}…`) },
      { key: "status", label: "Status", render: (s) => fmt.status(s.status) },
      { key: "bundle", label: "Bundle", value: (s) => s.request.bundle_digest, render: (s) => h("span", {}, code(h, s.request.bundle_digest), ` in ${s.request.environment}`) },
      { key: "window", label: "Window", value: (s) => s.request.since,
        render: (s) => `${when(s.request.since)} to ${when(s.request.until)}${s.request.agent_id ? `, agent ${s.request.agent_id}` : ""}` },
      { key: "requested_by", label: "Requested by" },
      { key: "outcome", label: "Outcome", sort: false, render: outcome },
      { key: "created_at", label: "Started", render: (s) => when(s.created_at) },
    ],
    load: async ({ filters, cursor, limit }) => {
      const res = await api("/v1/policy-simulations", { query: { ...filters, cursor: cursor || undefined, limit } });
      return { rows: res.simulations, next: res.next_cursor };
    },
  });
}

async function simulations(body, ctx) {
  const { api, h, failure, navigate, viewHref, onLeave } = ctx;
  const out = h("div", { "aria-live": "polite", id: "simulation" });
  const digests = h("select", { id: "sim-digest" });
  for (const environment of ENVIRONMENTS) {
    const listing = await api("/v1/policy-bundles", { query: { environment } });
    for (const b of listing.bundles) digests.append(h("option", { value: `${environment} ${b.bundle_digest}` }, `${environment}: revision ${b.revision} (${short(b.bundle_digest)})`));
  }
  const now = new Date();
  const iso = (d) => d.toISOString().slice(0, 16);
  const since = h("input", { id: "sim-since", type: "datetime-local", value: iso(new Date(now.getTime() - 7 * 86400e3)) });
  const until = h("input", { id: "sim-until", type: "datetime-local", value: iso(new Date(now.getTime() + 60e3)) });
  const agent = h("input", { id: "sim-agent" });
  const start = h("button", { type: "submit", disabled: !digests.options.length }, "Simulate");
  if (!digests.options.length) body.append(h("p", { class: "empty" }, "No uploaded bundle to simulate: upload one first (mctl policy push)."));
  body.append(h("p", {}, "What an uploaded bundle would have decided on the decisions recorded in a window (UTC), per policy: decisions that flip, runs that would have stopped and the cost that prevents. Nothing is changed."),
    h("form", { class: "filters", onsubmit: async (ev) => {
      ev.preventDefault();
      out.replaceChildren();
      const [environment, digest] = digests.value.split(" ");
      try {
        const sim = await api("/v1/policy-simulations", { method: "POST", body: {
          bundle_digest: digest, environment,
          since: `${since.value}:00Z`, until: `${until.value}:00Z`,
          ...(agent.value.trim() ? { agent_id: agent.value.trim() } : {}),
        } });
        navigate(viewHref("policy", null, { simulation_id: sim.simulation_id }));
      } catch (e) { out.replaceChildren(failure(e)); }
    } },
    h("label", { for: "sim-digest" }, "Bundle", digests),
    h("label", { for: "sim-since" }, "Since (UTC)", since),
    h("label", { for: "sim-until" }, "Until (UTC)", until),
    h("label", { for: "sim-agent" }, "Agent (optional)", agent),
    start), out);
  const recent = recentSimulations(ctx);
  body.append(h("h3", {}, "Recent simulations"), recent);
  await recent.ready;
  const id = ctx.query.simulation_id;
  if (!id) return;
  let timer = null, stopped = false, waited = false;
  onLeave(() => { stopped = true; clearTimeout(timer); });
  const poll = async () => {
    try {
      const sim = await api(`/v1/policy-simulations/${encodeURIComponent(id)}`);
      const head = h("p", { "data-simulation-status": sim.status }, `Simulation ${sim.simulation_id} of ${short(sim.request.bundle_digest)}, by ${sim.requested_by}: ${sim.status}`,
        sim.status === "running" && sim.progress.fraction !== undefined ? ` (${Math.round(sim.progress.fraction * 100)}%, ${sim.progress.decisions || 0} decisions)` : "");
      const ended = sim.status === "done" || sim.status === "failed";
      if (sim.status === "done") out.replaceChildren(head, report(h, sim));
      else if (sim.status === "failed") out.replaceChildren(head, failure(sim.error || "failed"));
      else { out.replaceChildren(head); waited = true; if (!stopped) timer = setTimeout(poll, POLL_MS); }
      // The list showed it unfinished: show it as it ended.
      if (ended && waited && !stopped) recent.reload();
    } catch (e) { out.replaceChildren(failure(e)); }
  };
  await poll();
}

async function exceptions(body, ctx) {
  const { api, h, empty, failure, toast, navigate, viewHref } = ctx;
  const listing = await api("/v1/policy-exceptions");
  const out = h("div", { "aria-live": "polite" });
  const revoke = async (x) => {
    out.replaceChildren();
    try {
      await api(`/v1/policy-exceptions/${encodeURIComponent(x.exception_id)}:revoke`, { method: "POST", body: { reason: "revoked from the console" } });
      toast(`Exception ${x.exception_id} revoked.`);
      navigate(viewHref("policy"));
    } catch (e) { out.replaceChildren(failure(e)); }
  };
  const left = (x) => {
    const ms = new Date(x.expires_at).getTime() - Date.now();
    if (x.status !== "open" || ms <= 0) return when(x.expires_at);
    const hours = ms / 3600e3;
    return `${when(x.expires_at)} (in ${hours < 48 ? `${Math.max(1, Math.round(hours))} h` : `${Math.round(hours / 24)} days`})`;
  };
  if (listing.exceptions.length) {
    body.append(table(h, "Policy exceptions", [
      ["Policy", (x) => x.policy_id],
      ["For", (x) => (x.agent_id ? `agent ${x.agent_id}` : `run ${x.run_id}`)],
      ["Reason", (x) => x.reason],
      ["Granted", (x) => `${when(x.granted_at)} by ${x.granted_by}`],
      ["Expires", left],
      ["Status", (x) => h("span", { "data-exception-status": x.status }, x.status, x.closed_by ? ` (${x.closed_by})` : "")],
      ["Actions", (x) => (x.status === "open" ? h("button", { type: "button", onclick: () => revoke(x) }, `Revoke ${x.exception_id}`) : "—")],
    ], listing.exceptions));
    if (listing.burndown.length) body.append(h("p", {}, "Open exceptions by expiry day: ", listing.burndown.map((d) => `${d.day}: ${d.open}`).join(", ")));
  } else {
    body.append(empty("No policy exception: every policy applies in full."));
  }
  const policy = h("input", { id: "exc-policy", placeholder: "token_limit" });
  const target = h("select", { id: "exc-kind" }, h("option", { value: "agent_id" }, "agent"), h("option", { value: "run_id" }, "run"));
  const subject = h("input", { id: "exc-subject" });
  const reason = h("input", { id: "exc-reason", size: "40" });
  const expires = h("input", { id: "exc-expires", type: "datetime-local", value: new Date(Date.now() + 7 * 86400e3).toISOString().slice(0, 16) });
  body.append(h("h3", {}, "Grant an exception (admins)"),
    h("form", { class: "filters", onsubmit: async (ev) => {
      ev.preventDefault();
      out.replaceChildren();
      try {
        const x = await api("/v1/policy-exceptions", { method: "POST", body: {
          policy_id: policy.value.trim(), [target.value]: subject.value.trim(), reason: reason.value.trim(), expires_at: `${expires.value}:00Z`,
        } });
        toast(`Exception ${x.exception_id} granted.`);
        navigate(viewHref("policy"));
      } catch (e) { out.replaceChildren(failure(e)); }
    } },
    h("label", { for: "exc-policy" }, "Policy id", policy),
    h("label", { for: "exc-kind" }, "For an", target),
    h("label", { for: "exc-subject" }, "Agent or run id", subject),
    h("label", { for: "exc-reason" }, "Reason", reason),
    h("label", { for: "exc-expires" }, "Expires (UTC)", expires),
    h("button", { type: "submit" }, "Grant")), out);
}

export const policy = {
  title: "Policy lifecycle",
  nav: true,
  render: async (el, ctx) => {
    useStyles();
    await banners(el, ctx);
    let policies = null;
    await section(el, ctx, "pol-bundles", "Bundles", async (body) => {
      policies = await ctx.api("/v1/policies");
      await bundles(body, ctx, policies);
    });
    await section(el, ctx, "pol-reloads", "Reloads and canaries", (body) => reloads(body, ctx));
    await section(el, ctx, "pol-sims", "Simulations", (body) => simulations(body, ctx));
    await section(el, ctx, "pol-exceptions", "Exceptions", (body) => exceptions(body, ctx));
  },
};
