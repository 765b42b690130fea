// MistRelay dashboard start-up: one page, native modules, no build step.
import { onAddSubmit, onArchiveChosen, onTorrentChosen } from "./add.js";
import { onUnauthorized } from "./api.js";
import { refreshCluster, renderNodes } from "./cluster.js";
import { onDeleteDialogClosed, onListClick } from "./controls.js";
import { $ } from "./dom.js";
import { onBulkClick, onFindMore, onFindSubmit, onUploadsShow } from "./finder.js";
import { renderAll } from "./groups.js";
import { applyStaticTexts, loadMessages, t, toggleLanguage } from "./i18n.js";
import { onLoginSubmit, onLogout, onLogoutEverywhere, showLogin, signedIn, signedOut } from "./login.js";
import { onLimitsSubmit, onSettingsSubmit, renderSettings } from "./settings.js";
import { drawChart, renderStatistics, sampleSpeeds, setStatistics } from "./stats.js";

function switchLanguage() {
  toggleLanguage();
  applyStaticTexts();
  const conn = $("conn-text");
  if (conn.dataset.i18n) conn.textContent = t(conn.dataset.i18n, { seconds: "…" });
  renderAll();
  renderNodes();
  renderSettings();
  renderStatistics();
  drawChart();
}

/** Whether the session cookie is still good; its answer is the first statistics shown. A
 * user's session (not an admin's) is good but gets 403: everyone's totals are for admins. */
async function probeSession() {
  try {
    const response = await fetch("/api/downloads/statistics", {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    if (response.ok) setStatistics({ downloads: await response.json() });
    return response.ok || response.status === 403;
  } catch (_) {
    return false;
  }
}

async function boot() {
  await loadMessages();
  applyStaticTexts();
  renderStatistics();
  onUnauthorized(() => signedOut(true));
  $("login-form").addEventListener("submit", onLoginSubmit);
  $("logout").addEventListener("click", onLogout);
  $("logout-all").addEventListener("click", onLogoutEverywhere);
  $("lang-switch").addEventListener("click", switchLanguage);
  $("add-form").addEventListener("submit", onAddSubmit);
  $("add-archive").addEventListener("change", onArchiveChosen);
  $("torrent-file").addEventListener("change", onTorrentChosen);
  $("limits-form").addEventListener("submit", onLimitsSubmit);
  $("settings-form").addEventListener("submit", onSettingsSubmit);
  $("groups").addEventListener("click", onListClick);
  $("find-form").addEventListener("submit", onFindSubmit);
  $("find-more").addEventListener("click", onFindMore);
  $("find-bulk").addEventListener("click", onBulkClick);
  $("uploads-show").addEventListener("click", onUploadsShow);
  $("delete-dialog").addEventListener("close", onDeleteDialogClosed);
  window.addEventListener("resize", drawChart);
  document.addEventListener("visibilitychange", refreshCluster);
  window.setInterval(sampleSpeeds, 1000);
  const authenticated = await probeSession();
  document.documentElement.classList.remove("boot");
  if (authenticated) signedIn();
  else showLogin();
}

boot();
