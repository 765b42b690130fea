// What the list's buttons do: one click listener on the list reads the button's data-action
// and the row (and upload) it sits in.
import { api } from "./api.js";
import { $, toast } from "./dom.js";
import { displayName, renderItem } from "./downloads.js";
import { putDownload, putUpload, removeDownload } from "./groups.js";
import { t } from "./i18n.js";
import { state } from "./state.js";

let pendingDelete = null;

async function post(label, path) {
  try {
    return await api("POST", path);
  } catch (error) {
    toast(t("web.action.failed", { action: label, message: error.message }), "bad");
    return null;
  }
}

/** Fetch the row with its history for the open details panel. */
export async function loadHistory(rec) {
  rec.historyError = null;
  try {
    const { history, ...row } = await api("GET", `/api/downloads/${rec.data.id}`);
    rec.history = Array.isArray(history) ? history : [];
    if (state.downloads.get(row.id) === rec) putDownload(row);
  } catch (error) {
    rec.historyError = error.message;
  }
  renderItem(rec);
}

function toggleDetails(rec) {
  rec.detailsOpen = !rec.detailsOpen;
  rec.history = null;
  renderItem(rec);
  if (rec.detailsOpen) loadHistory(rec);
}

function confirmDelete(rec) {
  const dialog = $("delete-dialog");
  pendingDelete = rec.data.id;
  $("delete-name").textContent = displayName(rec.data);
  $("delete-file").checked = false;
  if (typeof dialog.showModal === "function") dialog.showModal();
}

export async function onDeleteDialogClosed() {
  const dialog = $("delete-dialog");
  const id = pendingDelete;
  pendingDelete = null;
  if (dialog.returnValue !== "delete" || id === null) return;
  const withFile = $("delete-file").checked;
  try {
    await api("DELETE", `/api/downloads/${id}?delete_file=${withFile ? "true" : "false"}`);
    removeDownload(id);
    toast(t("web.delete.done"));
  } catch (error) {
    toast(t("web.action.failed", { action: t("web.action.delete"), message: error.message }), "bad");
  }
}

/** A click in the list: an upload's action, the row's details/delete, or one of its `actions`
 * (the copy button, handled where it is made, is none of these). */
export async function onListClick(event) {
  const button = event.target.closest("button[data-action]");
  const item = button && button.closest("article.item");
  const rec = item && state.downloads.get(Number(item.dataset.downloadId));
  if (!rec) return;
  const action = button.dataset.action;
  const label = button.textContent;
  const upload = button.closest("li.upload");
  if (upload) {
    const row = await post(label, `/api/uploads/${Number(upload.dataset.uploadId)}/${encodeURIComponent(action)}`);
    if (row && row.id) putUpload(row);
  } else if (action === "details") {
    toggleDetails(rec);
  } else if (action === "delete") {
    confirmDelete(rec);
  } else if (rec.data.actions.includes(action)) {
    const row = await post(label, `/api/downloads/${rec.data.id}/${encodeURIComponent(action)}`);
    if (row && row.id) putDownload(row);
  }
}
