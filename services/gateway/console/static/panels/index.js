// The panels of seed 000, in its order. Each: {id, domain, topic, defaultLevel, levels: {O1..O5:
// async (el, ctx) => void}}. A level a panel does not have is left out of `levels`.
export const DOMAINS = ["Overview", "Activity", "Incidents", "Policies", "Logs", "Analytics", "Connectivity", "Account"];

export const PANELS = [
  {
    id: "OVR-SUM-HIGH", domain: "Overview", topic: "Highlights", defaultLevel: "O1",
    levels: {
      O1: async (el, { api, h }) => {
        const runs = await api("/v1/runs", { query: { limit: 50 } });
        el.append(h("p", {}, `Runs: ${(runs.runs || []).length}`));
      },
    },
  },
];
