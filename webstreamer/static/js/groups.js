// The list: rows by id, grouped by Telegram album / message (other sources one group each).
// Every row's data is the server's whole download JSON, replaced, never patched.
import { $, h } from "./dom.js";
import { createItemView, renderItem } from "./downloads.js";
import { t } from "./i18n.js";
import { state } from "./state.js";

const RENDER_DELAY_MS = 60;
const dirty = new Set();
let renderTimer = null;

const groupKeyOf = (d) => d.group_key || `download:${d.id}`;

const rowData = (data) => ({ uploads: [], files: [], actions: [], ...data });

const newRecord = (id) => ({ view: createItemView(id), detailsOpen: false, history: null, historyError: null });

function ensureGroup(key, d, front) {
  let group = state.groups.get(key);
  if (!group) {
    group = { key, sourceType: d.source_type || "", mediaGroupId: d.media_group_id || null, ids: [], view: null };
    state.groups.set(key, group);
    if (front) state.groupOrder.unshift(key);
    else state.groupOrder.push(key);
  }
  return group;
}

function groupLabel(group) {
  const count = group.ids.length;
  if (group.sourceType === "telegram") {
    return t(group.mediaGroupId ? "web.list.album" : "web.list.message", { count });
  }
  return count > 1 ? t("web.list.group", { count }) : "";
}

function renderGroups() {
  const sections = [];
  for (const key of state.groupOrder) {
    const group = state.groups.get(key);
    if (!group || group.ids.length === 0) continue;
    if (!group.view) {
      const head = h("div", { class: "group-head" });
      const items = h("div", { class: "group-items" });
      group.view = { head, items, root: h("section", { class: "group", dataset: { groupKey: key } }, head, items) };
    }
    const label = groupLabel(group);
    group.view.head.textContent = label;
    group.view.head.hidden = !label;
    group.view.root.classList.toggle("multi", Boolean(label));
    const wanted = group.ids.map((id) => state.downloads.get(id)).filter(Boolean).map((rec) => rec.view.root);
    const current = Array.from(group.view.items.children);
    if (wanted.length !== current.length || wanted.some((el, i) => el !== current[i])) {
      group.view.items.replaceChildren(...wanted);
    }
    sections.push(group.view.root);
  }
  const container = $("groups");
  const current = Array.from(container.children);
  if (sections.length !== current.length || sections.some((el, i) => el !== current[i])) {
    container.replaceChildren(...sections);
  }
  $("empty").hidden = sections.length > 0;
}

/** Every row and group again (after a language switch). */
export function renderAll() {
  for (const rec of state.downloads.values()) renderItem(rec);
  renderGroups();
}

function flushDirty() {
  renderTimer = null;
  const recs = Array.from(dirty);
  dirty.clear();
  for (const rec of recs) if (state.downloads.get(rec.data.id) === rec) renderItem(rec);
}

/** Render a known row soon: bursts of pushes for one row cost one render. */
function renderSoon(rec) {
  dirty.add(rec);
  if (renderTimer === null) renderTimer = window.setTimeout(flushDirty, RENDER_DELAY_MS);
}

/**
 * Show `data` (a whole download JSON) as its row; a row not shown yet is added first (`front`)
 * or last. Returns whether the row was new.
 */
export function putDownload(data, options) {
  const front = Boolean(options && options.front);
  const rec = state.downloads.get(data.id);
  if (!rec) {
    const added = { ...newRecord(data.id), data: rowData(data) };
    state.downloads.set(data.id, added);
    const group = ensureGroup(groupKeyOf(added.data), added.data, front);
    if (front) group.ids.unshift(data.id);
    else group.ids.push(data.id);
    renderItem(added);
    renderGroups();
    return true;
  }
  // An answer or a replayed push may be older than what is shown: keep the newer one.
  if (typeof data.updated_at === "string" && data.updated_at < String(rec.data.updated_at || "")) return false;
  const oldKey = groupKeyOf(rec.data);
  rec.data = rowData(data);
  const newKey = groupKeyOf(rec.data);
  if (oldKey !== newKey) {
    const old = state.groups.get(oldKey);
    if (old) old.ids = old.ids.filter((id) => id !== data.id);
    ensureGroup(newKey, rec.data, true).ids.push(data.id);
    renderItem(rec);
    renderGroups();
  } else {
    renderSoon(rec);
  }
  return false;
}

/** Merge one upload JSON into its download's row; false when that row is not shown. */
export function putUpload(upload) {
  const rec = state.downloads.get(upload.download_id);
  if (!rec) return false;
  const uploads = rec.data.uploads;
  const known = uploads.some((u) => u.id === upload.id);
  rec.data = { ...rec.data, uploads: known ? uploads.map((u) => (u.id === upload.id ? upload : u)) : [...uploads, upload] };
  renderSoon(rec);
  return true;
}

export function removeDownload(id) {
  const rec = state.downloads.get(id);
  if (!rec) return;
  state.downloads.delete(id);
  const group = state.groups.get(groupKeyOf(rec.data));
  if (group) group.ids = group.ids.filter((other) => other !== id);
  rec.view.root.remove();
  renderGroups();
}

export function removeAllDownloads() {
  state.downloads.clear();
  state.groups.clear();
  state.groupOrder = [];
  renderGroups();
}

/** Replace the whole list with the API's grouped answer, keeping the views of known rows. */
export function installSnapshot(groups) {
  const previous = state.downloads;
  state.downloads = new Map();
  state.groups = new Map();
  state.groupOrder = [];
  for (const group of groups) {
    const key = String(group.group_key);
    const entry = {
      key,
      sourceType: group.source_type || "",
      mediaGroupId: group.media_group_id || null,
      ids: [],
      view: null,
    };
    state.groups.set(key, entry);
    state.groupOrder.push(key);
    for (const d of group.downloads || []) {
      const rec = previous.get(d.id) || newRecord(d.id);
      rec.data = rowData({ ...d, group_key: key });
      state.downloads.set(d.id, rec);
      entry.ids.push(d.id);
      renderItem(rec);
    }
  }
  for (const [id, rec] of previous) if (!state.downloads.has(id)) rec.view.root.remove();
  renderGroups();
}
