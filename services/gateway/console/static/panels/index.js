// The panels of seed 000, in its order. Each: {id, domain, topic, defaultLevel, levels: {O1..O5:
// async (el, ctx) => void}}. A level a panel does not have is left out of `levels`. The panels
// live in one module per pair of domains; lib.js holds the table, cards, charts and links they share.
import { OVERVIEW, ACTIVITY } from "./activity.js";
import { INCIDENTS, POLICIES } from "./governance.js";
import { LOGS, ANALYTICS } from "./records.js";
import { CONNECTIVITY, ACCOUNT } from "./account.js";

export const DOMAINS = ["Overview", "Activity", "Incidents", "Policies", "Logs", "Analytics", "Connectivity", "Account"];

export const PANELS = [...OVERVIEW, ...ACTIVITY, ...INCIDENTS, ...POLICIES, ...LOGS, ...ANALYTICS, ...CONNECTIVITY, ...ACCOUNT];
