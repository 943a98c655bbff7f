// The admin API client: every call carries the admin key as a Bearer header. The key
// lives in this tab's sessionStorage only (never localStorage, a cookie or a URL).

const STORAGE_KEY = "runway-gateway.admin-key";
const BASE = "/admin/v1";

/** An error answer of the API (its OpenAI-shaped `error`), or the network failing. */
export class ApiError extends Error {
  constructor(status, message, code = null, param = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

export const session = {
  key: () => sessionStorage.getItem(STORAGE_KEY),
  signIn: (key) => sessionStorage.setItem(STORAGE_KEY, key),
  signOut: () => sessionStorage.removeItem(STORAGE_KEY),
};

let unauthorized = () => {};

/** What to do when the API answers 401 to the stored key (it was revoked or rotated
 * away from the config): the key is dropped and the console returns to sign-in. */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

function url(path, query) {
  const u = new URL(BASE + path, location.origin);
  for (const [name, value] of Object.entries(query ?? {})) {
    if (value !== undefined && value !== null && value !== "") u.searchParams.set(name, String(value));
  }
  return u;
}

async function errorOf(resp) {
  try {
    const { error } = await resp.json();
    return new ApiError(resp.status, error.message, error.code, error.param);
  } catch {
    return new ApiError(resp.status, `The gateway answered ${resp.status} ${resp.statusText}.`);
  }
}

/**
 * One admin API call. `as`: "json" (default), "text" or "blob". `key` signs in with a
 * key not yet stored (a 401 to it is only an error, not a sign-out).
 */
export async function call(method, path, { body, query, as = "json", key } = {}) {
  const credential = key ?? session.key();
  // signed out meanwhile (another call's 401): nothing to send, and no second sign-out
  if (!credential) throw new ApiError(401, "Signed out.", "signed_out");
  const headers = { Authorization: `Bearer ${credential}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(url(path, query), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch (err) {
    throw new ApiError(0, `The gateway did not answer (${err.message}).`, "network_error");
  }
  if (!resp.ok) {
    const err = await errorOf(resp);
    if (resp.status === 401 && key === undefined && session.key() === credential) {
      session.signOut();
      unauthorized(err);
    }
    throw err;
  }
  if (as === "text") return resp.text();
  if (as === "blob") return resp.blob();
  return resp.json();
}

export const get = (path, query, options) => call("GET", path, { query, ...options });
export const post = (path, body) => call("POST", path, { body });
export const patch = (path, body) => call("PATCH", path, { body });
export const del = (path) => call("DELETE", path);

/** Every page of a list route (`after` = the last id of the previous page). */
export async function all(path, query = {}) {
  const items = [];
  let after;
  for (;;) {
    const page = await get(path, { ...query, limit: 1000, after });
    items.push(...page.data);
    if (!page.has_more || page.data.length === 0) return items;
    after = page.data[page.data.length - 1].id;
  }
}

/** Path segments are ids the API chose or checked, but encode them anyway. */
export const seg = (id) => encodeURIComponent(id);
