// Webhook deliveries: the dead (given up) and the pending, and redelivery of a dead one.

import { all, get, post, seg } from "./api.js";
import { alertBox, busy, empty, field, h, loading, num, sequence, table, time } from "./dom.js";

export function render(main, { query }) {
  const status = query.get("status") === "pending" ? "pending" : "dead";
  const box = alertBox();
  const tenants = h("select", { name: "tenant" }, h("option", { value: "" }, "All tenants"));
  const refresh = h("button", { type: "button" }, "Refresh");
  const tabs = h(
    "div",
    { class: "segmented", role: "group", "aria-label": "Delivery status" },
    [
      ["dead", "Dead"],
      ["pending", "Pending"],
    ].map(([value, label]) => h("a", { href: `#/webhooks?status=${value}`, class: "button", "aria-current": value === status ? "page" : null }, label)),
  );
  const list = h("div", {});
  main.append(
    h("div", { class: "page-head" }, h("h1", { tabindex: -1 }, "Webhooks")),
    h("p", { class: "lede" }, "Deliveries of task events to tenants' notify_hook URLs. A dead one ran out of attempts; redelivering queues it again with its attempts reset."),
    h("div", { class: "toolbar" }, tabs, field("Tenant", tenants), refresh),
    box.el,
    list,
  );
  const ticket = sequence();
  const load = async () => {
    const mine = ticket();
    box.clear();
    list.replaceChildren(loading(`Loading ${status} deliveries…`));
    try {
      const page = await busy(refresh, () => get("/webhooks", { status, tenant: tenants.value, limit: 1000 }));
      if (!mine.current()) return;
      list.replaceChildren(eventTable(page.data, status));
      if (page.has_more) list.append(h("p", { class: "muted small" }, "Showing the newest 1000."));
    } catch (err) {
      if (!mine.current()) return;
      list.replaceChildren();
      box.show(err);
    }
  };
  tenants.addEventListener("change", load);
  refresh.addEventListener("click", load);
  all("/tenants").then(
    (list) => tenants.append(...list.map((t) => h("option", { value: t.id }, t.id))),
    (err) => box.show(err),
  );
  load();
}

function eventTable(events, status) {
  const rows = events.map((e) => {
    const rowBox = alertBox();
    const action = h("td", { class: "row-actions" });
    if (e.status === "dead") {
      const button = h("button", { type: "button", "aria-label": `Redeliver ${e.id}` }, "Redeliver");
      button.addEventListener("click", async () => {
        rowBox.clear();
        try {
          await busy(button, () => post(`/webhooks/${seg(e.id)}/redeliver`, {}), "Queuing…");
          action.replaceChildren(h("span", { class: "pill on", role: "status" }, "Queued"));
        } catch (err) {
          rowBox.show(err);
        }
      });
      action.append(button);
    }
    action.append(rowBox.el);
    return h(
      "tr",
      { "data-event": e.id },
      h("th", { scope: "row" }, h("code", { class: "small block" }, e.id)),
      h("td", {}, e.tenant),
      h("td", {}, h("code", { class: "small" }, e.task_id)),
      h("td", {}, num(e.attempts)),
      h("td", {}, time(e.next_attempt_at)),
      h("td", { class: "reason" }, e.last_error ?? h("span", { class: "muted" }, "—")),
      h("td", {}, time(e.created_at)),
      action,
    );
  });
  return table(`${status === "dead" ? "Dead" : "Pending"} deliveries`, ["Event", "Tenant", "Task", "Attempts", "Next attempt", "Last error", "Created", ""], rows.length ? rows : empty(8, `No ${status} deliveries.`));
}
