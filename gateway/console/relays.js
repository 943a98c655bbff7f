// Relays: each relay's circuit state, routing order (priority, weight), whether it takes
// new tasks, refused keys, failovers and last error, as the answering gateway process sees
// them (GET /admin/v1/relays). Refreshed every 15 s while the page is shown.

import { get } from "./api.js";
import { alertBox, busy, empty, h, loading, num, sequence, table, time } from "./dom.js";

const REFRESH_MS = 15000;

// state → what it is called, and what it means for new tasks (the colour is in the CSS)
export const STATES = {
  closed: ["Closed", "takes new tasks"],
  half_open: ["Half-open", "one probe create decides"],
  cooling: ["Cooling", "after a 429, until"],
  open: ["Open", "skipped; probed again at"],
};

export function render(main) {
  const box = alertBox();
  const refresh = h("button", { type: "button" }, "Refresh");
  const summary = h("p", { class: "muted small", role: "status" });
  const list = h("div", {}, loading("Loading relays…"));
  main.append(
    h("div", { class: "page-head" }, h("h1", { tabindex: -1 }, "Relays"), h("div", { class: "toolbar-buttons" }, h("a", { class: "button", href: "#/usage?by=relay" }, "Usage by relay"), refresh)),
    h(
      "p",
      { class: "lede" },
      "The relays new tasks are routed to: the lowest priority number first, by weight within it; a relay whose circuit is open or that is cooling after a 429 is skipped. A task stays with the relay that created it. Each gateway process answers with its own view.",
    ),
    box.el,
    summary,
    list,
  );
  const ticket = sequence();
  let timer = null;
  const load = async () => {
    const mine = ticket();
    clearTimeout(timer);
    box.clear();
    try {
      const { data } = await busy(refresh, () => get("/relays"));
      if (!mine.current()) return;
      const closed = data.filter((r) => r.state === "closed" && r.enabled).length;
      const enabled = data.filter((r) => r.enabled).length;
      summary.textContent = `${closed} of ${enabled} enabled relays closed (taking new tasks).`;
      list.replaceChildren(relayTable(data));
    } catch (err) {
      if (!mine.current()) return;
      summary.textContent = "";
      list.replaceChildren();
      box.show(err);
    }
    // until the page is left (main.js replaces `main`)
    if (main.isConnected) timer = setTimeout(() => main.isConnected && load(), REFRESH_MS);
  };
  refresh.addEventListener("click", load);
  load();
}

function stateCell(r) {
  const [label, known] = STATES[r.state] ?? [r.state, ""];
  // a drained relay keeps its circuit, but takes no new task whatever its state
  const meaning = r.enabled || r.state !== "closed" ? known : "drained: no new tasks";
  const pill = h("span", { class: `pill state ${r.state in STATES ? r.state : "unknown"}` }, label);
  const until = r.until !== null && r.until !== undefined ? [" ", time(r.until)] : null;
  return h("td", {}, pill, h("span", { class: "small muted block" }, meaning, until));
}

function relayTable(relays) {
  const rows = relays.map((r) =>
    h(
      "tr",
      { "data-relay": r.id },
      h("th", { scope: "row" }, h("span", { class: "tenant-name" }, r.id), h("span", { class: "small muted block" }, r.host)),
      stateCell(r),
      h("td", { class: "num" }, num(r.priority)),
      h("td", { class: "num" }, num(r.weight)),
      h("td", {}, r.enabled ? h("span", { class: "pill on" }, "Enabled") : h("span", { class: "pill off", title: "enabled = false: no new tasks; its tasks are still served" }, "Drained")),
      h("td", { class: r.keys.refused > 0 ? "num refused" : "num" }, `${num(r.keys.refused)} of ${num(r.keys.total)}`),
      h("td", { class: "num" }, num(r.failovers)),
      h("td", { class: "reason" }, r.last_error ?? h("span", { class: "muted" }, "—")),
    ),
  );
  return table("Relays", ["Relay", "State", "Priority", "Weight", "New tasks", "Keys refused", "Failovers", "Last error"], rows.length ? rows : empty(8, "No relays configured."));
}
