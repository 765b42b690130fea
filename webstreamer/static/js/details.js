// A download's details panel: its files (torrents) with their links, and its status history.
import { copyLinkButton, formatBytes, formatTime, h, safeUrl, watchLink } from "./dom.js";
import { t } from "./i18n.js";

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
  const files = Array.isArray(rec.data.files) ? rec.data.files : [];
  const parts = [];
  if (files.length) parts.push(h("h4", { text: t("web.item.files") }), fileList(files));
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
