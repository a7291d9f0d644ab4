// The agent registry: the tenant's agents (#/view/agents) and one agent (#/view/agent/A): its
// versions and state per environment, the last validation, the lifecycle actions allowed now
// (sandbox, promote, fork, disable) and a diff of its spec. See docs/agents.md.
import { table, useStyles, when } from "./pol-common.js";

const STATES = ["", "draft", "sandbox", "governed", "disabled"];

export const agents = {
  title: "Agents",
  nav: true,
  render: async (el, ctx) => {
    useStyles();
    const { api, h, failure, empty, viewHref, navigate } = ctx;
    const state = STATES.includes(ctx.query.state) ? ctx.query.state : "";
    const select = h("select", { id: "agents-state" }, STATES.map((s) => h("option", { value: s, selected: s === state }, s || "any")));
    select.addEventListener("change", () => navigate(viewHref("agents", null, select.value ? { state: select.value } : null)));
    el.append(h("div", { class: "filters" },
      h("label", { for: "agents-state" }, "State", select),
      h("a", { href: viewHref("agent-new") }, "New agent")));
    let listing;
    try { listing = await api("/v1/agent-registry", { query: { state } }); } catch (e) { el.append(failure(e)); return; }
    if (!listing.agents.length) {
      el.append(empty(state ? `No agent is ${state}.` : "The registry holds no agent yet: create one with the wizard (New agent) or POST /v1/agents/draft."));
      return;
    }
    el.append(table(h, "Registered agents", [
      ["Agent", (a) => h("a", { href: viewHref("agent", a.agent_id) }, a.agent_id)],
      ["Name", (a) => a.name || "—"],
      ["Version", (a) => String(a.version)],
      ["State", (a) => a.state],
      ["Governed version", (a) => (a.governed_version === null ? "none" : String(a.governed_version))],
      ["Disabled in", (a) => a.disabled.join(", ") || "—"],
      ["Origin", (a) => a.origin || "—"],
      ["Changed", (a) => when(a.updated_at)],
    ], listing.agents));
  },
};

export const agent = {
  title: "Agent",
  nav: false,
  render: async (el, ctx) => {
    useStyles();
    const { api, h, failure, empty, toast, viewHref, navigate } = ctx;
    const id = ctx.id;
    if (!id) { el.append(empty("Name an agent: open one from the list of agents."), h("a", { href: viewHref("agents") }, "All agents")); return; }
    let a, actions, me;
    try {
      [a, actions, me] = await Promise.all([
        api(`/v1/agents/${encodeURIComponent(id)}`),
        api(`/v1/agents/${encodeURIComponent(id)}/actions`),
        api("/v1/auth/whoami"),
      ]);
    } catch (e) { el.append(failure(e)); return; }
    const out = h("div", { "aria-live": "polite", id: "agent-outcome" });
    const again = () => navigate(viewHref("agent", id));

    const kv = (pairs) => h("dl", { class: "kv" }, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    el.append(
      h("h2", {}, `${a.spec.identity?.name || id} `, h("span", { class: "muted" }, `(${id})`)),
      kv([
        ["Newest version", `${a.version} (${a.state})`],
        ["Origin", `${a.origin.type || "—"}${a.origin.ref ? ` from ${a.origin.ref}` : ""}`],
        ["Spec hash", h("code", {}, a.spec_hash)],
        ["Created", when(a.created_at)], ["Changed", when(a.updated_at)],
        ["Runnable in", actions.runnable_in.join(", ") || "nowhere"],
        ["Tools", actions.tools.join(", ") || "none"],
      ]),
      h("h3", {}, "Per environment"),
      table(h, "The agent per environment", [
        ["Environment", ([env]) => env],
        ["State", ([, v]) => v.state],
        ["Version that runs", ([, v]) => (v.version === null ? "none" : String(v.version))],
        ["Disabled", ([env]) => (a.disabled.includes(env) ? "yes" : "no")],
      ], Object.entries(a.environments)));

    if (a.governed) {
      el.append(h("h3", {}, "Governed version"), kv([
        ["Version", String(a.governed.version)],
        ["Promoted by", `${a.governed.promoted_by} at ${when(a.governed.promoted_at)}`],
        ["Policy bundle", h("code", {}, a.governed.policy_digest)],
        ["Policy set", h("code", {}, a.governed.policy_set_hash)],
      ]));
    }
    const v = a.validation;
    el.append(h("h3", {}, "Last validation"), v
      ? h("div", {}, h("p", { class: v.passed ? "ok" : "deny" }, `${v.passed ? "Passed" : "Failed"} in ${v.environment || "?"}${v.version ? `, version ${v.version}` : ""}`),
        v.problems && v.problems.length ? h("ul", {}, v.problems.map((p) => h("li", {}, h("code", {}, p.code), ` ${p.path}: ${p.message}`))) : null,
        v.policy_set_hash ? h("p", { class: "muted" }, "Policy set ", h("code", {}, v.policy_set_hash)) : null)
      : empty("Not validated yet."));

    // -- lifecycle actions: the ones allowed now are enabled --------------------------------------
    const allowed = new Set(actions.lifecycle_actions);
    // Promoting and disabling are an admin's (a person's): others see them, disabled, and why.
    if (!me.roles.includes("admin")) { allowed.delete("promote"); allowed.delete("disable"); }
    const act = async (name, body) => {
      out.replaceChildren();
      try {
        const res = await api(`/v1/agents/${encodeURIComponent(id)}/${name}`, { method: "POST", body });
        toast(res.changed === false ? `Nothing to do: ${id} is ${res.state} already.` : `${id}: version ${res.version} is ${res.state}.`);
        again();
      } catch (e) { out.replaceChildren(failure(e)); }
    };
    const button = (name, label, onclick) => h("button", { type: "button", disabled: !allowed.has(name), onclick, "data-action": name }, label);
    const reason = h("input", { id: "agent-disable-reason", size: "40" });
    const where = h("select", { id: "agent-disable-env" }, ["both", "sandbox", "production"].map((e) => h("option", { value: e }, e)));
    el.append(h("h3", {}, "Actions"),
      h("p", { class: "muted" }, `Allowed now: ${actions.lifecycle_actions.join(", ") || "none"}. Promoting and disabling need an admin${me.roles.includes("admin") ? " (you are one)" : ""}; a tenant whose approval rules gate a move needs a promotion request.`),
      h("div", { class: "actions" },
        button("sandbox", "Move to the sandbox", () => act("sandbox")),
        button("promote", "Promote to production", () => act("promote")),
        button("fork", "Fork a new draft", () => act("fork")),
        h("a", { href: viewHref("agent-new", null, { agent_id: id }) }, "Edit the draft")),
      h("div", { class: "filters" },
        h("label", { for: "agent-disable-reason" }, "Reason to disable", reason),
        h("label", { for: "agent-disable-env" }, "Where", where),
        button("disable", "Disable", () => {
          if (!reason.value.trim()) { out.replaceChildren(failure("Say why the agent is disabled.")); return; }
          act("disable", { reason: reason.value.trim(), ...(where.value === "both" ? {} : { environments: [where.value] }) });
        })),
      out);

    // -- diffs: this version's spec against another --------------------------------------------
    const other = h("textarea", { id: "agent-diff-old", rows: "8", cols: "70" }, JSON.stringify(a.spec, null, 2));
    const diffOut = h("div", { "aria-live": "polite" });
    el.append(h("h3", {}, "Diff"),
      h("p", {}, "The registry serves an agent's newest spec only, so earlier versions cannot be fetched here yet. Compare the newest spec with another spec (a governed version's, kept elsewhere, say): edit it below, then open the diff."),
      h("div", { class: "field" }, h("label", { for: "agent-diff-old" }, "The other spec (JSON), as the old side"), other),
      h("div", { class: "actions" }, h("button", { type: "button", onclick: async () => {
        diffOut.replaceChildren();
        let old;
        try { old = JSON.parse(other.value); } catch (e) { diffOut.replaceChildren(failure(`The other spec is not JSON: ${e.message}`)); return; }
        try {
          const page = await api("/v1/diffs", { method: "POST", body: { old_spec: old, new_spec: a.spec, limit: 1 } });
          navigate(viewHref("diff", page.diff_hash));
        } catch (e) { diffOut.replaceChildren(failure(e)); }
      } }, "Open the diff")),
      diffOut,
      h("details", {}, h("summary", {}, "The newest spec"), h("pre", { class: "spec" }, JSON.stringify(a.spec, null, 2))));
  },
};
