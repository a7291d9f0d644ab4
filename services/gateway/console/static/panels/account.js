// Connectivity (SDK Integration, API Keys) and Account (Profile, Subscription, Invoices,
// Members, Account Management).
import { h, put, dataTable, cards, details, actions, section, link, fmt, optional, missing, empty } from "./lib.js";

export const CONNECTIVITY = [
  {
    id: "CON-INT-SDK", domain: "Connectivity", topic: "SDK Integration", defaultLevel: "O2",
    levels: {
      O1: async (el, ctx) => {
        const who = await ctx.api("/v1/auth/whoami");
        const agents = await ctx.api("/v1/agents");
        put(el, cards([{ label: "gateway", value: location.origin }, { label: "tenant", value: who.tenant_id }, { label: "agents connected", value: agents.agents.length }]),
          section("Connect an agent",
            h("p", {}, "Agents call the gateway's HTTP API with an API key (header X-API-Key). The Python client wraps it:"),
            h("pre", { tabindex: "0", "aria-label": "Python example" }, h("code", {},
              `from services.gateway.client import MissionControlClient\n\nmc = MissionControlClient("${location.origin}", api_key)\nmc.start_run(...)`)),
            h("p", {}, "Every route is described in ", h("a", { href: "/docs" }, "the API docs"), "; keys are issued under ", h("a", { href: ctx.panelHref("CON-API-KEYS", "O2") }, "API Keys"), ".")));
      },
      O2: async (el, ctx) => {
        put(el, dataTable(ctx, { caption: "connected agents", paging: "client",
          columns: [
            { key: "agent_id", label: "Agent", render: (a) => link("agent", a.agent_id) },
            { key: "capabilities", label: "Capabilities", value: (a) => JSON.stringify(a.capabilities ?? a.tools ?? ""), render: (a) => fmt.text(Array.isArray(a.capabilities) ? a.capabilities.join(", ") : a.capabilities) },
            { key: "last_seen_at", label: "Last seen", render: (a) => fmt.time(a.last_seen_at || a.registered_at || a.updated_at) },
            { key: "runs", label: "Runs", sort: false, render: (a) => h("a", { href: ctx.panelHref("ACT-LLM-COMP", "O2", { agent_id: a.agent_id }) }, "runs") },
          ],
          load: async () => ({ rows: (await ctx.api("/v1/agents")).agents }),
          emptyText: "No agent has registered with the gateway (POST /v1/agents)." }),
        h("p", {}, h("a", { href: ctx.viewHref("agents") }, "Agent registry and the new-agent wizard")));
      },
    },
  },
  {
    id: "CON-API-KEYS", domain: "Connectivity", topic: "API Keys", defaultLevel: "O2",
    levels: {
      O1: async (el, ctx) => {
        const res = await optional(ctx, "/v1/api-keys");
        if (!res) { put(el, missing("The list of API keys", "GET /v1/api-keys")); return; }
        put(el, cards([{ label: "active keys", value: res.keys.filter((k) => !k.revoked_at).length }, { label: "revoked keys", value: res.keys.filter((k) => k.revoked_at).length }]));
      },
      O2: async (el, ctx) => {
        const res = await optional(ctx, "/v1/api-keys");
        if (!res) { put(el, missing("The list of API keys", "GET /v1/api-keys")); return; }
        put(el, keysTable(ctx, res.keys));
      },
      O3: async (el, ctx) => {
        const shown = h("div", { "aria-live": "polite" });
        const listing = h("div", {});
        const list = async () => {
          const res = await optional(ctx, "/v1/api-keys");
          listing.replaceChildren(res ? keysTable(ctx, res.keys, true) : missing("Revoking keys", "GET /v1/api-keys"));
        };
        const create = h("button", { type: "button", class: "primary", onclick: async () => {
          try {
            const res = await ctx.api("/v1/api-keys", { method: "POST", body: {} });
            const secret = h("input", { id: "new-key", readonly: true, value: res.api_key, size: 60 });
            shown.replaceChildren(h("p", { class: "banner warn", role: "note" }, `Key ${res.key_id} was issued. Copy it now: it is shown once and never again.`),
              h("label", { for: "new-key" }, "New API key"), secret);
            secret.select();
          } catch (e) { shown.replaceChildren(ctx.failure(e)); return; }
          // The new key joins the list below (so it can be revoked from here); a failure to
          // list must not take the key, shown once, off the page.
          await list().catch((e) => listing.replaceChildren(ctx.failure(e)));
        } }, "Issue a new API key");
        put(el, section("Issue a key", create, shown), section("Revoke a key", listing));
        await list();
      },
    },
  },
];

function keysTable(ctx, keys, withRevoke = false) {
  const columns = [
    { key: "key_id", label: "Key" }, { key: "name", label: "Name" },
    { key: "scopes", label: "Scopes", value: (k) => (k.scopes || []).join(","), render: (k) => (k.scopes || []).join(", ") || "—" },
    { key: "created_at", label: "Created", render: (k) => fmt.time(k.created_at) },
    { key: "revoked_at", label: "Revoked", render: (k) => (k.revoked_at ? fmt.time(k.revoked_at) : h("span", { class: "ok" }, "active")) },
  ];
  if (withRevoke) {
    columns.push({ key: "action", label: "Action", sort: false, render: (k) => (k.revoked_at ? "—" : h("button", { type: "button", onclick: async () => {
      if (!confirm(`Revoke key ${k.key_id}? Agents using it stop at once.`)) return;
      try { await ctx.api(`/v1/api-keys/${encodeURIComponent(k.key_id)}:revoke`, { method: "POST" }); ctx.toast(`Key ${k.key_id} revoked`); ctx.navigate(location.hash); } catch (e) { ctx.toast(e.message, "error"); }
    } }, `Revoke ${k.key_id}`)) });
  }
  return dataTable(ctx, { caption: "API keys", columns, paging: "client", load: async () => ({ rows: keys }), emptyText: "No API key has been issued." });
}

async function profile(el, ctx) {
  const who = await ctx.api("/v1/auth/whoami");
  put(el, h("h2", {}, "Who you are"), details([["Kind", who.kind], ["Actor", who.actor], ["Tenant", who.tenant_id],
    ["Roles", (who.roles || []).join(", ") || "—"], ["Scopes", (who.scopes || []).join(", ") || "—"]]),
    actions(h("a", { href: ctx.panelHref("LOG-REC-AUD", "O2", { actor: who.actor }) }, "What you did (audit events)")));
}

export const ACCOUNT = [
  {
    id: "ACC-PRO-OVR", domain: "Account", topic: "Profile", defaultLevel: "O3",
    levels: {
      O1: async (el, ctx) => {
        const who = await ctx.api("/v1/auth/whoami");
        put(el, cards([{ label: "tenant", value: who.tenant_id }, { label: "signed in as", value: who.actor }, { label: "roles or scopes", value: [...(who.roles || []), ...(who.scopes || [])].join(", ") }]));
      },
      O3: profile,
    },
  },
  {
    id: "ACC-BIL-SUB", domain: "Account", topic: "Subscription", defaultLevel: "O2",
    levels: {
      O1: async (el, ctx) => {
        const prices = await ctx.api("/v1/prices");
        put(el, cards([{ label: "price table version", value: prices.price_table_version }, { label: "models priced", value: prices.prices.length }]),
          empty("Mission Control has no plans or subscriptions: usage is priced per token by the tenant's price table below, and billed by statements (Invoices)."));
      },
      O2: async (el, ctx) => {
        put(el, dataTable(ctx, { caption: "prices per token", paging: "client",
          columns: [{ key: "model", label: "Model" }, { key: "input_per_token", label: "Input per token (USD)" }, { key: "output_per_token", label: "Output per token (USD)" },
            { key: "effective_from", label: "Effective from", render: (p) => fmt.time(p.effective_from) }, { key: "source", label: "Source" }],
          load: async () => ({ rows: (await ctx.api("/v1/prices")).prices }), emptyText: "No price is published: steps stay unpriced (PUT /v1/prices)." }));
      },
    },
  },
  {
    id: "ACC-BIL-INV", domain: "Account", topic: "Invoices", defaultLevel: "O2",
    levels: {
      O1: async (el, ctx) => {
        const res = await optional(ctx, "/v1/statements");
        if (!res) { put(el, missing("Usage statements", "GET /v1/statements")); return; }
        const last = res.statements[0];
        put(el, cards([{ label: "statements", value: res.statements.length }, { label: "latest period", value: last ? last.period : "—" }, { label: "latest total (priced calls)", value: last ? fmt.usd(last.cost_usd) : "—" }]));
      },
      O2: async (el, ctx) => {
        const res = await optional(ctx, "/v1/statements");
        if (!res) { put(el, missing("Usage statements", "GET /v1/statements")); return; }
        put(el, dataTable(ctx, { caption: "usage statements", paging: "client",
          columns: [{ key: "period", label: "Period", render: (s) => h("a", { href: ctx.panelHref("ACC-BIL-INV", "O3", { period: s.period }) }, s.period) },
            { key: "runs", label: "Runs" }, { key: "tokens", label: "Tokens", render: (s) => fmt.num(s.tokens) }, { key: "cost_usd", label: "Cost", render: (s) => fmt.usd(s.cost_usd) },
            { key: "unpriced_calls", label: "Unpriced calls" }],
          load: async () => ({ rows: res.statements }), emptyText: "No usage yet, so no statement." }));
      },
      O3: async (el, ctx) => {
        const period = ctx.query.period;
        if (!period) { put(el, empty("Pick a period in the list of statements.")); return; }
        const res = await optional(ctx, `/v1/statements/${encodeURIComponent(period)}`);
        if (!res) { put(el, missing(`The statement of ${period}`, "GET /v1/statements/{period}")); return; }
        put(el, h("h2", {}, `Statement ${res.period}`), cards([{ label: "total", value: fmt.usd(res.total_usd) }]),
          dataTable(ctx, { caption: `lines of ${res.period} (chargeback by agent and model)`, paging: "client",
            columns: [{ key: "agent_id", label: "Agent", render: (l) => link("agent", l.agent_id) }, { key: "model", label: "Model" }, { key: "runs", label: "Runs" },
              { key: "tokens", label: "Tokens", render: (l) => fmt.num(l.tokens) }, { key: "cost_usd", label: "Cost", render: (l) => fmt.usd(l.cost_usd) }],
            load: async () => ({ rows: res.lines }), emptyText: "The statement has no line." }));
      },
    },
  },
  {
    id: "ACC-TM-MEM", domain: "Account", topic: "Members", defaultLevel: "O2",
    levels: {
      O1: async (el, ctx) => {
        const res = await optional(ctx, "/v1/members");
        if (!res) { put(el, missing("The tenant's members", "GET /v1/members")); return; }
        put(el, cards([{ label: "members", value: res.members.length }, { label: "disabled", value: res.members.filter((m) => m.disabled).length },
          { label: "admins", value: res.members.filter((m) => (m.roles || []).includes("admin")).length }]));
      },
      O2: async (el, ctx) => {
        const res = await optional(ctx, "/v1/members");
        if (!res) { put(el, missing("The tenant's members", "GET /v1/members")); return; }
        put(el, dataTable(ctx, { caption: "members", paging: "client",
          columns: [{ key: "user_id", label: "User" }, { key: "roles", label: "Roles", value: (m) => (m.roles || []).join(","), render: (m) => (m.roles || []).join(", ") || "—" },
            { key: "disabled", label: "State", render: (m) => (m.disabled ? h("span", { class: "deny" }, "disabled") : h("span", { class: "ok" }, "active")) },
            { key: "actions", label: "Audit", sort: false, render: (m) => h("a", { href: ctx.panelHref("LOG-REC-AUD", "O2", { actor: `user:${m.user_id}` }) }, "their actions") }],
          load: async () => ({ rows: res.members }), emptyText: "No person holds a role in this tenant (mctl user grant)." }),
        h("p", { class: "muted" }, "Roles are granted with mctl user grant (docs/rbac.md)."));
      },
    },
  },
  {
    id: "ACC-SET-MGT", domain: "Account", topic: "Account Management", defaultLevel: "O3",
    levels: {
      O3: async (el, ctx) => {
        await profile(el, ctx);
        const [budgets, settings] = await Promise.all([ctx.api("/v1/budgets"), ctx.api("/v1/policy-settings")]);
        put(el, section("Settings of the tenant", details([["Budget time zone", budgets.timezone], ["Policy settings version", settings.version]]),
          actions(h("a", { href: ctx.panelHref("POL-LIM-CTR", "O3") }, "Policy settings and exceptions"), h("a", { href: ctx.panelHref("POL-LIM-CTR", "O2") }, "Budgets"),
            h("a", { href: ctx.panelHref("CON-API-KEYS", "O3") }, "API keys"), h("a", { href: ctx.panelHref("ACC-TM-MEM", "O2") }, "Members"),
            h("a", { href: ctx.panelHref("LOG-REC-AUD", "O5") }, "Evidence exports"))));
      },
    },
  },
];
