// The audit trail, newest first, filtered by tenant and action, a page at a time.

import { all, get } from "./api.js";
import { alertBox, busy, empty, field, h, loading, sequence, table, time } from "./dom.js";

const ACTIONS = ["tenant.create", "tenant.update", "tenant.webhook_secret.rotate", "key.create", "key.update", "key.rotate", "key.revoke", "webhook.redeliver", "config.reload"];
const PAGE = 50;

export function render(main, { query }) {
  const box = alertBox();
  const tenant = h("select", { name: "tenant" }, h("option", { value: "" }, "All tenants"));
  const action = h("select", { name: "action" }, h("option", { value: "" }, "All actions"), ACTIONS.map((a) => h("option", { value: a, selected: a === query.get("action") }, a)));
  const list = h("div", {});
  const more = h("button", { type: "button", hidden: true }, "Load more");
  main.append(
    h("div", { class: "page-head" }, h("h1", { tabindex: -1 }, "Audit")),
    h("p", { class: "lede" }, "Every change made through the admin API or a config reload, newest first."),
    h("form", { class: "toolbar", "aria-label": "Audit filter", onsubmit: (e) => e.preventDefault() }, field("Tenant", tenant), field("Action", action)),
    box.el,
    list,
    more,
  );
  let after = null;
  let rows = [];
  const ticket = sequence();
  const load = async (next) => {
    const mine = ticket();
    box.clear();
    if (!next) {
      after = null;
      rows = [];
      list.replaceChildren(loading("Loading audit entries…"));
    }
    try {
      const page = await busy(more, () => get("/audit", { tenant: tenant.value, action: action.value, limit: PAGE, after }));
      if (!mine.current()) return;
      rows = rows.concat(page.data);
      after = page.data.length ? page.data[page.data.length - 1].id : after;
      list.replaceChildren(auditTable(rows));
      more.hidden = !page.has_more;
    } catch (err) {
      if (!mine.current()) return;
      if (!next) list.replaceChildren();
      box.show(err);
    }
  };
  tenant.addEventListener("change", () => load(false));
  action.addEventListener("change", () => load(false));
  more.addEventListener("click", () => load(true));
  all("/tenants").then(
    (tenants) => {
      tenant.append(...tenants.map((t) => h("option", { value: t.id, selected: t.id === query.get("tenant") }, t.id)));
      load(false);
    },
    (err) => {
      box.show(err);
      load(false);
    },
  );
}

function target(t) {
  const parts = [];
  if (t.tenant) parts.push(h("span", { class: "block" }, t.tenant));
  if (t.key_id) parts.push(h("code", { class: "small muted block" }, t.key_id));
  return parts.length ? parts : h("span", { class: "muted" }, "—");
}

/** The changed fields, nested objects flattened (`limits.max_active_tasks`), times as
 * dates, `null` as "none". */
function flatten(value, prefix, out) {
  if (value !== null && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length) {
    for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
  } else {
    out.push([prefix, value]);
  }
  return out;
}

function shown(name, value) {
  if (value === null) return h("span", { class: "muted" }, "none");
  if (name.endsWith("_at") && typeof value === "number") return time(value);
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function changes(c) {
  const entries = flatten(c ?? {}, "", []).filter(([k]) => k);
  if (!entries.length) return h("span", { class: "muted" }, "—");
  return h("dl", { class: "changes" }, entries.map(([k, v]) => [h("dt", {}, k), h("dd", {}, shown(k, v))]));
}

function auditTable(entries) {
  const rows = entries.map((e) =>
    h(
      "tr",
      { "data-audit": e.id },
      h("td", {}, time(e.time)),
      h("th", { scope: "row" }, h("span", { class: "action" }, e.action)),
      h("td", {}, target(e.target)),
      h("td", {}, h("span", { class: "block" }, e.actor.id), h("span", { class: "small muted block" }, e.actor.type)),
      h("td", { class: "wrap" }, changes(e.changes)),
      h("td", {}, h("code", { class: "small block" }, e.request_id ?? "—"), h("span", { class: "small muted block" }, e.ip ?? "")),
    ),
  );
  return table("Audit entries", ["Time", "Action", "Target", "Actor", "Changes", "Request"], rows.length ? rows : empty(6, "No entries match."));
}
