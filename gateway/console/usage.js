// Usage: tasks and credits per day for a date range, by tenant, from the usage ledger;
// or per relay (`group_by=relay`, #/usage?by=relay), to hold against each relay's invoice;
// the same rows as CSV (per day and tenant, or per day and relay).

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
  const by = h(
    "select",
    { name: "by" },
    h("option", { value: "day" }, "Day"),
    h("option", { value: "relay", selected: query.get("by") === "relay" }, "Relay"),
  );
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
    field("Group by", by, { param: "group_by" }),
    h("div", { class: "toolbar-buttons" }, show, csv),
    box.el,
  );
  main.append(
    h("div", { class: "page-head" }, h("h1", { tabindex: -1 }, "Usage")),
    h("p", { class: "lede" }, "From the usage ledger: tasks created and credits charged net of refunds, per UTC day or per relay."),
    form,
    result,
  );
  const tenantsLoaded = all("/tenants").then(
    (list) => tenants.append(...list.map((t) => h("option", { value: t.id, selected: t.id === query.get("tenant") }, t.id))),
    (err) => box.show(err),
  );
  const params = () => ({ from: form.elements.from.value, to: form.elements.to.value, tenant: tenants.value });
  const perRelay = () => by.value === "relay";

  const ticket = sequence();
  const load = async () => {
    const mine = ticket();
    clearErrors(form);
    box.clear();
    const p = params();
    result.replaceChildren(loading("Loading usage…"));
    try {
      const relay = perRelay();
      const { data } = await busy(show, () => get("/usage", { ...p, group_by: relay ? "relay" : "day" }));
      if (!mine.current()) return;
      result.replaceChildren(...(relay ? relayView(data) : view(p, data)));
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
  by.addEventListener("change", load);
  csv.addEventListener("click", async () => {
    clearErrors(form);
    box.clear();
    const p = params();
    const relay = perRelay();
    try {
      const group_by = relay ? "day,relay" : "day,tenant";
      const blob = await busy(csv, () => call("GET", "/usage", { query: { ...p, group_by, format: "csv" }, as: "blob" }), "Preparing…");
      const href = URL.createObjectURL(blob);
      const name = `usage-${relay ? "by-relay-" : ""}${p.from}-to-${p.to}${p.tenant ? `-${p.tenant}` : ""}.csv`;
      const a = h("a", { href, download: name, hidden: true });
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

/** The four totals of a report's rows. */
function tiles(rows) {
  const sum = (f) => rows.reduce((a, r) => a + (r[f] ?? 0), 0);
  const totals = [
    ["Tasks created", sum("tasks_created")],
    ["Succeeded", sum("tasks_succeeded")],
    ["Failed", sum("tasks_failed")],
    ["Credits (net)", sum("credits_charged") - sum("credits_refunded")],
  ];
  return h("div", { class: "tiles" }, totals.map(([label, v]) => h("div", { class: "tile" }, h("span", { class: "tile-label" }, label), h("span", { class: "tile-value" }, num(v)))));
}

/** Rows per relay, each with its share of the range's tasks as a bar. */
function relayView(rows) {
  const total = rows.reduce((a, r) => a + r.tasks_created, 0);
  const detail = rows.map((r) => {
    const share = total > 0 ? r.tasks_created / total : 0;
    const fill = h("div", { class: "fill" });
    fill.style.width = `${(share * 100).toFixed(1)}%`;
    const text = `${Math.round(share * 100)} %`;
    return h(
      "tr",
      { "data-relay": r.relay },
      h("th", { scope: "row" }, r.relay),
      h("td", { class: "num" }, num(r.tasks_created)),
      h("td", {}, h("div", { class: "share", role: "meter", "aria-label": `Share of ${r.relay}`, "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.round(share * 100), "aria-valuetext": text }, h("span", { class: "meter-value" }, text), h("div", { class: "track" }, fill))),
      h("td", { class: "num" }, num(r.tasks_succeeded)),
      h("td", { class: "num" }, num(r.tasks_failed)),
      h("td", { class: "num" }, num(r.credits_charged)),
      h("td", { class: "num" }, num(r.credits_refunded)),
      h("td", { class: "num" }, num(r.credits_charged - r.credits_refunded)),
    );
  });
  return [
    tiles(rows),
    table("Usage per relay", ["Relay", "Created", "Share of tasks", "Succeeded", "Failed", "Credits charged", "Credits refunded", "Credits (net)"], detail.length ? detail : empty(8, "No usage in this range.")),
    h("p", { class: "muted small" }, "The tasks each relay created in this range; its invoice should count the same. Download CSV gives them per day and relay."),
  ];
}

function view(p, rows) {
  const byDay = new Map(rows.map((r) => [r.date, r]));
  const days = daysBetween(p.from, p.to);
  const of = (d, f) => byDay.get(d)?.[f] ?? 0;
  const tasks = days.map((d) => of(d, "tasks_created"));
  const credits = days.map((d) => of(d, "credits_charged") - of(d, "credits_refunded"));
  const detail = days
    .filter((d) => byDay.has(d))
    .reverse()
    .map((d) => {
      const r = byDay.get(d);
      return h("tr", {}, h("th", { scope: "row" }, d), h("td", {}, num(r.tasks_created)), h("td", {}, num(r.tasks_succeeded)), h("td", {}, num(r.tasks_failed)), h("td", {}, num(r.credits_charged)), h("td", {}, num(r.credits_refunded)));
    });
  return [
    tiles(rows),
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
