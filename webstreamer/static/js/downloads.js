// One download's card: name, state, progress, uploads, action buttons and the details panel.
// The buttons are the row's own `actions` from the server; clicks are handled in controls.js.
import { renderDetails } from "./details.js";
import { copyLinkButton, formatBytes, formatDuration, formatSpeed, h, safeUrl, watchLink } from "./dom.js";
import { language, t } from "./i18n.js";
import { state } from "./state.js";
import { renderUploads } from "./uploads.js";

export function displayName(d) {
  if (d.file_name) return d.file_name;
  if (typeof d.source_url === "string" && d.source_url) {
    if (d.source_url.startsWith("magnet:")) {
      const match = /[?&]dn=([^&]+)/.exec(d.source_url);
      if (match) {
        try {
          return decodeURIComponent(match[1].replace(/\+/g, " "));
        } catch (_) {
          return match[1];
        }
      }
      return d.source_url.slice(0, 60);
    }
    const tail = d.source_url.split("?")[0].split("/").filter(Boolean).pop();
    if (tail) {
      try {
        return decodeURIComponent(tail);
      } catch (_) {
        return tail;
      }
    }
  }
  return `#${d.id}`;
}

export function createItemView(id) {
  const v = {};
  v.name = h("span", { class: "name" });
  v.node = h("span", { class: "badge node", hidden: true });
  v.badge = h("span", { class: "badge state" });
  v.source = h("div", { class: "source" });
  v.bar = h("div", { class: "bar" });
  v.progress = h("div", {
    class: "progress",
    role: "progressbar",
    "aria-valuemin": "0",
    "aria-valuemax": "100",
  }, v.bar);
  v.size = h("span", { class: "size" });
  v.percent = h("span", { class: "percent" });
  v.speed = h("span", { class: "speed" });
  v.eta = h("span", { class: "eta" });
  v.error = h("p", { class: "error", hidden: true });
  v.uploads = h("ul", { class: "uploads", hidden: true });
  v.actions = h("div", { class: "actions" });
  v.details = h("div", { class: "details", hidden: true });
  v.root = h(
    "article",
    { class: "item", dataset: { downloadId: String(id) } },
    h("div", { class: "item-head" }, v.name, v.node, v.badge),
    v.source,
    v.progress,
    h("div", { class: "meta" }, v.size, v.percent, v.speed, v.eta),
    v.error,
    v.uploads,
    v.actions,
    v.details,
  );
  v.uploadViews = new Map();
  v.actionsKey = "";
  return v;
}

export function renderItem(rec) {
  const d = rec.data;
  const v = rec.view;
  const status = d.status || "pending";
  v.root.dataset.status = status;
  v.name.textContent = displayName(d);
  v.name.title = displayName(d);
  v.badge.dataset.status = status;
  v.badge.textContent = t(`status.${status}`);
  // In a cluster: the node holding the job.
  const clustered = Boolean(state.cluster && state.cluster.enabled);
  v.node.hidden = !clustered;
  v.node.textContent = clustered ? d.node || t("web.item.no_node") : "";
  v.node.title = clustered ? t("web.item.node") : "";
  const origin = [`#${d.id}`];
  if (d.source_type) origin.push(d.source_type);
  if (d.source_type !== "telegram" && typeof d.source_url === "string" && d.file_name) {
    origin.push(d.source_url.length > 120 ? `${d.source_url.slice(0, 120)}…` : d.source_url);
  }
  v.source.textContent = origin.join(" · ");
  const total = Number(d.total_length) || 0;
  const done = Number(d.completed_length) || 0;
  let percent = total > 0 ? Math.min(100, (done / total) * 100) : 0;
  if (status === "completed") percent = 100;
  v.bar.style.width = `${percent.toFixed(1)}%`;
  v.progress.setAttribute("aria-valuenow", percent.toFixed(0));
  v.size.textContent = total > 0 ? `${formatBytes(done)} / ${formatBytes(total)}` : formatBytes(done);
  v.percent.textContent = `${percent.toFixed(1)}%`;
  const speed = Number(d.download_speed) || 0;
  const active = status === "downloading";
  v.speed.textContent = active ? formatSpeed(speed) : "";
  v.eta.textContent =
    active && speed > 0 && total > done ? t("web.item.eta", { eta: formatDuration((total - done) / speed) }) : "";
  const showError = Boolean(d.error_message) && (status === "failed" || status === "cancelled");
  v.error.hidden = !showError;
  v.error.textContent = showError ? d.error_message : "";
  renderUploads(v, Array.isArray(d.uploads) ? d.uploads : []);
  renderActions(rec);
  v.details.hidden = !rec.detailsOpen;
  if (rec.detailsOpen) renderDetails(rec);
}

function actionButton(action, labelKey) {
  return h("button", { type: "button", class: "small", text: t(labelKey), dataset: { action } });
}

function renderActions(rec) {
  const d = rec.data;
  const actions = Array.isArray(d.actions) ? d.actions : [];
  const key = [actions.join(","), d.stream_url, d.watch_url, d.file_name, rec.detailsOpen, language()].join("|");
  if (rec.view.actionsKey === key) return;
  rec.view.actionsKey = key;
  const buttons = actions.map((action) => actionButton(String(action), `web.action.${action}`));
  const streamUrl = safeUrl(d.stream_url);
  if (streamUrl) buttons.push(copyLinkButton(streamUrl, { dataset: { action: "copy" } }));
  buttons.push(
    watchLink(safeUrl(d.watch_url), d.file_name, { class: "button", dataset: { action: "watch" } }),
    actionButton("details", rec.detailsOpen ? "web.action.hide_details" : "web.action.details"),
    actionButton("delete", "web.action.delete"),
  );
  rec.view.actions.replaceChildren(...buttons.filter(Boolean));
}
