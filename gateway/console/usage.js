// Usage: tasks and credits per day for a date range, by tenant, from the usage ledger;
// the same rows as CSV.

import { all, call, get } from "./api.js";
import { alertBox, busy, clearErrors, empty, field, h, loading, num, sequence, showError, table } from "./dom.js";
import { usageChart } from "./chart.js";

const DAY = 86400000;
const iso = (ms) => new Date(ms).toISOString().slice(0, 10);

/** Every UTC date from `from` to `to`, inclusive. */
function daysBetween(from, to) {
  const days = [];
  for (let t = Date.parse(`${from}T00:00:00Z`); t <= Date.parse(`${to}T00:00:00Z`) && days.length <= 366; t += DAY) days.push(iso(t));
  return days;
}

export function render(main, { query }) {
  const to = query.get("to") ?? iso(Date.now());
  const from = query.get("from") ?? iso(Date.parse(`${to}T00:00:00Z`) - 29 * DAY);
  const tenants = h("select", { name: "tenant" }, h("option", { value: "" }, "All tenants"));
  const box = alertBox();
  const show = h("button", { type: "submit", class: "primary" }, "Show");
  const csv = h("button", { type: "button" }, "Download CSV");
  const result = h("div", {});
  const form = h(
    "form",
    { class: "toolbar", "aria-label": "Usage filter", novalidate: true },
    field("From", h("input", { type: "date", name: "from", value: from, required: true }), { param: "from" }),
    field("To", h("input", { type: "date", name: "to", value: to, required: true }), { param: "to" }),
    field("Tenant", tenants, { param: "tenant" }),
    h("div", { class: "toolbar-buttons" }, show, csv),
    box.el,
  );
  main.append(
    h("div", { class: "page-head" }, h("h1", { tabindex: -1 }, "Usage")),
    h("p", { class: "lede" }, "From the usage ledger: tasks created and credits charged net of refunds, per UTC day."),
    form,
    result,
  );
  const tenantsLoaded = all("/tenants").then(
    (list) => tenants.append(...list.map((t) => h("option", { value: t.id, selected: t.id === query.get("tenant") }, t.id))),
    (err) => box.show(err),
  );
  const params = () => ({ from: form.elements.from.value, to: form.elements.to.value, tenant: tenants.value });

  const ticket = sequence();
  const load = async () => {
    const mine = ticket();
    clearErrors(form);
    box.clear();
    const p = params();
    result.replaceChildren(loading("Loading usage…"));
    try {
      const { data } = await busy(show, () => get("/usage", { ...p, group_by: "day" }));
      if (!mine.current()) return;
      result.replaceChildren(...view(p, data));
    } catch (err) {
      if (!mine.current()) return;
      result.replaceChildren();
      showError(err, { form, box });
    }
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    load();
  });
  csv.addEventListener("click", async () => {
    clearErrors(form);
    box.clear();
    const p = params();
    try {
      const blob = await busy(csv, () => call("GET", "/usage", { query: { ...p, group_by: "day,tenant", format: "csv" }, as: "blob" }), "Preparing…");
      const href = URL.createObjectURL(blob);
      const a = h("a", { href, download: `usage-${p.from}-to-${p.to}${p.tenant ? `-${p.tenant}` : ""}.csv`, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(href), 1000);
    } catch (err) {
      showError(err, { form, box });
    }
  });
  tenantsLoaded.then(load); // the tenant in the URL is chosen once the list is there
}

function view(p, rows) {
  const byDay = new Map(rows.map((r) => [r.date, r]));
  const days = daysBetween(p.from, p.to);
  const of = (d, f) => byDay.get(d)?.[f] ?? 0;
  const tasks = days.map((d) => of(d, "tasks_created"));
  const credits = days.map((d) => of(d, "credits_charged") - of(d, "credits_refunded"));
  const sum = (f) => rows.reduce((a, r) => a + (r[f] ?? 0), 0);
  const tiles = [
    ["Tasks created", sum("tasks_created")],
    ["Succeeded", sum("tasks_succeeded")],
    ["Failed", sum("tasks_failed")],
    ["Credits (net)", sum("credits_charged") - sum("credits_refunded")],
  ];
  const detail = days
    .filter((d) => byDay.has(d))
    .reverse()
    .map((d) => {
      const r = byDay.get(d);
      return h("tr", {}, h("th", { scope: "row" }, d), h("td", {}, num(r.tasks_created)), h("td", {}, num(r.tasks_succeeded)), h("td", {}, num(r.tasks_failed)), h("td", {}, num(r.credits_charged)), h("td", {}, num(r.credits_refunded)));
    });
  return [
    h("div", { class: "tiles" }, tiles.map(([label, v]) => h("div", { class: "tile" }, h("span", { class: "tile-label" }, label), h("span", { class: "tile-value" }, num(v))))),
    h(
      "figure",
      { class: "chart-box" },
      h("figcaption", {}, h("span", { class: "legend tasks" }, "Tasks created"), h("span", { class: "legend credits" }, "Credits (charged − refunded)")),
      usageChart({ days, tasks, credits }),
    ),
    h(
      "details",
      { class: "rows" },
      h("summary", {}, `Rows per day (${detail.length})`),
      table("Usage per day", ["Day", "Created", "Succeeded", "Failed", "Credits charged", "Credits refunded"], detail.length ? detail : empty(6, "No usage in this range.")),
    ),
  ];
}
