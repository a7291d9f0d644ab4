// The agent registry: the tenant's agents (#/view/agents) and one agent (#/view/agent/A): its
// state per environment, the last validation, the lifecycle actions allowed now (sandbox,
// promote, fork, disable), its stored versions, and a diff of two of them (or of its newest spec
// and a pasted one). See docs/agents.md.
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
    const path = `/v1/agents/${encodeURIComponent(id)}`;
    let a, actions, me, history;
    try {
      [a, actions, me, history] = await Promise.all([
        api(path), api(`${path}/actions`), api("/v1/auth/whoami"), api(`${path}/versions`),
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

    // -- versions: the stored ones, two of them diffed ------------------------------------------
    const diffOut = h("div", { "aria-live": "polite", id: "agent-diff-outcome" });
    const openDiff = async (old, neu) => {
      const page = await api("/v1/diffs", { method: "POST", body: { old_spec: old, new_spec: neu, limit: 1 } });
      navigate(viewHref("diff", page.diff_hash));
    };
    const versions = history.versions;
    const made = (v) => ({
      draft: v.from_version ? `draft save (fork of ${v.from_version})` : "draft save",
      fork: `fork of ${v.from_version}`,
      promote: `promotion of ${v.from_version}`,
    })[v.made_by] || v.made_by;
    const marker = (v) => [v.current ? `current (${history.state})` : null, v.governed ? "governed: production runs it" : null].filter(Boolean).join(", ") || "—";
    el.append(h("h3", {}, "Versions"),
      table(h, "The agent's stored versions, newest first", [
        ["Version", (v) => String(v.version)],
        ["Saved at", (v) => when(v.saved_at)],
        ["Made by", made],
        ["State", marker],
        ["Spec hash", (v) => h("code", {}, v.spec_hash)],
      ], versions));
    if (versions.length > 1) {
      const label = (v) => `${v.version}${v.current ? " (current)" : ""}${v.governed ? " (governed)" : ""}`;
      const choose = (sel, chosen) => h("select", { id: sel }, versions.map((v) => h("option", { value: String(v.version), selected: v.version === chosen }, label(v))));
      // By default the newest version against the governed one, else against the one before it.
      const newest = versions[0].version;
      const governed = history.governed_version;
      const oldest = governed !== null && governed !== newest ? governed : versions[1].version;
      const oldSel = choose("agent-diff-old-version", oldest), newSel = choose("agent-diff-new-version", newest);
      el.append(h("div", { class: "filters", role: "group", "aria-label": "Diff two versions" },
        h("label", { for: "agent-diff-old-version" }, "Old version", oldSel),
        h("label", { for: "agent-diff-new-version" }, "New version", newSel),
        h("button", { type: "button", onclick: async () => {
          diffOut.replaceChildren();
          if (oldSel.value === newSel.value) { diffOut.replaceChildren(failure("Choose two different versions.")); return; }
          try {
            const [old, neu] = await Promise.all([oldSel.value, newSel.value].map((v) => api(`${path}/versions/${v}`)));
            await openDiff(old.spec, neu.spec);
          } catch (e) { diffOut.replaceChildren(failure(e)); }
        } }, "Diff the two versions")));
    } else {
      el.append(h("p", { class: "muted" }, "Only version 1 so far: promoting it opens version 2, and forking the governed version the next."));
    }

    // A spec kept elsewhere (another agent's, an exported one) against the newest.
    const other = h("textarea", { id: "agent-diff-old", rows: "8", cols: "70" }, JSON.stringify(a.spec, null, 2));
    el.append(diffOut,
      h("details", {}, h("summary", {}, "Compare the newest spec with a pasted one"),
        h("div", { class: "field" }, h("label", { for: "agent-diff-old" }, "The other spec (JSON), as the old side"), other),
        h("div", { class: "actions" }, h("button", { type: "button", onclick: async () => {
          diffOut.replaceChildren();
          let old;
          try { old = JSON.parse(other.value); } catch (e) { diffOut.replaceChildren(failure(`The other spec is not JSON: ${e.message}`)); return; }
          try { await openDiff(old, a.spec); } catch (e) { diffOut.replaceChildren(failure(e)); }
        } }, "Open the diff"))),
      h("details", {}, h("summary", {}, "The newest spec"), h("pre", { class: "spec" }, JSON.stringify(a.spec, null, 2))));
  },
};
