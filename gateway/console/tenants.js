// Tenants: limits against usage as bars, enabled state; create, edit limits, disable.

import { all, get, patch, post, seg } from "./api.js";
import { alertBox, busy, confirmAction, editDialog, empty, field, formDialog, h, loading, meter, secretPanel, sequence, table } from "./dom.js";

export const LIMITS = [
  ["requests_per_minute", "Requests per minute"],
  ["tasks_per_minute", "Tasks per minute"],
  ["max_active_tasks", "Active tasks"],
  ["tasks_per_day", "Tasks per day"],
  ["credits_per_day", "Credits per day"],
  ["credits_per_month", "Credits per month"],
];

export function render(main) {
  const list = h("div", {}, loading("Loading tenants…"));
  const box = alertBox();
  const create = h("button", { type: "button", class: "primary", onclick: () => createDialog(reload) }, "New tenant");
  main.append(
    h("div", { class: "page-head" }, h("h1", { tabindex: -1 }, "Tenants"), create),
    h("p", { class: "lede" }, "Each tenant's limits against what it uses now: active tasks, today and this month (UTC)."),
    box.el,
    list,
  );
  const ticket = sequence();
  const reload = async () => {
    const mine = ticket();
    box.clear();
    try {
      const tenants = await all("/tenants");
      if (!mine.current()) return;
      list.replaceChildren(tenantTable(tenants, reload));
    } catch (err) {
      if (!mine.current()) return;
      list.replaceChildren();
      box.show(err);
    }
  };
  reload();
}

function tenantTable(tenants, reload) {
  const rows = tenants.map((t) => tenantRow(t, reload));
  return table("Tenants", ["Tenant", "State", "Active tasks", "Today", "This month", ""], rows.length ? rows : empty(6, "No tenants yet."));
}

function tenantRow(t, reload) {
  // undefined usage: still loading
  const active = h("td", {}, meter("Active", undefined, t.limits.max_active_tasks));
  const today = h("td", {}, meter("Tasks", undefined, t.limits.tasks_per_day), meter("Credits", undefined, t.limits.credits_per_day));
  const month = h("td", {}, meter("Tasks", undefined, null), meter("Credits", undefined, t.limits.credits_per_month));
  const rowBox = alertBox();
  const actions = h("td", { class: "row-actions" }, h("a", { class: "button", href: `#/keys/${seg(t.id)}`, "aria-label": `Keys of ${t.id}` }, "Keys"));
  if (t.source === "api") {
    actions.append(
      h("button", { type: "button", "aria-label": `Edit limits of ${t.id}`, onclick: () => limitsDialog(t, reload) }, "Edit limits"),
      t.enabled
        ? h("button", { type: "button", class: "danger-quiet", "aria-label": `Disable ${t.id}`, onclick: () => disable(t, reload) }, "Disable")
        : h("button", { type: "button", "aria-label": `Enable ${t.id}`, onclick: (e) => enable(e.currentTarget, t, reload, rowBox) }, "Enable"),
    );
  } else {
    actions.append(h("span", { class: "muted small", title: "Change it in the config file and reload" }, "in config file"));
  }
  actions.append(rowBox.el);
  const row = h(
    "tr",
    { "data-tenant": t.id },
    h(
      "th",
      { scope: "row" },
      h("span", { class: "tenant-name" }, t.name),
      h("span", { class: "tenant-id" }, h("code", {}, t.id), h("span", { class: `badge ${t.source}` }, t.source)),
    ),
    h("td", {}, h("span", { class: `pill ${t.enabled ? "on" : "off"}` }, t.enabled ? "Enabled" : "Disabled")),
    active,
    today,
    month,
    actions,
  );
  // each tenant's usage is its own read; the row fills in when it arrives
  get(`/tenants/${seg(t.id)}`).then(
    ({ usage, limits }) => {
      active.replaceChildren(meter("Active", usage.active, limits.max_active_tasks));
      today.replaceChildren(meter("Tasks", usage.tasks_today, limits.tasks_per_day), meter("Credits", usage.credits_today, limits.credits_per_day));
      month.replaceChildren(meter("Tasks", usage.tasks_this_month ?? null, null), meter("Credits", usage.credits_this_month, limits.credits_per_month));
    },
    (err) => rowBox.show(err),
  );
  return row;
}

export function limitFields(limits = {}) {
  return LIMITS.map(([name, label]) =>
    field(label, h("input", { type: "number", min: 0, step: 1, inputmode: "numeric", name, value: limits[name] ?? "", placeholder: "no limit" }), {
      param: `limits.${name}`,
    }),
  );
}

/** The limits typed in a form: an empty field is `null` (no limit). */
export function readLimits(form) {
  const limits = {};
  for (const [name] of LIMITS) {
    const raw = form.elements[name].value.trim();
    limits[name] = raw === "" ? null : Number(raw);
  }
  return limits;
}

function createDialog(reload) {
  formDialog("New tenant", {
    label: "Create tenant",
    busyLabel: "Creating…",
    fields: [
      h(
        "div",
        { class: "grid2" },
        field("Tenant id", h("input", { name: "id", required: true, pattern: "[a-z0-9\\-]{1,64}", maxlength: 64, autocomplete: "off", spellcheck: "false" }), { param: "id", hint: "Lower-case letters, digits and -, up to 64." }),
        field("Display name", h("input", { name: "name", autocomplete: "off" }), { param: "name" }),
      ),
      h("fieldset", {}, h("legend", {}, "Limits (empty: no limit)"), h("div", { class: "grid2" }, limitFields())),
      field("Webhook hosts", h("input", { name: "hook_hosts", autocomplete: "off", spellcheck: "false", placeholder: "hooks.example.com" }), {
        param: "policy.hook_hosts",
        hint: "Hosts this tenant's notify_hook may call, separated by commas.",
      }),
    ],
    run: async (form, { close, send }) => {
      const hosts = form.elements.hook_hosts.value.split(/[\s,]+/).filter(Boolean);
      const body = { id: form.elements.id.value.trim(), limits: readLimits(form) };
      if (form.elements.name.value.trim()) body.name = form.elements.name.value.trim();
      if (hosts.length) body.policy = { hook_hosts: hosts };
      const created = await send(() => post("/tenants", body));
      reload();
      form.replaceWith(
        h(
          "div",
          {},
          h("p", { role: "status" }, `Tenant ${created.id} created.`),
          secretPanel("Webhook secret", created.webhook_secret, "It signs this tenant's webhooks. Copy it now: it is not shown again."),
          h("div", { class: "actions" }, h("a", { class: "button", href: `#/keys/${seg(created.id)}`, onclick: close }, "Mint a key"), h("button", { type: "button", class: "primary", onclick: close }, "Done")),
        ),
      );
    },
  });
}

function limitsDialog(t, reload) {
  editDialog(`Limits of ${t.id}`, {
    label: "Save limits",
    fields: [
      field("Display name", h("input", { name: "name", value: t.name, autocomplete: "off" }), { param: "name" }),
      h("fieldset", {}, h("legend", {}, "Limits (empty: no limit)"), h("div", { class: "grid2" }, limitFields(t.limits))),
      h("p", { class: "hint" }, "A change applies on every replica within a second; a limit below current usage refuses new work and stops nothing running."),
    ],
    changes: (form) => {
      const body = {};
      const limits = Object.entries(readLimits(form)).filter(([k, v]) => v !== t.limits[k]);
      if (limits.length) body.limits = Object.fromEntries(limits);
      const name = form.elements.name.value.trim();
      if (name !== t.name) body.name = name;
      return body;
    },
    save: (body) => patch(`/tenants/${seg(t.id)}`, body),
    reload,
  });
}

async function disable(t, reload) {
  const done = await confirmAction({
    title: `Disable ${t.id}?`,
    text: "Its keys are refused (403) within a second. Tasks already running finish. You can enable it again.",
    action: "Disable tenant",
    run: () => patch(`/tenants/${seg(t.id)}`, { enabled: false }),
  });
  if (done) reload();
}

async function enable(button, t, reload, box) {
  box.clear();
  try {
    await busy(button, () => patch(`/tenants/${seg(t.id)}`, { enabled: true }));
    reload();
  } catch (err) {
    box.show(err);
  }
}
