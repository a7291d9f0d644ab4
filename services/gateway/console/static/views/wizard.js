// The agent creation wizard (#/view/agent-new[?agent_id=A] to resume a draft): identity and
// role, model and runtime, tools, memory, triggers, limits and policies, review. The draft is
// saved as the author types (POST /v1/agents/draft, idempotent); leaving a step asks policy
// (POST /v1/agents/validate for the spec's problems, POST /v1/policy-hooks/on_create_attempt/
// evaluate for warnings, locked fields and suggested changes):
//   deny  -> the step cannot be left; the banner names each violation and its runbook;
//   warn  -> leaving needs the acknowledgement box ticked (for these very warnings);
//   locked fields -> disabled for anyone but an admin, with "Why is this locked?";
//   suggestions (mutations) -> offered, applied only when the author asks.
// Review validates the whole spec against the sandbox (recorded) and moves the draft there.
import { reasonsBanner, useStyles } from "./pol-common.js";

const ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$/;
const ENVIRONMENT = "sandbox"; // where a new agent goes first
const AUTOSAVE_MS = 800;

// Each field: its spec path (dotted), label, and how its value is read.
const STEPS = [
  { id: "identity", title: "Identity and role", sections: ["identity", "role"], fields: [
    { path: "agent_id", label: "Agent id (letters, digits, . _ -; fixed once the draft is saved)" },
    { path: "identity.name", label: "Name" },
    { path: "identity.description", label: "Description", type: "textarea" },
    { path: "identity.owner", label: "Owner: the person or team answerable for it" },
    { path: "identity.tags", label: "Tags (comma separated)", kind: "list" },
    { path: "role", label: "Role: what the agent is for", type: "textarea" },
  ] },
  { id: "model", title: "Model and runtime", sections: ["model"], fields: [
    { path: "model.model", label: "Model" },
    { path: "model.provider", label: "Provider" },
    { path: "model.runtime", label: "Runtime" },
    { path: "model.temperature", label: "Temperature (0 to 2)", kind: "number", step: "0.1" },
    { path: "model.max_output_tokens", label: "Maximum output tokens", kind: "integer" },
  ] },
  { id: "tools", title: "Tools", sections: ["tools"], fields: [
    { path: "tools", label: "Tools, one per line: a name, or name: description", type: "textarea", kind: "tools" },
  ] },
  { id: "memory", title: "Memory", sections: ["memory"], fields: [
    { path: "memory.kind", label: "Memory", type: "select", options: ["none", "session", "persistent"] },
    { path: "memory.retention_days", label: "Retention (days)", kind: "integer" },
  ] },
  { id: "triggers", title: "Triggers", sections: ["triggers"], fields: [
    { path: "triggers.type", label: "Started by", type: "select", options: ["manual", "workflow", "event", "schedule", "none"] },
    { path: "triggers.ref", label: "Workflow, event type or schedule it names (optional)" },
  ] },
  { id: "limits", title: "Limits and policies", sections: ["limits", "policies"], fields: [
    { path: "limits.max_tokens_per_run", label: "Maximum tokens per run", kind: "integer" },
    { path: "limits.max_cost_usd_per_run", label: "Maximum cost per run (USD)", kind: "number", step: "0.01" },
    { path: "limits.max_steps_per_run", label: "Maximum steps per run", kind: "integer" },
    { path: "policies", label: "Policies it is governed by (ids, comma separated)", kind: "list" },
  ] },
  { id: "review", title: "Review", sections: [], fields: [] },
];
const FIELDS = STEPS.flatMap((s) => s.fields);
// Where a policy's suggested change lands when it names the field another way.
const ALIASES = { "model.name": "model.model" };

/** Whether a locked field (dotted) covers a wizard field's path. */
const covers = (field, path) => path === field || path.startsWith(`${field}.`) || field.startsWith(`${path}.`);

function read(field, input) {
  const v = input.value.trim();
  if (!v) return undefined;
  if (field.kind === "list") return v.split(",").map((s) => s.trim()).filter(Boolean);
  if (field.kind === "integer" || field.kind === "number") { const n = Number(v); return Number.isFinite(n) ? n : v; }
  if (field.kind === "tools") {
    return v.split("\n").map((l) => l.trim()).filter(Boolean).map((l) => {
      const at = l.indexOf(":");
      return at < 0 ? { name: l } : { name: l.slice(0, at).trim(), description: l.slice(at + 1).trim() };
    });
  }
  return v;
}

function write(field, input, value) {
  if (value === undefined || value === null) { input.value = ""; return; }
  if (field.kind === "list") input.value = value.join(", ");
  else if (field.kind === "tools") input.value = value.map((t) => (t.description ? `${t.name}: ${t.description}` : t.name)).join("\n");
  else input.value = String(value);
}

export const agentNew = {
  title: "New agent",
  nav: false,
  render: async (el, ctx) => {
    useStyles();
    const { api, h, failure, toast, navigate, viewHref } = ctx;
    let me;
    try { me = await api("/v1/auth/whoami"); } catch (e) { el.append(failure(e)); return; }
    const admin = me.roles.includes("admin");
    const author = me.actor.replace(/^(user|key):/, "");
    const runbookOf = {};
    try {
      const pol = await api("/v1/policies");
      for (const p of pol.policies) if (p.runbook_url) runbookOf[p.policy_id] = p.runbook_url;
    } catch { /* runbook links then come from the decisions only */ }

    // -- the form -----------------------------------------------------------------------------
    const inputs = {};
    const wraps = {};
    for (const f of FIELDS) {
      const id = `agent-${f.path.replace(/\./g, "-")}`;
      let input;
      if (f.type === "textarea") input = h("textarea", { id, rows: f.kind === "tools" ? "5" : "3", cols: "60" });
      else if (f.type === "select") input = h("select", { id }, f.options.map((o) => h("option", { value: o }, o)));
      else input = h("input", { id, type: f.kind === "integer" || f.kind === "number" ? "number" : "text", step: f.step || (f.kind === "integer" ? "1" : null), size: "50" });
      input.dataset.path = f.path;
      inputs[f.path] = input;
      wraps[f.path] = h("div", { class: "field" }, h("label", { for: id }, f.label), input);
    }
    const field = (path) => FIELDS.find((f) => f.path === path);
    const agentId = () => inputs.agent_id.value.trim();

    function spec() {
      const out = {};
      for (const f of FIELDS) {
        if (f.path === "agent_id" || f.path.startsWith("triggers.")) continue;
        const v = read(f, inputs[f.path]);
        if (v === undefined) continue;
        const [a, b] = f.path.split(".");
        if (b === undefined) out[a] = v; else (out[a] = out[a] || {})[b] = v;
      }
      const type = inputs["triggers.type"].value;
      const ref = inputs["triggers.ref"].value.trim();
      out.triggers = [{ type, ...(ref ? { ref } : {}) }];
      return out;
    }

    // -- locks: disabled for anyone but an admin, and explained -------------------------------
    let locks = [];
    function applyLocks(lockedFields, runbooks) {
      locks = lockedFields;
      for (const f of FIELDS) {
        if (f.path === "agent_id") continue; // fixed once the draft is saved, never by policy
        const lock = lockedFields.find((l) => covers(l.field, f.path));
        const wrap = wraps[f.path];
        wrap.querySelector(".why")?.remove();
        const input = inputs[f.path];
        input.disabled = false;
        input.removeAttribute("aria-describedby");
        if (!lock) continue;
        const whyId = `${input.id}-why`;
        const runbook = runbookOf[lock.policy_id] || runbooks.find((r) => r.includes(`/${lock.policy_id}.md`));
        if (!admin) {
          // The owner answers for the agent: someone who may not choose it is the owner.
          if (f.path === "identity.owner" && !input.value.trim()) input.value = author;
          input.disabled = true;
        }
        input.setAttribute("aria-describedby", whyId);
        wrap.append(h("details", { class: "why", id: whyId },
          h("summary", {}, admin ? "Locked for everyone but an admin: why?" : "Why is this locked?"),
          h("p", {}, `${lock.message || "locked by policy"} (policy `, h("code", {}, lock.policy_id), `, field ${lock.field}).`,
            admin ? " You are an admin of this tenant: you may change it." : " Ask an admin of the tenant to change it.",
            runbook ? [" ", h("a", { href: runbook, target: "_blank", rel: "noopener" }, "Runbook")] : null)));
      }
    }

    // -- autosave -------------------------------------------------------------------------------
    const saved = h("p", { class: "muted", role: "status", "aria-live": "polite", id: "agent-draft-status" }, "The draft is saved as you type, once it has an id.");
    let resumed = ctx.query.agent_id || null; // the agent whose draft this is (checked not to be another's)
    let saveTimer = null, saving = Promise.resolve(null), lastSaved = null;
    async function save() {
      const id = agentId();
      if (!ID_PATTERN.test(id)) { saved.textContent = "Give the agent an id (letters, digits, . _ -) to save its draft."; return null; }
      if (resumed !== id) {
        try {
          await api(`/v1/agents/${encodeURIComponent(id)}`);
          saved.replaceChildren(failure(`An agent ${id} exists already: choose another id, or open it to edit its draft.`));
          return null;
        } catch (e) {
          if (!e || e.status !== 404) { saved.replaceChildren(failure(e)); return null; }
        }
      }
      const body = { agent_id: id, spec: spec(), origin: "scratch" };
      const key = JSON.stringify(body);
      if (key === lastSaved) return null;
      try {
        const res = await api("/v1/agents/draft", { method: "POST", body });
        resumed = id; lastSaved = key;
        // The draft now lives under this id: a new id would be another agent.
        inputs.agent_id.disabled = true;
        saved.textContent = res.changed === false ? `Draft of ${id} up to date (version ${res.version}).` : `Draft of ${id} saved (version ${res.version}, ${res.state}).`;
        return res;
      } catch (e) { saved.replaceChildren(failure(e)); return null; }
    }
    const flush = () => { clearTimeout(saveTimer); saving = saving.then(save, save); return saving; };
    el.addEventListener("input", (ev) => {
      // Not while the id is typed: a pause in it would save a draft under half an id.
      if (!ev.target.dataset?.path || ev.target === inputs.agent_id) return;
      clearTimeout(saveTimer);
      saveTimer = setTimeout(flush, AUTOSAVE_MS);
    });
    inputs.agent_id.addEventListener("change", () => { if (ID_PATTERN.test(agentId())) flush(); });
    ctx.onLeave(() => { clearTimeout(saveTimer); });

    // -- policy: validate and the create hook, on leaving a step --------------------------------
    const banners = h("div", { id: "agent-policy", "aria-live": "polite" });
    let acked = null; // the warnings acknowledged, as one string
    async function check(stepIndex) {
      const body = spec();
      const [verdict, hook] = await Promise.all([
        api("/v1/agents/validate", { method: "POST", body: { spec: body, environment: ENVIRONMENT } }),
        api("/v1/policy-hooks/on_create_attempt/evaluate", { method: "POST", body: { environment: ENVIRONMENT, agent: body } }),
      ]);
      applyLocks(hook.locked_fields || [], hook.runbooks || []);
      // Problems of the steps done so far, and every policy violation (they judge the whole spec).
      const done = new Set(STEPS.slice(0, stepIndex + 1).flatMap((s) => s.sections));
      const last = stepIndex >= STEPS.length - 1;
      const denies = verdict.problems.filter((p) => last || p.path === "policy" || done.has(p.path.split(/[.[]/)[0])).map((p) => {
        const policyId = p.code.startsWith("policy_") ? p.code.slice(7) : null;
        const reason = policyId && (hook.violations || []).find((v) => v.policy_id === policyId);
        return { policy_id: policyId || p.code, message: p.path === "policy" ? p.message : `${p.path}: ${p.message}`, runbook_url: reason ? reason.runbook_url : runbookOf[policyId] };
      });
      const warnings = hook.warnings || [];
      const warnKey = JSON.stringify(warnings.map((w) => [w.policy_id, w.message]));
      banners.replaceChildren();
      if (denies.length) {
        banners.append(reasonsBanner(h, "deny", `Denied: fix ${denies.length === 1 ? "this" : "these"} before going on`, denies));
      }
      if (warnings.length) {
        const box = h("input", { type: "checkbox", id: "agent-warn-ack", checked: acked === warnKey });
        box.addEventListener("change", () => { acked = box.checked ? warnKey : null; });
        const banner = reasonsBanner(h, "warn", "Warnings: the agent may go on once you acknowledge them", warnings);
        banner.append(h("label", { for: "agent-warn-ack", class: "inline" }, box, " I acknowledge these warnings"));
        banners.append(banner);
      }
      const mutations = (hook.mutations || []).filter((m) => inputs[ALIASES[m.path] || m.path]);
      if (mutations.length) {
        banners.append(h("div", { class: "banner info", "data-banner": "suggestions" }, h("strong", {}, "Suggested by policy"),
          h("ul", {}, mutations.map((m) => {
            const path = ALIASES[m.path] || m.path;
            if (!admin && locks.some((l) => covers(l.field, path))) {
              return h("li", {}, `${m.message || m.op} (${m.policy_id}): ${path} is locked, so an admin may apply it.`);
            }
            const apply = h("button", { type: "button" }, `Apply: ${path} = ${JSON.stringify(m.value)}`);
            apply.addEventListener("click", () => {
              write(field(path), inputs[path], m.value);
              toast(`${path} set to ${JSON.stringify(m.value)} (${m.policy_id}).`);
              apply.disabled = true;
              clearTimeout(saveTimer); saveTimer = setTimeout(flush, AUTOSAVE_MS);
            });
            return h("li", {}, `${m.message || m.op} (${m.policy_id}) `, apply);
          }))));
      }
      return { denied: denies.length > 0, warned: warnings.length > 0 && acked !== warnKey, verdict, hook };
    }

    // -- steps ------------------------------------------------------------------------------------
    let current = 0;
    const stepList = h("ol", { class: "wizard-steps", "aria-label": "Steps" });
    const stepBody = h("div", { class: "wizard-step" });
    const stepHeading = h("h2", { tabindex: "-1" });
    const back = h("button", { type: "button" }, "Back");
    const next = h("button", { type: "button", class: "primary" }, "Next");
    const create = h("button", { type: "button", class: "primary", hidden: true }, "Create the agent in the sandbox");
    const outcome = h("div", { "aria-live": "polite" });

    function show(i) {
      current = i;
      stepList.replaceChildren(...STEPS.map((s, j) => h("li", { "aria-current": j === i ? "step" : null, class: j < i ? "done" : null }, `${j + 1}. ${s.title}`)));
      stepHeading.textContent = `Step ${i + 1} of ${STEPS.length}: ${STEPS[i].title}`;
      const step = STEPS[i];
      if (step.id === "review") {
        stepBody.replaceChildren(
          h("p", {}, "The spec as it will be saved. Creating it validates it against the sandbox's policy (recorded) and moves the draft to the sandbox."),
          h("pre", { class: "spec", tabindex: "0", "aria-label": "The agent spec" }, JSON.stringify(spec(), null, 2)));
      } else {
        stepBody.replaceChildren(...step.fields.map((f) => wraps[f.path]));
      }
      back.disabled = i === 0;
      next.hidden = step.id === "review";
      create.hidden = step.id !== "review";
      stepHeading.focus();
    }

    async function leave(i) {
      next.disabled = true; create.disabled = true;
      try {
        await flush();
        const verdict = await check(i);
        if (verdict.denied) { banners.querySelector("[data-banner='deny']")?.focus?.(); return null; }
        if (verdict.warned) return null;
        return verdict;
      } catch (e) {
        banners.replaceChildren(failure(e));
        return null;
      } finally { next.disabled = false; create.disabled = false; }
    }

    back.addEventListener("click", () => { if (current > 0) show(current - 1); });
    next.addEventListener("click", async () => {
      if (current === 0 && !ID_PATTERN.test(agentId())) {
        banners.replaceChildren(reasonsBanner(h, "deny", "The agent needs an id", [{ message: "Agent id: 1 to 100 letters, digits and . _ -, starting with a letter or digit." }]));
        return;
      }
      if (await leave(current)) show(current + 1);
    });
    create.addEventListener("click", async () => {
      outcome.replaceChildren();
      if (!(await leave(current))) return;
      const id = agentId();
      try {
        if (resumed !== id) throw new Error("the draft could not be saved: see above");
        const verdict = await api("/v1/agents/validate", { method: "POST", body: { agent_id: id, environment: ENVIRONMENT } });
        if (!verdict.passed) {
          banners.replaceChildren(reasonsBanner(h, "deny", "Denied", verdict.problems.map((p) => ({ policy_id: p.code, message: `${p.path}: ${p.message}` }))));
          return;
        }
        await api(`/v1/agents/${encodeURIComponent(id)}/sandbox`, { method: "POST" });
        toast(`Agent ${id} created in the sandbox.`);
        navigate(viewHref("agent", id));
      } catch (e) {
        outcome.replaceChildren(failure(e), h("p", {}, "The draft is saved: ", h("a", { href: viewHref("agent", id) }, `open ${id}`), "."));
      }
    });

    el.append(
      h("p", {}, "A new agent, from scratch. ", admin ? "You are an admin of this tenant." : `You create it as ${author}.`,
        " ", h("a", { href: viewHref("agents") }, "All agents")),
      stepList,
      h("section", { class: "wizard", "aria-labelledby": "agent-step-heading" },
        Object.assign(stepHeading, { id: "agent-step-heading" }), stepBody, banners,
        h("div", { class: "wizard-nav" }, back, next, create), saved, outcome));

    // Resume a draft (?agent_id=A), then learn the locks before the author types.
    if (resumed) {
      try {
        const agent = await api(`/v1/agents/${encodeURIComponent(resumed)}`);
        inputs.agent_id.value = agent.agent_id;
        inputs.agent_id.disabled = true;
        for (const f of FIELDS) {
          if (f.path === "agent_id" || f.path.startsWith("triggers.")) continue;
          const [a, b] = f.path.split(".");
          write(f, inputs[f.path], b === undefined ? agent.spec[a] : (agent.spec[a] || {})[b]);
        }
        const trigger = (agent.spec.triggers || [])[0];
        if (trigger) { inputs["triggers.type"].value = trigger.type; inputs["triggers.ref"].value = trigger.ref || ""; }
        lastSaved = JSON.stringify({ agent_id: agent.agent_id, spec: spec(), origin: "scratch" });
        saved.textContent = `Editing the draft of ${agent.agent_id} (version ${agent.version}, ${agent.state}).`;
      } catch (e) { el.prepend(failure(e)); resumed = null; }
    }
    show(0);
    try {
      const hook = await api("/v1/policy-hooks/on_create_attempt/evaluate", { method: "POST", body: { environment: ENVIRONMENT, agent: spec() } });
      applyLocks(hook.locked_fields || [], hook.runbooks || []);
    } catch (e) { banners.replaceChildren(failure(e)); }
  },
};
