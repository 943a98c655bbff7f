// Keys of one tenant: list, mint (secret shown once), rotate with a grace period,
// revoke with a confirmation; a key's own limits, scopes and networks shown and edited.

import { all, del, patch, post, seg } from "./api.js";
import { ago, alertBox, busy, clearErrors, confirmAction, editDialog, empty, field, formDialog, h, loading, secretPanel, sequence, showError, table, time } from "./dom.js";
import { LIMITS, limitFields, readLimits } from "./tenants.js";

const SCOPES = ["create", "read", "delete"];

const EXPIRY = [
  ["", "Never"],
  ["86400", "In 1 day"],
  ["2592000", "In 30 days"],
  ["7776000", "In 90 days"],
  ["31536000", "In 1 year"],
];
const GRACE = [
  ["0", "No grace: the old secret stops now"],
  ["3600", "1 hour"],
  ["86400", "24 hours"],
  ["604800", "7 days"],
];

export function render(main, { arg }) {
  const box = alertBox();
  const picker = h("select", { id: "key-tenant" });
  const head = h("div", { class: "page-head" }, h("h1", { tabindex: -1 }, "Keys"), h("div", { class: "inline-field" }, h("label", { for: picker.id }, "Tenant"), picker));
  const body = h("div", {}, loading("Loading tenants…"));
  main.append(head, box.el, body);
  picker.addEventListener("change", () => {
    location.hash = `#/keys/${seg(picker.value)}`;
  });
  all("/tenants").then(
    (tenants) => {
      if (!tenants.length) {
        body.replaceChildren(h("p", { class: "empty" }, "No tenants yet: create one on the Tenants page."));
        return;
      }
      const chosen = tenants.find((t) => t.id === arg) ?? tenants[0];
      picker.replaceChildren(...tenants.map((t) => h("option", { value: t.id, selected: t.id === chosen.id }, t.id === t.name ? t.id : `${t.id} (${t.name})`)));
      body.replaceChildren();
      tenantKeys(body, chosen);
    },
    (err) => {
      body.replaceChildren();
      box.show(err);
    },
  );
}

function tenantKeys(body, tenant) {
  const secretSlot = h("div", { class: "secret-slot" });
  const list = h("div", {}, loading("Loading keys…"));
  const box = alertBox();
  const ticket = sequence();
  const reload = async () => {
    const mine = ticket();
    try {
      const keys = await all(`/tenants/${seg(tenant.id)}/keys`);
      if (!mine.current()) return;
      box.clear();
      list.replaceChildren(keyTable(keys, { reload, reveal }));
    } catch (err) {
      list.replaceChildren();
      box.show(err);
    }
  };
  const reveal = (title, secret, note) => {
    secretSlot.replaceChildren(secretPanel(title, secret, note));
    secretSlot.querySelector("button").focus();
  };
  body.append(mintForm(tenant, { reload, reveal }), secretSlot, box.el, list);
  reload();
}

function mintForm(tenant, { reload, reveal }) {
  const box = alertBox();
  const submit = h("button", { type: "submit", class: "primary" }, "Mint key");
  const form = h(
    "form",
    {
      class: "toolbar",
      "aria-label": "Mint a key",
      novalidate: true,
      onsubmit: async (event) => {
        event.preventDefault();
        clearErrors(form);
        box.clear();
        const body = { name: form.elements.name.value.trim() };
        const expires = form.elements.expires.value;
        if (expires) body.expires_in_seconds = Number(expires);
        try {
          const key = await busy(submit, () => post(`/tenants/${seg(tenant.id)}/keys`, body), "Minting…");
          form.reset();
          reveal(`Secret of ${key.name}`, key.secret);
          reload();
        } catch (err) {
          showError(err, { form, box });
        }
      },
    },
    field("Key name", h("input", { name: "name", autocomplete: "off", placeholder: "billing-svc" }), { param: "name" }),
    field("Expires", h("select", { name: "expires" }, EXPIRY.map(([v, label]) => h("option", { value: v }, label))), { param: "expires_in_seconds" }),
    submit,
    box.el,
  );
  return form;
}

function state(k) {
  const now = Date.now() / 1000;
  if (k.revoked_at !== null) return h("span", { class: "pill off" }, "Revoked");
  if (k.expires_at !== null && k.expires_at <= now) return h("span", { class: "pill off" }, "Expired");
  const pill = h("span", { class: "pill on" }, "Active");
  if (k.previous_secret_expires_at !== null && k.previous_secret_expires_at > now) {
    return [pill, h("span", { class: "small muted block" }, "old secret until ", time(k.previous_secret_expires_at))];
  }
  return pill;
}

function keyTable(keys, handlers) {
  const rows = keys.map((k) => {
    const label = k.name ?? k.id;
    const rowBox = alertBox();
    const actions = h("td", { class: "row-actions" });
    if (k.source === "api" && k.revoked_at === null) {
      actions.append(
        h("button", { type: "button", "aria-label": `Edit access of key ${label}`, onclick: () => accessDialog(k, handlers) }, "Access"),
        h("button", { type: "button", "aria-label": `Rotate key ${label}`, onclick: () => rotateDialog(k, handlers) }, "Rotate"),
        h("button", { type: "button", class: "danger-quiet", "aria-label": `Revoke key ${label}`, onclick: () => revoke(k, handlers) }, "Revoke"),
      );
    } else if (k.source === "config") {
      actions.append(h("span", { class: "muted small" }, "in config file"));
    }
    actions.append(rowBox.el);
    return h(
      "tr",
      { "data-key": k.id },
      h("th", { scope: "row" }, h("span", { class: "tenant-name" }, k.name ?? "(config key)"), h("code", { class: "small muted block" }, k.id)),
      h("td", {}, k.prefix ? h("code", {}, `${k.prefix}…`) : h("span", { class: "muted" }, "—")),
      h("td", {}, time(k.created_at)),
      h("td", {}, k.expires_at === null ? time(null, "never") : time(k.expires_at)),
      h("td", {}, time(k.last_used_at, ago(k.last_used_at))),
      h("td", {}, state(k)),
      h("td", { class: "key-access" }, access(k)),
      actions,
    );
  });
  return table("Keys", ["Name", "Prefix", "Created", "Expires", "Last used", "State", "Access", ""], rows.length ? rows : empty(8, "No keys yet: mint one above."));
}

/** A key's own limits, scopes and networks (contract §15), in short. */
function access(k) {
  const limits = LIMITS.filter(([name]) => k.limits[name] !== null).map(([name, label]) => `${label}: ${k.limits[name]}`);
  const all = SCOPES.every((scope) => k.scopes.includes(scope));
  return [
    h("span", { class: "block" }, limits.length ? limits.join(", ") : h("span", { class: "muted" }, "tenant's limits only")),
    h("span", { class: "small block" }, all ? "all scopes" : `only ${k.scopes.join(", ")}`),
    h("span", { class: "small muted block" }, k.allowed_cidrs ? `from ${k.allowed_cidrs.join(", ")}` : "from anywhere"),
  ];
}

function accessDialog(k, { reload }) {
  const scopeBoxes = SCOPES.map((scope) =>
    h("label", { class: "check" }, h("input", { type: "checkbox", name: `scope-${scope}`, checked: k.scopes.includes(scope) }), ` ${scope}`),
  );
  const cidrs = h("textarea", { name: "allowed_cidrs", rows: 3, placeholder: "anywhere" });
  cidrs.value = (k.allowed_cidrs ?? []).join("\n");
  editDialog(`Access of ${k.name}`, {
    label: "Save access",
    fields: [
      h("p", {}, "The key's own limits apply on top of its tenant's: a request needs both."),
      h("fieldset", {}, h("legend", {}, "Key limits (empty: the tenant's only)"), h("div", { class: "grid2" }, limitFields(k.limits))),
      h("fieldset", { "data-param": "scopes" }, h("legend", {}, "Scopes"), ...scopeBoxes, h("span", { class: "field-error", hidden: true })),
      field("Allowed networks (CIDRs, one per line; empty: anywhere)", cidrs, { param: "allowed_cidrs" }),
      h("p", { class: "hint" }, "A change applies on every replica within a second."),
    ],
    changes: (form) => {
      const body = {};
      const limits = Object.entries(readLimits(form)).filter(([name, v]) => v !== k.limits[name]);
      if (limits.length) body.limits = Object.fromEntries(limits);
      const scopes = SCOPES.filter((scope) => form.elements[`scope-${scope}`].checked);
      if (scopes.join() !== k.scopes.join()) body.scopes = scopes.length === SCOPES.length ? null : scopes;
      const networks = cidrs.value.split(/[\s,]+/).filter(Boolean);
      if (networks.join() !== (k.allowed_cidrs ?? []).join()) body.allowed_cidrs = networks.length ? networks : null;
      return body;
    },
    save: (body) => patch(`/keys/${seg(k.id)}`, body),
    reload,
  });
}

function rotateDialog(k, { reload, reveal }) {
  formDialog(`Rotate ${k.name}`, {
    label: "Rotate key",
    busyLabel: "Rotating…",
    fields: [
      h("p", {}, "The key keeps its id and name and gets a new secret."),
      field("Old secret keeps working for", h("select", { name: "grace" }, GRACE.map(([v, label]) => h("option", { value: v, selected: v === "86400" }, label))), { param: "grace_seconds" }),
    ],
    run: async (form, { close, send }) => {
      const grace = Number(form.elements.grace.value);
      const rotated = await send(() => post(`/keys/${seg(k.id)}/rotate`, { grace_seconds: grace }));
      close();
      const until = rotated.previous_secret_expires_at;
      const note = until ? `The old secret keeps working until ${new Date(until * 1000).toISOString().slice(0, 16).replace("T", " ")} UTC. Copy the new one now: it is not shown again.` : "The old secret no longer works. Copy the new one now: it is not shown again.";
      reveal(`New secret of ${k.name}`, rotated.secret, note);
      reload();
    },
  });
}

async function revoke(k, { reload }) {
  const done = await confirmAction({
    title: `Revoke ${k.name}?`,
    text: `Requests with ${k.prefix}… are refused (401) within a second, on every replica. This cannot be undone: mint a new key instead.`,
    action: "Revoke key",
    run: () => del(`/keys/${seg(k.id)}`),
  });
  if (done) reload();
}

