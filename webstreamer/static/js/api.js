// The JSON API: one fetch wrapper whose errors carry the server's message.
import { t } from "./i18n.js";

class ApiError extends Error {
  constructor(status, body) {
    const detail = body && body.detail;
    let message = `HTTP ${status}`;
    if (detail && typeof detail === "object" && !Array.isArray(detail) && detail.message) {
      message = detail.message;
    } else if (typeof detail === "string" && detail) {
      message = detail;
    } else if (body && body.error) {
      message = String(body.error).replace(/_/g, " ");
    }
    super(message);
    this.status = status;
    this.body = body;
  }
}

let unauthorized = () => {};

/** What to do when any call answers 401 (the session ended): set once at start-up. */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

export async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  } else if (method !== "GET" && method !== "HEAD") {
    // The server takes a change signed in by the cookie only with a JSON type: forged forms
    // cannot send one.
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (_) {
    throw new ApiError(0, { error: "network", detail: t("web.error.network") });
  }
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  if (response.status === 401) unauthorized();
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}
