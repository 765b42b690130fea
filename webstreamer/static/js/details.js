// A download's details panel: its files (torrents) with their links, and its status history.
// A row carries a torrent's first files and `files_total`; the rest come page by page.
import { api } from "./api.js";
import { copyLinkButton, formatBytes, formatTime, h, safeUrl, watchLink } from "./dom.js";
import { t } from "./i18n.js";

const FILES_PAGE = 200;

/** The player page of one torrent file, derived from its signed /stream/{id}/{index}/ link. */
function watchUrlForFile(streamUrl) {
  const url = new URL(streamUrl);
  const match = /^\/stream\/(\d+)\/(\d+)\//.exec(url.pathname);
  if (!match) return null;
  url.pathname = `/watch/${match[1]}/${match[2]}`;
  return url.href;
}

/** A torrent's files can be chosen while its job is not over. */
const choosable = (rec) => ["pending", "waiting", "downloading", "paused"].includes(rec.data.status);

function fileList(rec, files) {
  const list = h("ul", { class: "files" });
  const choosing = choosable(rec);
  for (const file of files) {
    const name = String(file.path || "");
    const row = h("li", null, `${name} (${formatBytes(file.length)}) `);
    if (choosing) {
      row.prepend(
        h("input", {
          type: "checkbox",
          class: "pick",
          title: t("web.item.file_pick"),
          checked: file.selected !== false,
          disabled: Boolean(rec.choosing),
          dataset: { index: String(file.index) },
          onchange: () => chooseFiles(rec),
        }),
        " ",
      );
    }
    const stream = safeUrl(file.stream_url);
    if (stream) {
      row.append(copyLinkButton(stream));
      const watch = watchLink(watchUrlForFile(stream), name);
      if (watch) row.append(" ", watch);
    }
    list.append(row);
  }
  return list;
}

/** Send the choice the checkboxes show (files not fetched to the page keep theirs). */
async function chooseFiles(rec) {
  const ticked = new Map();
  for (const box of rec.view.details.querySelectorAll("ul.files input.pick")) {
    ticked.set(Number(box.dataset.index), box.checked);
    box.disabled = true; // one choice at a time: the boxes come back with it taken
  }
  rec.choosing = true;
  rec.choiceError = null;
  try {
    const total = Number(rec.data.files_total) || ticked.size;
    const select = [];
    for (let offset = 0; offset < total; offset += 1000) {
      const page = await api("GET", `/api/downloads/${rec.data.id}/files?offset=${offset}&limit=1000`);
      for (const file of Array.isArray(page.files) ? page.files : []) {
        const keep = ticked.has(file.index) ? ticked.get(file.index) : file.selected !== false;
        if (keep) select.push(file.index);
      }
    }
    await api("PUT", `/api/downloads/${rec.data.id}/files`, { select });
    const chosen = new Set(select);
    for (const file of shownFiles(rec)) file.selected = chosen.has(file.index);
  } catch (error) {
    rec.choiceError = error.message;
  }
  rec.choosing = false;
  if (rec.detailsOpen) renderDetails(rec);
}

/** The pages fetched so far hold for the row as long as its files' links do: a torrent's
 * files get theirs when it completes. */
const linked = (rec) => rec.data.status === "completed";

/** The files on show: the row's first ones, then the pages fetched since. */
function shownFiles(rec) {
  const first = Array.isArray(rec.data.files) ? rec.data.files : [];
  const more = rec.moreFiles && rec.moreFiles.linked === linked(rec) ? rec.moreFiles.files : [];
  return first.concat(more);
}

async function loadMoreFiles(rec, offset) {
  const wasLinked = linked(rec);
  rec.filesLoading = true;
  rec.filesError = null;
  renderDetails(rec);
  try {
    const page = await api("GET", `/api/downloads/${rec.data.id}/files?offset=${offset}&limit=${FILES_PAGE}`);
    if (linked(rec) === wasLinked && shownFiles(rec).length === offset) {
      const kept = rec.moreFiles && rec.moreFiles.linked === wasLinked ? rec.moreFiles.files : [];
      rec.moreFiles = { linked: wasLinked, files: kept.concat(Array.isArray(page.files) ? page.files : []) };
    }
  } catch (error) {
    rec.filesError = error.message;
  }
  rec.filesLoading = false;
  if (rec.detailsOpen) renderDetails(rec);
}

function filesPart(rec) {
  const files = shownFiles(rec);
  if (!files.length) return [];
  const total = Math.max(Number(rec.data.files_total) || 0, files.length);
  const heading = total > files.length ? t("web.item.files_some", { shown: files.length, total }) : t("web.item.files");
  const parts = [h("h4", { text: heading }), fileList(rec, files)];
  if (total > files.length) {
    const count = Math.min(FILES_PAGE, total - files.length);
    parts.push(
      h("button", {
        type: "button",
        class: "small more-files",
        disabled: Boolean(rec.filesLoading),
        text: t("web.item.more_files", { count }),
        onclick: () => loadMoreFiles(rec, files.length),
      }),
    );
  }
  if (rec.choiceError) parts.push(h("p", { class: "error", text: t("web.item.choice_failed", { message: rec.choiceError }) }));
  if (rec.filesError) parts.push(h("p", { class: "error", text: t("web.item.files_failed", { message: rec.filesError }) }));
  return parts;
}

function historyList(history) {
  const list = h("ol", { class: "history" });
  for (const entry of history) {
    const to = t(`status.${entry.to}`);
    const move = entry.from ? `${t(`status.${entry.from}`)} → ${to}` : to;
    const text = `${move}${entry.reason ? ` (${entry.reason})` : ""}`;
    list.append(h("li", null, h("span", { class: "when", text: formatTime(entry.at) }), text));
  }
  return list;
}

export function renderDetails(rec) {
  const parts = filesPart(rec);
  parts.push(h("h4", { text: t("web.item.history") }));
  if (rec.historyError) {
    parts.push(h("p", { class: "error", text: t("web.item.history_failed", { message: rec.historyError }) }));
  } else if (!rec.history) {
    parts.push(h("p", { text: t("web.item.history_loading") }));
  } else {
    parts.push(historyList(rec.history));
  }
  rec.view.details.replaceChildren(...parts);
}
