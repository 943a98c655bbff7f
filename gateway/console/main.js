// The console's shell: sign-in, the navigation and the hash router (#/tenants,
// #/keys/<tenant>, #/usage, #/relays, #/webhooks, #/audit). Only the page's place is in the URL,
// never the admin key.

import { ApiError, get, onUnauthorized, session } from "./api.js";
import { alertBox, busy, field, h } from "./dom.js";
import * as audit from "./audit.js";
import * as keys from "./keys.js";
import * as relays from "./relays.js";
import * as tenants from "./tenants.js";
import * as usage from "./usage.js";
import * as webhooks from "./webhooks.js";

const PAGES = { tenants, keys, usage, relays, webhooks, audit };
const NAV = [
  ["tenants", "Tenants"],
  ["keys", "Keys"],
  ["usage", "Usage"],
  ["relays", "Relays"],
  ["webhooks", "Webhooks"],
  ["audit", "Audit"],
];
const app = document.getElementById("app");

/** The route in the hash: `#/keys/acme?x=1` → {page: "keys", arg: "acme", query}. */
function route() {
  const [path, search] = location.hash.replace(/^#\/?/, "").split("?");
  const [page, ...rest] = path.split("/");
  return {
    page: PAGES[page] ? page : "tenants",
    arg: rest.length ? decodeURIComponent(rest.join("/")) : null,
    query: new URLSearchParams(search ?? ""),
  };
}

function signInView(reason) {
  const box = alertBox();
  const input = h("input", { type: "password", autocomplete: "off", spellcheck: "false", required: true });
  const button = h("button", { type: "submit", class: "primary" }, "Sign in");
  // no `name` on the input and method=post: were the script to fail, the browser could
  // never put the key in a URL
  const form = h(
    "form",
    {
      class: "signin-card",
      method: "post",
      "aria-labelledby": "signin-title",
      onsubmit: async (event) => {
        event.preventDefault();
        box.clear();
        const key = input.value.trim();
        try {
          await busy(button, () => get("/tenants", { limit: 1 }, { key }), "Signing in…");
        } catch (err) {
          box.show(err.status === 403 ? new ApiError(403, `${err.message} Sign in with an admin key.`) : err);
          input.select();
          return;
        }
        session.signIn(key);
        input.value = "";
        render();
      },
    },
    h("div", { class: "brand big" }, h("img", { src: "assets/icon.svg", alt: "", width: 40, height: 40 }), h("span", {}, "runway-gateway")),
    h("h1", { id: "signin-title" }, "Admin console"),
    reason ? h("p", { class: "notice", role: "status" }, reason) : null,
    field("Admin key", input, { hint: "Kept in this tab only, until you sign out or close it." }),
    box.el,
    button,
  );
  return h("main", { id: "main", class: "signin" }, form);
}

function shell(current) {
  const signOut = h("button", { type: "button", class: "ghost", onclick: () => { session.signOut(); render(); } }, "Sign out");
  const links = NAV.map(([page, label]) =>
    h("a", { href: `#/${page}`, "aria-current": page === current ? "page" : null }, label),
  );
  return h(
    "header",
    { class: "top" },
    h("a", { class: "brand", href: "#/tenants" }, h("img", { src: "assets/icon.svg", alt: "", width: 28, height: 28 }), h("span", {}, "runway-gateway")),
    h("nav", { "aria-label": "Console" }, links),
    signOut,
  );
}

let shown = null; // the page shown, to move focus only when it changes

function render(reason) {
  // a dialog belongs to the view it was opened from
  for (const open of document.querySelectorAll("dialog")) open.close();
  if (!session.key()) {
    shown = null;
    app.replaceChildren(signInView(reason));
    app.querySelector("input").focus();
    return;
  }
  const { page, arg, query } = route();
  const main = h("main", { id: "main", tabindex: -1 });
  app.replaceChildren(shell(page), main);
  PAGES[page].render(main, { arg, query });
  if (shown !== null && shown !== page) main.querySelector("h1")?.focus();
  shown = page;
}

onUnauthorized((err) => render(`Signed out: ${err.message}`));
window.addEventListener("hashchange", () => render());
document.querySelector(".skip").addEventListener("click", (event) => {
  event.preventDefault();
  document.getElementById("main")?.focus();
});
render();
