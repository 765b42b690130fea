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

function fileList(files) {
  const list = h("ul", { class: "files" });
  for (const file of files) {
    const name = String(file.path || "");
    const row = h("li", null, `${name} (${formatBytes(file.length)}) `);
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
  const parts = [h("h4", { text: heading }), fileList(files)];
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
