// Evidence exports (#/view/evidence): SOC2 evidence and the executive debriefs of a period as
// files, and compliance attestations (generate one, download any recorded one).
import { dayStart, field, isoDay, when } from "./flow-common.js";

export async function renderEvidence(el, ctx) {
  const { api, download, h, empty, failure, toast } = ctx;
  const today = new Date();
  const from = h("input", { id: "ev-from", name: "from", type: "date", required: true,
    value: isoDay(new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), 1))) });
  const to = h("input", { id: "ev-to", name: "to", type: "date", required: true,
    value: isoDay(new Date(today.getTime() + 86400000)) });
  const period = () => {
    if (!from.value || !to.value) throw new Error("Choose both dates of the period.");
    if (to.value <= from.value) throw new Error("The period's end must come after its start.");
    return { from: dayStart(from.value), to: dayStart(to.value) };
  };
  const fetchFile = async (button, path, filename, query) => {
    button.disabled = true;
    try { await download(path, filename, query); toast(`${filename} downloaded.`); }
    catch (e) { toast(`${e.code ? `${e.code}: ` : ""}${e.message}`, "error"); }
    finally { button.disabled = false; }
  };
  const fileButton = (label, fmt, path, name) => {
    const b = h("button", { type: "button", "data-format": fmt, onclick: () => {
      let p;
      try { p = period(); } catch (e) { toast(e.message, "error"); return; }
      fetchFile(b, path, `${name}-${from.value}-${to.value}.${fmt}`, { ...p, format: fmt });
    } }, label);
    return b;
  };

  const standard = h("select", { id: "att-standard", name: "standard" },
    h("option", { value: "soc2" }, "SOC 2"), h("option", { value: "iso27001" }, "ISO 27001"));
  const list = h("div", {});
  const loadAttestations = async () => {
    let answer;
    try { answer = await api("/v1/attestations"); } catch (e) { list.replaceChildren(failure(e)); return; }
    const rows = answer.attestations || [];
    if (!rows.length) { list.replaceChildren(empty("No attestation recorded yet: generate one for a period above.")); return; }
    list.replaceChildren(h("table", { "aria-label": "Attestations" },
      h("thead", {}, h("tr", {}, ["Standard", "Period", "Generated", "By", "Files"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows.map((a) => h("tr", { "data-attestation": a.attestation_id },
        h("td", {}, a.standard), h("td", {}, `${when(a.period_from)} to ${when(a.period_to)}`),
        h("td", {}, when(a.generated_at)), h("td", {}, a.requested_by),
        h("td", {}, ["pdf", "json"].map((fmt) => {
          const b = h("button", { type: "button", onclick: () => fetchFile(b, `/v1/attestations/${a.attestation_id}`, `attestation-${a.attestation_id}.${fmt}`, { format: fmt }) },
            `${fmt.toUpperCase()} of ${a.standard} ${a.period_from.slice(0, 10)}`);
          return [b, " "];
        }).flat()))))));
  };
  const generate = h("button", { type: "button", class: "primary", onclick: async () => {
    let p;
    try { p = period(); } catch (e) { toast(e.message, "error"); return; }
    generate.disabled = true;
    try {
      await api("/v1/attestations", { method: "POST", body: { standard: standard.value, ...p } });
      toast("Attestation generated.");
      await loadAttestations();
    } catch (e) { toast(`${e.code || "error"}: ${e.message}`, "error"); }
    finally { generate.disabled = false; }
  } }, "Generate attestation");

  el.append(
    h("fieldset", { class: "filters" }, h("legend", {}, "Period (UTC days; the end day is excluded)"),
      field("From", from), field("To", to)),
    h("h2", {}, "SOC 2 evidence"),
    h("p", { class: "muted" }, "Signed, control by control; verify offline with mctl verify-evidence FILE."),
    h("div", { class: "pager" },
      fileButton("SOC 2 evidence (PDF)", "pdf", "/v1/evidence/soc2", "soc2-evidence"),
      fileButton("SOC 2 evidence (JSON)", "json", "/v1/evidence/soc2", "soc2-evidence"),
      fileButton("SOC 2 evidence (CSV)", "csv", "/v1/evidence/soc2", "soc2-evidence")),
    h("h2", {}, "Incident debriefs of the period"),
    h("div", { class: "pager" },
      fileButton("Debriefs (Markdown)", "md", "/v1/debriefs", "debriefs"),
      fileButton("Debriefs (HTML)", "html", "/v1/debriefs", "debriefs"),
      fileButton("Debriefs (PDF)", "pdf", "/v1/debriefs", "debriefs"),
      fileButton("Debriefs (JSON)", "json", "/v1/debriefs", "debriefs")),
    h("h2", {}, "Attestations"),
    h("div", { class: "filters" }, field("Standard", standard), generate),
    list);
  await loadAttestations();
}
