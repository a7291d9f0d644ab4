// The console's shell: sign-in, the hash router, the side navigation and the helpers every
// panel and view uses (ctx). Panels register in panels/index.js, views in views/index.js.
//
// Routes:
//   #/login
//   #/panel/<PANEL-ID>[/<O-level>][?query]   a panel of seed 000 at an O-level (O1..O5)
//   #/view/<name>[/<id>][?query]              a view (execution flow, approvals, replay, ...)
import { PANELS, DOMAINS } from "./panels/index.js";
import { VIEWS } from "./views/index.js";

const STORE = "mc.console.session";
const LEVELS = ["O1", "O2", "O3", "O4", "O5"];
const LEVEL_NAMES = { O1: "Summary", O2: "List", O3: "Detail", O4: "Context", O5: "Evidence" };

/** The signed-in session: a bearer token or an API key, and the tenant acted in. */
export const session = {
  load() {
    try { return JSON.parse(sessionStorage.getItem(STORE) || "null"); } catch { return null; }
  },
  save(value) { sessionStorage.setItem(STORE, JSON.stringify(value)); },
  clear() { sessionStorage.removeItem(STORE); },
};

/** An error the API answered, with its code and message ({"error": {code, message}}). */
export class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

function authHeaders() {
  const s = session.load();
  if (!s) return {};
  const h = s.token ? { Authorization: `Bearer ${s.token}` } : { "X-API-Key": s.apiKey };
  if (s.tenant) h["X-Tenant-Id"] = s.tenant;
  return h;
}

/** Call the API: JSON in and out; throws ApiError with the server's own words. */
export async function api(path, { method = "GET", body, query, raw = false } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  }
  const headers = { Accept: "application/json", ...authHeaders() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (res.status === 401 && !location.hash.startsWith("#/login")) {
    session.clear(); navigate("#/login"); throw new ApiError(401, "unauthenticated", "Sign in again.");
  }
  if (!res.ok) {
    let code = "error", message = `${res.status} ${res.statusText}`;
    try { const e = (await res.json()).error; code = e.code; message = e.message; } catch { /* not JSON */ }
    throw new ApiError(res.status, code, message);
  }
  if (raw) return res;
  return res.status === 204 ? null : res.json();
}

/** Download an API answer as a file (exports, evidence), with the session's credentials. */
export async function download(path, filename, query) {
  const res = await api(path, { raw: true, query });
  const blob = await res.blob();
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

/**
 * Follow a Server-Sent Events route. EventSource cannot send headers, so the stream is read
 * with fetch; on a dropped connection it reconnects with Last-Event-ID, as EventSource would.
 * onEvent(type, data, id) is called per message; onState(state, error) hears "open",
 * "retrying" (with, when the server refused for load, an ApiError whose message is the API's
 * reason and whose retryIn is the wait in seconds), "failed" (a 4xx that retrying cannot change,
 * with the API's error) and "closed". retryMessage(error) words a "retrying" error for a page.
 * Returns a function that stops it.
 */
export function sse(path, onEvent, { query, onState } = {}) {
  let lastId = null, stopped = false, controller = null, wait = 1000;
  const run = async () => {
    while (!stopped) {
      controller = new AbortController();
      try {
        const url = new URL(path, location.origin);
        for (const [k, v] of Object.entries(query || {})) url.searchParams.set(k, v);
        const headers = { Accept: "text/event-stream", ...authHeaders() };
        if (lastId) headers["Last-Event-ID"] = lastId;
        const res = await fetch(url, { headers, signal: controller.signal });
        if (!res.ok) {
          // A refusal that asking again cannot change (not found, forbidden, bad input) ends
          // the stream; load (429, 503) and server errors are retried, after Retry-After.
          if (res.status >= 400 && res.status < 500 && res.status !== 408 && res.status !== 429) {
            stopped = true;
            let message = `${res.status}`;
            try { message = (await res.json()).error.message; } catch { /* not JSON */ }
            onState && onState("failed", new ApiError(res.status, "sse", message));
            break;
          }
          const after = Number(res.headers.get("Retry-After"));
          if (after > 0) wait = Math.min(after * 1000, 30000);
          // The reason is shown while waiting: a tenant at its limit of open streams (429)
          // should read that, not a bare "reconnecting".
          let reason = null;
          try { reason = (await res.json()).error; } catch { /* not JSON */ }
          const refused = new ApiError(res.status, reason?.code || "sse", reason?.message || `${res.status}`);
          // Only a refusal for load says when to come back; a server error is not a wait the
          // page should show as expected (the Live panel gives up on those after two tries).
          if (after > 0) refused.retryIn = Math.round(wait / 1000);
          throw refused;
        }
        wait = 1000;
        onState && onState("open");
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
            let type = "message", data = "", id = null;
            for (const line of block.split("\n")) {
              if (line.startsWith("event:")) type = line.slice(6).trim();
              else if (line.startsWith("data:")) data += line.slice(5).trim();
              else if (line.startsWith("id:")) id = line.slice(3).trim();
            }
            if (id) lastId = id;
            if (!data) continue;
            let parsed = data;
            try { parsed = JSON.parse(data); } catch { /* plain text */ }
            onEvent(type, parsed, id);
            if (type === "end") { stopped = true; }
          }
        }
      } catch (e) {
        if (stopped) break;
        onState && onState("retrying", e instanceof ApiError ? e : undefined);
      }
      if (!stopped) {
        await new Promise((r) => setTimeout(r, wait));
        wait = Math.min(wait * 2, 10000);  // back off while the server stays away
      }
    }
    onState && onState("closed");
  };
  run();
  return () => { stopped = true; controller && controller.abort(); };
}

/** Words for sse()'s "retrying" state: the server's reason and the wait when it gave one. */
export function retryMessage(error) {
  if (!error || !error.retryIn) return "reconnecting…";
  return `waiting: ${error.message} (${error.status}); trying again in ${error.retryIn} s`;
}

/** Go to a route (a hash). */
export function navigate(hash) {
  if (location.hash === hash) route(); else location.hash = hash;
}

/** A link to a panel at an O-level with a query, e.g. panelHref("ACT-LLM-COMP", "O3", {run_id}). */
export function panelHref(id, level, query) {
  const q = query ? `?${new URLSearchParams(query)}` : "";
  return `#/panel/${id}${level ? `/${level}` : ""}${q}`;
}

/** A link to a view, e.g. viewHref("execution", id). */
export function viewHref(name, id, query) {
  const q = query ? `?${new URLSearchParams(query)}` : "";
  return `#/view/${name}${id ? `/${encodeURIComponent(id)}` : ""}${q}`;
}

/** Build an element: h("a", {href, class: "x"}, "text", child, ...). Text is never parsed as HTML. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Show a short message (an action's outcome, an error) in the polite live region. */
export function toast(message, kind = "info") {
  const t = document.getElementById("toast");
  t.textContent = message;
  t.className = `toast ${kind}`;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 6000);
}

/** An honest empty state: what is missing and what would fill it. */
export function empty(message) {
  return h("p", { class: "empty", role: "note" }, message);
}

/** An error box with the API's own message. */
export function failure(error) {
  return h("p", { class: "error", role: "alert" }, error instanceof ApiError ? `${error.code}: ${error.message}` : String(error));
}

/**
 * Render a view inside an element (a panel's O3 that shows an entity a view owns, say), or an
 * honest empty state when that view does not exist.
 */
export async function view(name, el, id, query = {}) {
  const v = VIEWS[name];
  if (!v) { el.append(empty(`The ${name} view is not available in this build.`)); return; }
  await v.render(el, { ...ctx, id, query, onLeave: (fn) => cleanup.push(fn) });
}

/** What panels and views receive (plus query, onLeave and, for views, id). */
export const ctx = { api, sse, retryMessage, download, navigate, panelHref, viewHref, view, h, toast, empty, failure, session };

// -- rendering ------------------------------------------------------------------------------

let cleanup = [];
function onLeave(fn) { cleanup.push(fn); }

function parse() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, q] = raw.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, query: Object.fromEntries(new URLSearchParams(q || "")) };
}

function renderNav(active) {
  const nav = document.getElementById("nav");
  nav.replaceChildren(
    ...DOMAINS.map((domain) =>
      h("section", { class: "nav-domain" },
        h("h2", {}, domain),
        h("ul", {}, PANELS.filter((p) => p.domain === domain).map((p) =>
          h("li", {}, h("a", { href: panelHref(p.id), "aria-current": p.id === active ? "page" : null, "data-panel": p.id }, p.topic)))))),
    h("section", { class: "nav-domain" },
      h("h2", {}, "Views"),
      h("ul", {}, Object.entries(VIEWS).filter(([, v]) => v.nav).map(([name, v]) =>
        h("li", {}, h("a", { href: viewHref(name), "aria-current": active === `view:${name}` ? "page" : null }, v.title))))),
  );
}

function loginForm(main) {
  document.getElementById("nav").replaceChildren();
  document.getElementById("logout").hidden = true;
  document.getElementById("who").textContent = "";
  const error = h("div", { "aria-live": "assertive" });
  const user = h("input", { id: "username", name: "username", autocomplete: "username" });
  const pass = h("input", { id: "password", name: "password", type: "password", autocomplete: "current-password" });
  const key = h("input", { id: "api-key", name: "api-key", type: "password", autocomplete: "off" });
  const tenant = h("input", { id: "tenant", name: "tenant", autocomplete: "off" });
  const submit = async (ev) => {
    ev.preventDefault();
    error.replaceChildren();
    try {
      if (key.value) {
        session.save({ apiKey: key.value, tenant: tenant.value || null });
      } else {
        const res = await fetch("/v1/auth/token", {
          method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ username: user.value, password: pass.value }),
        });
        // A proxy in front of the gateway may answer an error that is not JSON: name its status.
        const body = await res.json().catch(() => null);
        if (!res.ok) {
          throw new ApiError(res.status, body?.error?.code || "error",
            body?.error?.message || `${res.status} ${res.statusText}`);
        }
        const tenants = Object.keys(body.tenants || {});
        session.save({ token: body.access_token, tenant: tenant.value || tenants[0] || null, user: user.value });
      }
      await api("/v1/auth/whoami");
      navigate(panelHref("OVR-SUM-HIGH"));
    } catch (e) {
      session.clear();
      error.replaceChildren(failure(e));
    }
  };
  main.replaceChildren(
    h("h1", {}, "Sign in"),
    h("form", { class: "login", onsubmit: submit },
      h("fieldset", {}, h("legend", {}, "As a person"),
        h("label", { for: "username" }, "Username"), user,
        h("label", { for: "password" }, "Password"), pass),
      h("fieldset", {}, h("legend", {}, "Or with an API key"),
        h("label", { for: "api-key" }, "API key"), key),
      h("label", { for: "tenant" }, "Tenant (optional for a single-tenant login)"), tenant,
      h("button", { type: "submit" }, "Sign in"),
      error));
  user.focus();
}

async function route() {
  for (const fn of cleanup.splice(0)) { try { fn(); } catch { /* already gone */ } }
  const main = document.getElementById("main");
  const { parts, query } = parse();
  const s = session.load();
  if (!s || parts[0] === "login") { loginForm(main); return; }
  document.getElementById("logout").hidden = false;
  document.getElementById("who").textContent = `${s.user || "API key"}${s.tenant ? ` · ${s.tenant}` : ""}`;
  const page = { ...ctx, query, onLeave };
  try {
    if (parts[0] === "view" && VIEWS[parts[1]]) {
      renderNav(`view:${parts[1]}`);
      const view = VIEWS[parts[1]];
      document.title = `${view.title} · Mission Control`;
      main.replaceChildren(h("h1", {}, view.title));
      const body = h("div", { class: "view" });
      main.append(body);
      await view.render(body, { ...page, id: parts[2] || null });
    } else {
      const panel = PANELS.find((p) => p.id === parts[1]) || PANELS[0];
      renderNav(panel.id);
      const level = LEVELS.includes(parts[2]) ? parts[2] : panel.defaultLevel || "O1";
      document.title = `${panel.topic} · ${panel.domain} · Mission Control`;
      const levels = h("nav", { class: "levels", "aria-label": "Levels of detail" },
        LEVELS.filter((l) => panel.levels[l]).map((l) =>
          h("a", { href: panelHref(panel.id, l, query), "aria-current": l === level ? "page" : null, "data-level": l }, `${l} ${LEVEL_NAMES[l]}`)));
      const body = h("div", { class: "panel-body", "data-panel": panel.id, "data-level": level });
      main.replaceChildren(h("h1", {}, `${panel.domain} · ${panel.topic}`), levels, body);
      const render = panel.levels[level];
      body.setAttribute("aria-busy", "true");
      try {
        if (!render) body.append(empty(`${panel.topic} has no ${LEVEL_NAMES[level]} level.`));
        else await render(body, page);
      } finally { body.removeAttribute("aria-busy"); }
    }
  } catch (e) {
    main.append(failure(e));
  }
  main.focus({ preventScroll: true });
}

document.getElementById("logout").addEventListener("click", () => { session.clear(); navigate("#/login"); });
window.addEventListener("hashchange", route);
route();
