// MistRelay dashboard start-up: one page, native modules, no build step.
import { onAddSubmit, onArchiveChosen, onTorrentChosen } from "./add.js";
import { onUnauthorized } from "./api.js";
import { refreshCluster, renderNodes } from "./cluster.js";
import { onDeleteDialogClosed, onListClick } from "./controls.js";
import { $ } from "./dom.js";
import { onBulkClick, onFindMore, onFindSubmit, onUploadsShow } from "./finder.js";
import { renderAll } from "./groups.js";
import { applyStaticTexts, loadMessages, t, toggleLanguage } from "./i18n.js";
import { onLoginSubmit, onLogout, onLogoutEverywhere, showLogin, signedIn, signedOut, whoAmI } from "./login.js";
import { onLimitsSubmit, onSettingsSubmit, renderSettings } from "./settings.js";
import { drawChart, renderStatistics, sampleSpeeds } from "./stats.js";
import { onRevokeDialogClosed, onTokenCopy, onTokenSubmit, onTokensClick, renderTokens } from "./tokens.js";

function switchLanguage() {
  toggleLanguage();
  applyStaticTexts();
  const conn = $("conn-text");
  if (conn.dataset.i18n) conn.textContent = t(conn.dataset.i18n, { seconds: "…" });
  renderAll();
  renderNodes();
  renderSettings();
  renderTokens();
  renderStatistics();
  drawChart();
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
  $("token-form").addEventListener("submit", onTokenSubmit);
  $("token-copy").addEventListener("click", onTokenCopy);
  $("tokens-body").addEventListener("click", onTokensClick);
  $("revoke-dialog").addEventListener("close", onRevokeDialogClosed);
  window.addEventListener("resize", drawChart);
  document.addEventListener("visibilitychange", refreshCluster);
  window.setInterval(sampleSpeeds, 1000);
  // Whether the session cookie is still good, and whose: the page shows what they may use.
  const me = await whoAmI();
  document.documentElement.classList.remove("boot");
  if (me) signedIn(me);
  else showLogin();
}

boot();
