// Personal API tokens (GET/POST/DELETE /api/tokens): each acts as whoever made it, an admin or a
// user. The list shows name, creation and last use; a new token is shown once, here, with a copy
// button; revoking asks first.
import { api } from "./api.js";
import { $, copyText, formatTime, h, toast } from "./dom.js";
import { t } from "./i18n.js";

const view = { tokens: [], shownId: null };

function tokenRow(token) {
  return h(
    "tr",
    { dataset: { tokenId: String(token.id) } },
    h("td", { class: "name", text: String(token.name) }),
    h("td", { class: "when", text: formatTime(token.created_at) }),
    h("td", { class: "when", text: token.last_used_at ? formatTime(token.last_used_at) : t("web.tokens.never") }),
    h(
      "td",
      null,
      h("button", { type: "button", class: "small danger", dataset: { action: "revoke" }, text: t("web.tokens.revoke") }),
    ),
  );
}

/** The card from the last answer (also after a language switch). */
export function renderTokens() {
  $("tokens-body").replaceChildren(...view.tokens.map(tokenRow));
  $("tokens-empty").hidden = view.tokens.length > 0;
}

/** The new token leaves the page (signed out, or it was revoked). */
export function forgetShownToken() {
  view.shownId = null;
  $("token-value").value = "";
  $("token-made").hidden = true;
}

export async function loadTokens() {
  try {
    const data = await api("GET", "/api/tokens");
    view.tokens = Array.isArray(data.tokens) ? data.tokens : [];
    renderTokens();
  } catch (error) {
    $("tokens-result").textContent = error.message;
  }
}

export async function onTokenSubmit(event) {
  event.preventDefault();
  const input = $("token-name");
  const name = input.value.trim();
  if (!name) return;
  const button = $("token-create");
  button.disabled = true;
  try {
    const made = await api("POST", "/api/tokens", { name });
    input.value = "";
    view.shownId = String(made.id);
    $("token-value").value = String(made.token);
    $("token-made").hidden = false;
    $("tokens-result").textContent = "";
    await loadTokens();
  } catch (error) {
    $("tokens-result").textContent = t("web.tokens.create_failed", { message: error.message });
  } finally {
    button.disabled = false;
  }
}

export async function onTokenCopy() {
  const input = $("token-value");
  if (await copyText(input.value)) {
    toast(t("web.tokens.copied"));
  } else {
    input.select();
    toast(t("web.tokens.copy_failed"), "bad");
  }
}

/** A click in the list: a row's revoke button asks first. */
export function onTokensClick(event) {
  const button = event.target.closest("button[data-action='revoke']");
  const row = button && button.closest("tr[data-token-id]");
  if (!row) return;
  const dialog = $("revoke-dialog");
  const token = view.tokens.find((item) => String(item.id) === row.dataset.tokenId);
  dialog.dataset.tokenId = row.dataset.tokenId;
  $("revoke-name").textContent = token ? String(token.name) : "";
  dialog.returnValue = "";
  dialog.showModal();
}

export async function onRevokeDialogClosed() {
  const dialog = $("revoke-dialog");
  const id = dialog.dataset.tokenId;
  delete dialog.dataset.tokenId;
  if (dialog.returnValue !== "revoke" || !id) return;
  try {
    await api("DELETE", `/api/tokens/${encodeURIComponent(id)}`);
    if (view.shownId === id) forgetShownToken();
    toast(t("web.tokens.revoked"));
  } catch (error) {
    toast(t("web.tokens.revoke_failed", { message: error.message }), "bad");
  }
  await loadTokens();
}
