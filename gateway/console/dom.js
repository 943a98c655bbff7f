// Small DOM helpers. Text always goes in as text (textContent), never as HTML, so
// nothing an API answer holds can become markup; no inline style either (the CSP
// forbids it): widths are set through the CSSOM.

/** An element: `h("button", {class: "x", onclick: f}, "Label")`. */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "value") el.value = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

const SVG_NS = "http://www.w3.org/2000/svg";

/** An SVG element (attributes as given). */
export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

// --- formats -------------------------------------------------------------------------

/** A Unix time as "2026-11-30 19:38 UTC"; the API's times are UTC seconds. */
export function when(t, none = "—") {
  if (t === null || t === undefined) return none;
  return new Date(t * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC";
}

export function ago(t, none = "never") {
  if (t === null || t === undefined) return none;
  const seconds = Math.round(Date.now() / 1000 - t);
  if (seconds < 60) return "just now";
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

export const num = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));

/** A time element: the short form shown, the full one on hover and to assistive tech. */
export function time(t, text) {
  if (t === null || t === undefined) return h("span", { class: "muted" }, text ?? "—");
  return h("time", { datetime: new Date(t * 1000).toISOString(), title: when(t) }, text ?? when(t));
}

// --- feedback ------------------------------------------------------------------------

/** An alert region for errors; empty (and hidden) until `show`. */
export function alertBox() {
  const box = h("p", { class: "alert", role: "alert", hidden: true });
  return {
    el: box,
    show(err) {
      box.textContent = err.message;
      box.hidden = false;
    },
    clear() {
      box.textContent = "";
      box.hidden = true;
    },
  };
}

/**
 * Show an API error next to what caused it: under the form field its `param` names
 * (`data-param`), else in the form's own alert box.
 */
export function showError(err, { form, box }) {
  clearErrors(form);
  const field = form && err.param ? form.querySelector(`[data-param="${CSS.escape(err.param)}"]`) : null;
  if (field) {
    const input = field.querySelector("input, select, textarea");
    const slot = field.querySelector(".field-error");
    slot.textContent = err.message;
    slot.hidden = false;
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-describedby", [slot.id, input.dataset.hint].filter(Boolean).join(" "));
    input.focus();
    box?.clear();
  } else {
    box.show(err);
  }
}

export function clearErrors(form) {
  if (!form) return;
  for (const slot of form.querySelectorAll(".field-error")) {
    slot.textContent = "";
    slot.hidden = true;
  }
  for (const input of form.querySelectorAll("[aria-invalid]")) {
    input.removeAttribute("aria-invalid");
    if (input.dataset.hint) input.setAttribute("aria-describedby", input.dataset.hint);
    else input.removeAttribute("aria-describedby");
  }
}

let fieldCount = 0;

/** A labelled form field, with the slot its API error goes in. */
export function field(label, input, { param, hint } = {}) {
  const id = input.id || `f${++fieldCount}`;
  input.id = id;
  const slot = h("span", { class: "field-error", id: `${id}-error`, hidden: true });
  const hintEl = hint ? h("span", { class: "hint", id: `${id}-hint` }, hint) : null;
  if (hintEl) {
    input.dataset.hint = hintEl.id;
    input.setAttribute("aria-describedby", hintEl.id);
  }
  return h("div", { class: "field", "data-param": param }, h("label", { for: id }, label), input, hintEl, slot);
}

/** Run `work` with `button` showing that it is busy (and not clickable twice). */
export async function busy(button, work, label) {
  const text = button.textContent;
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  button.classList.add("busy");
  if (label) button.textContent = label;
  try {
    return await work();
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
    button.classList.remove("busy");
    if (label) button.textContent = text;
  }
}

/**
 * For a view that reloads on every filter change: `const ticket = sequence(); const mine = ticket(); ...
 * if (!mine.current()) return;` drops an answer overtaken by a newer request.
 */
export function sequence() {
  let last = 0;
  return () => {
    const mine = ++last;
    return { current: () => mine === last };
  };
}

/** A line that says a list is loading, then is replaced by what it loaded. */
export function loading(text = "Loading…") {
  return h("p", { class: "loading", role: "status" }, h("span", { class: "spinner", "aria-hidden": "true" }), text);
}

// --- dialogs -------------------------------------------------------------------------

/**
 * A modal dialog (focus kept inside, Escape closes it); removed from the page when
 * closed. `build(close)` returns its body.
 */
export function dialog(title, build) {
  const heading = h("h2", { id: `d${++fieldCount}` }, title);
  const el = h("dialog", { "aria-labelledby": heading.id });
  const close = () => el.close();
  el.addEventListener("close", () => el.remove());
  el.append(heading, build(close));
  document.body.append(el);
  el.showModal();
  return el;
}

/**
 * A dialog holding one form: `fields`, then an alert box and Cancel and `label` buttons.
 * On submit the last try's errors are cleared and `run(form, { close, send })` is awaited;
 * `send(work)` runs the API call with the button busy (`busyLabel`). A refusal shows in
 * the form, next to the field it names.
 */
export function formDialog(title, { label, busyLabel, fields, run }) {
  dialog(title, (close) => {
    const box = alertBox();
    const submit = h("button", { type: "submit", class: "primary" }, label);
    const send = (work) => busy(submit, work, busyLabel);
    const form = h(
      "form",
      {
        novalidate: true,
        onsubmit: async (event) => {
          event.preventDefault();
          clearErrors(form);
          box.clear();
          try {
            await run(form, { close, send });
          } catch (err) {
            showError(err, { form, box });
          }
        },
      },
      ...fields,
      box.el,
      h("div", { class: "actions" }, h("button", { type: "button", onclick: close }, "Cancel"), submit),
    );
    return form;
  });
}

/**
 * A form dialog that edits a record: it sends `changes(form)`, only what changed (so the
 * audit entry says what the operator did), through `save(body)`, then closes and calls
 * `reload()`. Nothing changed: it just closes.
 */
export function editDialog(title, { label, fields, changes, save, reload }) {
  formDialog(title, {
    label,
    busyLabel: "Saving…",
    fields,
    run: async (form, { close, send }) => {
      const body = changes(form);
      if (!Object.keys(body).length) {
        close();
        return;
      }
      await send(() => save(body));
      close();
      reload();
    },
  });
}

/** Ask before something that cannot be undone; resolves to whether it went ahead. */
export function confirmAction({ title, text, action, danger = true, run }) {
  return new Promise((resolve) => {
    let done = false;
    const d = dialog(title, (close) => {
      const box = alertBox();
      const go = h("button", { type: "submit", class: danger ? "danger" : "primary" }, action);
      const form = h(
        "form",
        {
          onsubmit: async (event) => {
            event.preventDefault();
            box.clear();
            try {
              await busy(go, run);
              done = true;
              close();
            } catch (err) {
              box.show(err);
            }
          },
        },
        h("p", {}, text),
        box.el,
        h("div", { class: "actions" }, h("button", { type: "button", onclick: close }, "Cancel"), go),
      );
      return form;
    });
    d.addEventListener("close", () => resolve(done));
  });
}

// --- secrets -------------------------------------------------------------------------

/**
 * A secret shown once, with a copy button. It exists in this element only: nothing
 * stores it, so a reload or leaving the page makes it gone.
 */
export function secretPanel(label, secret, note) {
  const value = h("code", { class: "secret-value" }, secret);
  const status = h("span", { class: "copied", role: "status" });
  const copy = h(
    "button",
    {
      type: "button",
      onclick: async () => {
        try {
          await navigator.clipboard.writeText(secret);
          status.textContent = "Copied.";
        } catch {
          const range = document.createRange();
          range.selectNodeContents(value);
          getSelection().removeAllRanges();
          getSelection().addRange(range);
          status.textContent = "Selected: press Ctrl+C (⌘C) to copy.";
        }
      },
    },
    "Copy secret",
  );
  return h(
    "section",
    { class: "secret", "aria-label": label },
    h("h3", {}, label),
    h("p", {}, note ?? "Copy it now: it is not shown again, and the gateway keeps only its hash."),
    h("div", { class: "secret-row" }, value, copy, status),
  );
}

// --- usage bars ----------------------------------------------------------------------

/** Usage against a limit as a bar (a `meter`), or the count alone when unlimited;
 * `used` undefined while it loads, null when the gateway does not count it. */
export function meter(label, used, limit) {
  const known = used !== undefined && used !== null;
  const text = used === undefined ? "…" : used === null ? "—" : limit === null || limit === undefined ? `${num(used)} · no limit` : `${num(used)} / ${num(limit)}`;
  const head = h("span", { class: "meter-head" }, h("span", { class: "meter-label" }, label), h("span", { class: "meter-value" }, text));
  if (!known || limit === null || limit === undefined) {
    return h("div", { class: "meter unlimited" }, head, h("div", { class: "track" }));
  }
  const ratio = limit > 0 ? Math.min(used / limit, 1) : 1;
  const fill = h("div", { class: "fill" });
  fill.style.width = `${(ratio * 100).toFixed(1)}%`;
  const level = ratio >= 1 ? "full" : ratio >= 0.8 ? "high" : "ok";
  return h(
    "div",
    { class: `meter ${level}`, role: "meter", "aria-label": label, "aria-valuemin": 0, "aria-valuemax": limit, "aria-valuenow": Math.min(used, limit), "aria-valuetext": text },
    head,
    h("div", { class: "track" }, fill),
  );
}

/** A table in a box; on a narrow screen each row becomes a card whose cells are
 * labelled by their column (`data-label`, shown by the CSS). */
export function table(caption, headers, rows) {
  for (const row of [rows].flat()) {
    [...row.children].forEach((cell, i) => {
      if (headers[i] && !cell.hasAttribute("colspan")) cell.dataset.label = headers[i];
    });
  }
  return h(
    "div",
    { class: "table-wrap", tabindex: 0, role: "region", "aria-label": caption },
    h(
      "table",
      {},
      h("caption", { class: "visually-hidden" }, caption),
      h("thead", {}, h("tr", {}, headers.map((name) => h("th", { scope: "col" }, name)))),
      h("tbody", {}, rows),
    ),
  );
}

export function empty(columns, text) {
  return h("tr", {}, h("td", { colspan: columns, class: "empty" }, text));
}
