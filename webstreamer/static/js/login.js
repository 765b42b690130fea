// Signing in and out: the token form, the session cookie, and which view the page shows.
import { startCluster, stopCluster } from "./cluster.js";
import { api } from "./api.js";
import { $, toast } from "./dom.js";
import { t } from "./i18n.js";
import { connect, disconnect, setConnection } from "./live.js";
import { loadSettings } from "./settings.js";
import { state } from "./state.js";
import { drawChart } from "./stats.js";
import { forgetShownToken, loadTokens } from "./tokens.js";

export function showLogin() {
  $("dashboard").hidden = true;
  $("logout").hidden = true;
  $("logout-all").hidden = true;
  $("login-view").hidden = false;
  setConnection("signed-out");
  $("token").focus();
}

/** The dashboard for `admin` or a user: settings, nodes and "sign out everywhere" are an
 * admin's (the server refuses them to a user, so a user's page never asks for them). */
function showDashboard(admin) {
  $("login-view").hidden = true;
  $("dashboard").hidden = false;
  $("logout").hidden = false;
  $("logout-all").hidden = !admin;
  $("settings").hidden = !admin;
  if (!admin) $("nodes").hidden = true;
  if (window.location.pathname === "/login") window.history.replaceState(null, "", "/");
  drawChart();
}

/** The session ended (`notify`: say so) or the user signed out: back to the form. */
export function signedOut(notify) {
  if (!state.signedIn) return;
  state.signedIn = false;
  state.me = null;
  disconnect();
  stopCluster();
  forgetShownToken();
  showLogin();
  if (notify) toast(t("web.error.unauthorized"), "bad");
}

/** Who is signed in (GET /api/me), or null: not signed in (401) or the server is away. */
export async function whoAmI() {
  try {
    const response = await fetch("/api/me", {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    return response.ok ? await response.json() : null;
  } catch (_) {
    return null;
  }
}

/** Signed in as `me` (the answer of GET /api/me). */
export function signedIn(me) {
  const admin = me.role === "admin";
  state.signedIn = true;
  state.me = me;
  document.body.dataset.loginState = "";
  document.body.dataset.role = admin ? "admin" : "user";
  showDashboard(admin);
  connect();
  loadTokens();
  if (admin) {
    startCluster();
    loadSettings();
  }
}

export async function onLoginSubmit(event) {
  event.preventDefault();
  const input = $("token");
  const token = input.value.trim();
  if (!token) return;
  const button = $("login-submit");
  const error = $("login-error");
  button.disabled = true;
  try {
    const response = await fetch("/login", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ token }),
    });
    const me = response.ok ? await whoAmI() : null;
    if (me) {
      input.value = "";
      signedIn(me);
      return;
    }
    if (response.status === 401 || response.status === 403) error.textContent = t("web.login.failed");
    else if (response.ok) error.textContent = t("web.login.error", { message: t("web.error.network") });
    else error.textContent = t("web.login.error", { message: `HTTP ${response.status}` });
    document.body.dataset.loginState = "failed";
    input.select();
  } catch (_) {
    error.textContent = t("web.login.error", { message: t("web.error.network") });
    document.body.dataset.loginState = "failed";
  } finally {
    button.disabled = false;
  }
}

export async function onLogout() {
  try {
    await fetch("/logout", {
      method: "POST",
      credentials: "same-origin",
      headers: { Accept: "application/json", "Content-Type": "application/json" },
    });
  } catch (_) {
    // the server could not be told; the page forgets the session anyway
  }
  signedOut(false);
}

/** Sign out everywhere: every session of the dashboard ends, on every device, this one too. */
export async function onLogoutEverywhere() {
  try {
    const data = await api("POST", "/api/sessions/revoke-all");
    signedOut(false);
    toast(t("web.logout_all.done", { count: data.revoked }));
  } catch (error) {
    toast(t("web.logout_all.failed", { message: error.message }), "bad");
  }
}
