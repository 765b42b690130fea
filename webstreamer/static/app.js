// MistRelay dashboard: one page, no build step. Every piece of data reaches the DOM through
// textContent or a checked attribute, never as markup: file names and links are hostile input.
"use strict";

(() => {
  const CHART_MINUTES = 5;
  const CHART_POINTS = CHART_MINUTES * 60;
  const LIST_LIMIT = 200;
  const RECONNECT_MAX_MS = 15000;
  const RESYNC_MIN_INTERVAL_MS = 3000;
  const LANGUAGE_STORAGE_KEY = "mistrelay.lang";
  const MEDIA_EXTENSIONS = new Set([
    "mp4", "m4v", "webm", "mkv", "mov", "ogv", "ogg", "oga", "mp3", "m4a", "aac", "flac",
    "wav", "opus", "mka", "weba",
  ]);
  const ACTIONS_BY_STATUS = {
    pending: ["cancel"],
    waiting: ["pause", "cancel"],
    downloading: ["pause", "cancel"],
    paused: ["resume", "cancel"],
    completed: [],
    failed: ["retry"],
    cancelled: ["retry"],
  };

  const $ = (id) => document.getElementById(id);

  // --- messages ---------------------------------------------------------------------------

  const i18n = { lang: "en", messages: { en: {}, zh: {} } };

  function pickLanguage() {
    let stored = null;
    try {
      stored = window.localStorage.getItem(LANGUAGE_STORAGE_KEY);
    } catch (_) {
      stored = null;
    }
    if (stored === "en" || stored === "zh") return stored;
    for (const code of navigator.languages || [navigator.language || "en"]) {
      const primary = String(code).toLowerCase().split("-")[0];
      if (primary === "zh" || primary === "en") return primary;
    }
    return "en";
  }

  function t(key, values) {
    const table = i18n.messages[i18n.lang] || {};
    let text = table[key] ?? (i18n.messages.en || {})[key] ?? key;
    if (values) {
      text = text.replace(/\{(\w+)\}/g, (match, name) =>
        Object.prototype.hasOwnProperty.call(values, name) ? String(values[name]) : match,
      );
    }
    return text;
  }

  async function loadMessages() {
    try {
      const response = await fetch("/static/i18n/common.json", { credentials: "same-origin" });
      if (response.ok) i18n.messages = await response.json();
    } catch (_) {
      // The page still works with the English texts built into the markup.
    }
  }

  function applyStaticTexts() {
    document.documentElement.lang = i18n.lang === "zh" ? "zh-CN" : "en";
    for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
    for (const el of document.querySelectorAll("[data-i18n-placeholder]")) {
      el.placeholder = t(el.dataset.i18nPlaceholder);
    }
    for (const el of document.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
    $("chart-title").textContent = t("web.chart.title", { minutes: CHART_MINUTES });
    document.title = t("web.title");
  }

  // --- small helpers ----------------------------------------------------------------------

  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.className = value;
      else if (name === "text") el.textContent = value;
      else if (name === "dataset") Object.assign(el.dataset, value);
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined && child !== false) el.append(child);
    }
    return el;
  }

  function safeUrl(value) {
    if (typeof value !== "string" || !value) return null;
    try {
      const url = new URL(value, window.location.href);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (_) {
      return null;
    }
  }

  function formatBytes(value) {
    let n = Number(value);
    if (!Number.isFinite(n) || n <= 0) return "0 B";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let unit = 0;
    while (n >= 1024 && unit < units.length - 1) {
      n /= 1024;
      unit += 1;
    }
    return `${unit === 0 || n >= 100 ? n.toFixed(0) : n.toFixed(1)} ${units[unit]}`;
  }

  const formatSpeed = (value) => `${formatBytes(value)}/s`;

  function formatDuration(seconds) {
    if (!Number.isFinite(seconds) || seconds < 0) return "—";
    const s = Math.round(seconds);
    const days = Math.floor(s / 86400);
    const hours = Math.floor((s % 86400) / 3600);
    const minutes = Math.floor((s % 3600) / 60);
    if (days) return `${days}d ${hours}h`;
    if (hours) return `${hours}h ${minutes}m`;
    if (minutes) return `${minutes}m ${s % 60}s`;
    return `${s % 60}s`;
  }

  function formatTime(iso) {
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso || "");
    return date.toLocaleString(i18n.lang === "zh" ? "zh-CN" : undefined);
  }

  function extensionOf(name) {
    const match = /\.([A-Za-z0-9]{1,8})$/.exec(String(name || ""));
    return match ? match[1].toLowerCase() : "";
  }

  function toast(message, kind) {
    const box = $("toasts");
    const el = h("div", { class: kind === "bad" ? "toast bad" : "toast", text: message });
    box.append(el);
    while (box.children.length > 4) box.firstElementChild.remove();
    window.setTimeout(() => el.remove(), kind === "bad" ? 8000 : 4000);
  }

  async function copyText(text) {
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(text);
        return true;
      }
    } catch (_) {
      // fall through to the selection copy
    }
    const area = h("textarea", { readonly: true, class: "copy-buffer" });
    area.value = text;
    document.body.append(area);
    area.select();
    let copied = false;
    try {
      copied = document.execCommand("copy");
    } catch (_) {
      copied = false;
    }
    area.remove();
    return copied;
  }

  // --- API --------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      const detail = body && body.detail;
      let message = `HTTP ${status}`;
      if (detail && typeof detail === "object" && !Array.isArray(detail) && detail.message) {
        message = detail.message;
      } else if (typeof detail === "string" && detail) {
        message = detail;
      } else if (body && body.error) {
        message = String(body.error).replace(/_/g, " ");
      }
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  async function api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (body instanceof FormData) {
      init.body = body;
    } else if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (_) {
      throw new ApiError(0, { error: "network", detail: t("web.error.network") });
    }
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (response.status === 401) signedOut(true);
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  // --- state ------------------------------------------------------------------------------

  const state = {
    signedIn: false,
    downloads: new Map(), // id → {data, view, detailsOpen}
    groups: new Map(), // key → {key, sourceType, mediaGroupId, ids, view}
    groupOrder: [],
    statistics: null,
    samples: [],
    ws: null,
    seq: 0,
    reconnectDelay: 1000,
    reconnectTimer: null,
    countdownTimer: null,
    syncing: false,
    syncAgain: false,
    buffered: [],
    lastResync: 0,
    resyncTimer: null,
    syncCount: 0,
    syncErrorShown: false,
    dirty: new Set(),
    flushTimer: null,
  };

  // --- connection indicator ---------------------------------------------------------------

  function setConnection(kind, values) {
    const box = $("conn");
    box.dataset.state = kind;
    const key = {
      connecting: "web.conn.connecting",
      live: "web.conn.live",
      syncing: "web.conn.syncing",
      offline: "web.conn.offline",
      "signed-out": "web.conn.signed_out",
    }[kind];
    const label = $("conn-text");
    label.dataset.i18n = key;
    label.textContent = t(key, values);
  }

  // --- statistics and chart ---------------------------------------------------------------

  function setStat(name, text) {
    const el = document.querySelector(`[data-stat="${name}"] .value`);
    if (el) el.textContent = text;
  }

  function renderStatistics() {
    const s = state.statistics;
    if (!s) return;
    const downloads = s.downloads || {};
    const uploads = s.uploads || {};
    const d = downloads.by_status || {};
    const u = uploads.by_status || {};
    const count = (value) => String(Number(value) || 0);
    setStat("waiting", count((d.waiting || 0) + (d.pending || 0)));
    setStat("downloading", count(d.downloading));
    setStat("completed", count(d.completed));
    setStat("failed", count(d.failed));
    if (s.uploads) {
      setStat("uploads_completed", count(u.completed));
      setStat("uploads_failed", count(u.failed));
      setStat("cleaned", count(uploads.cleaned));
      setStat("upload_speed", formatSpeed(uploads.upload_speed));
    }
    setStat("total_bytes", formatBytes(downloads.total_bytes));
    setStat("download_speed", formatSpeed(downloads.download_speed));
  }

  function setStatistics(statistics) {
    if (!statistics || typeof statistics !== "object") return;
    state.statistics = { ...(state.statistics || {}), ...statistics };
    renderStatistics();
  }

  function sampleSpeeds() {
    const s = state.statistics || {};
    const down = Number((s.downloads || {}).download_speed) || 0;
    const up = Number((s.uploads || {}).upload_speed) || 0;
    state.samples.push({ down, up });
    if (state.samples.length > CHART_POINTS) state.samples.shift();
    drawChart();
  }

  function niceCeiling(value) {
    // Binary steps, so the axis reads 0, 512 KiB, 1 MiB, 1.5 MiB, 2 MiB rather than 977 KiB.
    let unit = 1;
    while (value / unit >= 1024) unit *= 1024;
    const mantissa = value / unit;
    for (const step of [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]) {
      if (mantissa <= step) return step * unit;
    }
    return 1024 * unit;
  }

  function drawChart() {
    const canvas = $("speed-chart");
    if (!canvas || $("dashboard").hidden) return;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    const ratio = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const styles = getComputedStyle(document.documentElement);
    const color = (name) => styles.getPropertyValue(name).trim() || "#888";
    const samples = state.samples;
    const peak = samples.reduce((m, s) => Math.max(m, s.down, s.up), 0);
    const top = niceCeiling(Math.max(peak * 1.1, 64 * 1024));
    const left = 72;
    const bottom = height - 6;
    const plotTop = 8;
    const plotHeight = bottom - plotTop;
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i += 1) {
      const y = Math.round(bottom - (plotHeight * i) / 4) + 0.5;
      ctx.strokeStyle = color("--line");
      ctx.beginPath();
      ctx.moveTo(left, y);
      ctx.lineTo(width, y);
      ctx.stroke();
      ctx.fillStyle = color("--muted");
      ctx.fillText(formatSpeed((top * i) / 4), 4, y);
    }
    const step = (width - left) / (CHART_POINTS - 1);
    const xOf = (i) => width - (samples.length - 1 - i) * step;
    const yOf = (v) => bottom - (Math.min(v, top) / top) * plotHeight;
    for (const [key, name] of [["down", "--down"], ["up", "--up"]]) {
      if (samples.length < 2) break;
      const stroke = color(name);
      ctx.beginPath();
      samples.forEach((s, i) => (i === 0 ? ctx.moveTo(xOf(i), yOf(s[key])) : ctx.lineTo(xOf(i), yOf(s[key]))));
      ctx.strokeStyle = stroke;
      ctx.lineWidth = 2;
      ctx.stroke();
      ctx.lineTo(xOf(samples.length - 1), bottom);
      ctx.lineTo(xOf(0), bottom);
      ctx.closePath();
      ctx.globalAlpha = 0.12;
      ctx.fillStyle = stroke;
      ctx.fill();
      ctx.globalAlpha = 1;
    }
    $("chart-peak").textContent = peak > 0 ? `↑ ${formatSpeed(peak)}` : "";
  }

  // --- downloads --------------------------------------------------------------------------

  function displayName(d) {
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

  function createItemView(id) {
    const v = {};
    v.name = h("span", { class: "name" });
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
      h("div", { class: "item-head" }, v.name, v.badge),
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

  function renderItem(rec) {
    const d = rec.data;
    const v = rec.view;
    const status = d.status || "pending";
    v.root.dataset.status = status;
    v.name.textContent = displayName(d);
    v.name.title = displayName(d);
    v.badge.dataset.status = status;
    v.badge.textContent = t(`status.${status}`);
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
    renderUploads(rec);
    renderActions(rec);
    if (rec.detailsOpen) renderDetails(rec);
  }

  function renderUploads(rec) {
    const v = rec.view;
    const uploads = Array.isArray(rec.data.uploads) ? rec.data.uploads : [];
    v.uploads.hidden = uploads.length === 0;
    const seen = new Set();
    for (const upload of uploads) {
      seen.add(upload.id);
      let view = v.uploadViews.get(upload.id);
      if (!view) {
        view = {
          target: h("span", { class: "target" }),
          badge: h("span", { class: "badge" }),
          bar: h("div", { class: "bar" }),
          size: h("span", { class: "size" }),
          buttons: h("span", { class: "actions" }),
          error: h("span", { class: "upload-error", hidden: true }),
          buttonsKey: "",
        };
        view.root = h(
          "li",
          { class: "upload", dataset: { uploadId: String(upload.id) } },
          view.target,
          view.badge,
          h("div", { class: "progress thin" }, view.bar),
          view.size,
          view.buttons,
          view.error,
        );
        v.uploadViews.set(upload.id, view);
        v.uploads.append(view.root);
      }
      const status = upload.status || "pending";
      view.root.dataset.status = status;
      view.target.textContent = t("web.item.upload_to", { target: upload.upload_target || "?" });
      view.badge.dataset.status = status;
      view.badge.textContent = upload.cleaned_at
        ? `${t(`upload_status.${status}`)} · ${t("web.item.cleaned")}`
        : t(`upload_status.${status}`);
      view.badge.classList.toggle("cleaned", Boolean(upload.cleaned_at));
      const total = Number(upload.total_size) || 0;
      const sent = Number(upload.uploaded_size) || 0;
      const percent = status === "completed" ? 100 : total > 0 ? Math.min(100, (sent / total) * 100) : 0;
      view.bar.style.width = `${percent.toFixed(1)}%`;
      const speed = status === "uploading" && upload.upload_speed > 0 ? ` · ${formatSpeed(upload.upload_speed)}` : "";
      view.size.textContent = total > 0 ? `${formatBytes(sent)} / ${formatBytes(total)}${speed}` : speed.slice(3);
      const failed = status === "failed" && upload.error_message;
      view.error.hidden = !failed;
      view.error.textContent = failed ? upload.error_message : "";
      const key = `${status}|${i18n.lang}`;
      if (view.buttonsKey !== key) {
        view.buttonsKey = key;
        const buttons = [];
        if (status === "failed" || status === "cancelled") {
          buttons.push(uploadButton(upload.id, "retry", "web.action.upload_retry"));
        }
        if (status === "pending" || status === "uploading" || status === "paused") {
          buttons.push(uploadButton(upload.id, "cancel", "web.action.upload_cancel"));
        }
        view.buttons.replaceChildren(...buttons);
      }
    }
    for (const [id, view] of v.uploadViews) {
      if (!seen.has(id)) {
        view.root.remove();
        v.uploadViews.delete(id);
      }
    }
  }

  function uploadButton(uploadId, action, labelKey) {
    return h("button", {
      type: "button",
      class: "small",
      text: t(labelKey),
      dataset: { action },
      onclick: async () => {
        try {
          await api("POST", `/api/uploads/${uploadId}/${action}`);
        } catch (error) {
          toast(t("web.action.failed", { action: t(labelKey), message: error.message }), "bad");
        }
      },
    });
  }

  function watchUrlForFile(streamUrl) {
    const safe = safeUrl(streamUrl);
    if (!safe) return null;
    const url = new URL(safe);
    const match = /^\/stream\/(\d+)\/(\d+)\//.exec(url.pathname);
    if (!match) return null;
    url.pathname = `/watch/${match[1]}/${match[2]}`;
    return url.href;
  }

  function renderActions(rec) {
    const d = rec.data;
    const status = d.status || "pending";
    const key = [status, d.stream_url || "", d.watch_url || "", rec.detailsOpen, i18n.lang].join("|");
    if (rec.view.actionsKey === key) return;
    rec.view.actionsKey = key;
    const buttons = [];
    for (const action of ACTIONS_BY_STATUS[status] || []) {
      buttons.push(
        h("button", {
          type: "button",
          class: "small",
          text: t(`web.action.${action}`),
          dataset: { action },
          onclick: () => act(rec.data.id, action),
        }),
      );
    }
    const streamUrl = safeUrl(d.stream_url);
    if (streamUrl) {
      buttons.push(
        h("button", {
          type: "button",
          class: "small",
          text: t("web.action.copy_link"),
          dataset: { action: "copy" },
          onclick: async () => {
            const copied = await copyText(streamUrl);
            toast(copied ? t("web.action.copied") : t("web.action.copy_failed", { url: streamUrl }));
          },
        }),
      );
    }
    const watchUrl = safeUrl(d.watch_url);
    if (watchUrl && MEDIA_EXTENSIONS.has(extensionOf(d.file_name))) {
      buttons.push(
        h("a", {
          class: "button",
          href: watchUrl,
          target: "_blank",
          rel: "noopener noreferrer",
          text: t("web.action.watch"),
          dataset: { action: "watch" },
        }),
      );
    }
    buttons.push(
      h("button", {
        type: "button",
        class: "small",
        text: t(rec.detailsOpen ? "web.action.hide_details" : "web.action.details"),
        dataset: { action: "details" },
        onclick: () => toggleDetails(rec),
      }),
      h("button", {
        type: "button",
        class: "small",
        text: t("web.action.delete"),
        dataset: { action: "delete" },
        onclick: () => confirmDelete(rec),
      }),
    );
    rec.view.actions.replaceChildren(...buttons);
  }

  function toggleDetails(rec) {
    rec.detailsOpen = !rec.detailsOpen;
    rec.view.details.hidden = !rec.detailsOpen;
    renderActions(rec);
    if (rec.detailsOpen) {
      rec.history = null;
      renderDetails(rec);
      loadHistory(rec);
    }
  }

  async function loadHistory(rec) {
    rec.historyError = null;
    try {
      const data = await api("GET", `/api/downloads/${rec.data.id}`);
      rec.history = Array.isArray(data.history) ? data.history : [];
      const { history: _ignored, ...rest } = data;
      Object.assign(rec.data, rest);
      renderItem(rec);
    } catch (error) {
      rec.historyError = error.message;
      renderDetails(rec);
    }
  }

  function renderDetails(rec) {
    const d = rec.data;
    const parts = [];
    const files = Array.isArray(d.files) ? d.files : [];
    if (files.length) {
      const list = h("ul", { class: "files" });
      for (const file of files) {
        const name = String(file.path || "");
        const row = h("li", null, `${name} (${formatBytes(file.length)}) `);
        const stream = safeUrl(file.stream_url);
        if (stream) {
          row.append(
            h("button", {
              type: "button",
              class: "small",
              text: t("web.action.copy_link"),
              onclick: async () => {
                const copied = await copyText(stream);
                toast(copied ? t("web.action.copied") : t("web.action.copy_failed", { url: stream }));
              },
            }),
          );
          const watch = watchUrlForFile(stream);
          if (watch && MEDIA_EXTENSIONS.has(extensionOf(name))) {
            row.append(" ", h("a", { href: watch, target: "_blank", rel: "noopener noreferrer", text: t("web.action.watch") }));
          }
        }
        list.append(row);
      }
      parts.push(h("h4", { text: t("web.item.files") }), list);
    }
    parts.push(h("h4", { text: t("web.item.history") }));
    if (rec.historyError) {
      parts.push(h("p", { class: "error", text: t("web.item.history_failed", { message: rec.historyError }) }));
    } else if (!rec.history) {
      parts.push(h("p", { text: t("web.item.history_loading") }));
    } else {
      const list = h("ol", { class: "history" });
      for (const entry of rec.history) {
        const to = t(`status.${entry.to}`);
        const move = entry.from ? `${t(`status.${entry.from}`)} → ${to}` : to;
        const text = `${move}${entry.reason ? ` (${entry.reason})` : ""}`;
        list.append(h("li", null, h("span", { class: "when", text: formatTime(entry.at) }), text));
      }
      parts.push(list);
    }
    rec.view.details.replaceChildren(...parts);
  }

  async function act(id, action) {
    try {
      const data = await api("POST", `/api/downloads/${id}/${action}`);
      if (data && data.id) upsertDownload(data);
    } catch (error) {
      toast(t("web.action.failed", { action: t(`web.action.${action}`), message: error.message }), "bad");
    }
  }

  let pendingDelete = null;

  function confirmDelete(rec) {
    const dialog = $("delete-dialog");
    pendingDelete = rec.data.id;
    $("delete-name").textContent = displayName(rec.data);
    $("delete-file").checked = false;
    if (typeof dialog.showModal === "function") dialog.showModal();
  }

  async function onDeleteDialogClosed() {
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

  // --- groups -----------------------------------------------------------------------------

  function groupKeyOf(d) {
    return d.group_key || `download:${d.id}`;
  }

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

  function upsertDownload(data, options) {
    const front = Boolean(options && options.front);
    let rec = state.downloads.get(data.id);
    let structural = false;
    if (!rec) {
      rec = { data: { uploads: [], files: [], ...data }, view: createItemView(data.id), detailsOpen: false };
      state.downloads.set(data.id, rec);
      const group = ensureGroup(groupKeyOf(rec.data), rec.data, front);
      if (front) group.ids.unshift(data.id);
      else group.ids.push(data.id);
      structural = true;
    } else {
      const oldKey = groupKeyOf(rec.data);
      Object.assign(rec.data, data);
      const newKey = groupKeyOf(rec.data);
      if (oldKey !== newKey) {
        const old = state.groups.get(oldKey);
        if (old) old.ids = old.ids.filter((id) => id !== data.id);
        ensureGroup(newKey, rec.data, true).ids.push(data.id);
        structural = true;
      }
    }
    renderItem(rec);
    if (structural && !(options && options.deferGroups)) renderGroups();
    return rec;
  }

  function removeDownload(id) {
    const rec = state.downloads.get(id);
    if (!rec) return;
    state.downloads.delete(id);
    const group = state.groups.get(groupKeyOf(rec.data));
    if (group) group.ids = group.ids.filter((other) => other !== id);
    rec.view.root.remove();
    renderGroups();
  }

  function installSnapshot(groups) {
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
        const rec = previous.get(d.id) || { view: createItemView(d.id), detailsOpen: false };
        rec.data = { uploads: [], files: [], ...d, group_key: key };
        state.downloads.set(d.id, rec);
        entry.ids.push(d.id);
        renderItem(rec);
      }
    }
    for (const [id, rec] of previous) if (!state.downloads.has(id)) rec.view.root.remove();
    renderGroups();
  }

  // --- live updates -----------------------------------------------------------------------

  function markDirty(rec) {
    state.dirty.add(rec);
    if (state.flushTimer === null) state.flushTimer = window.setTimeout(flushDirty, 60);
  }

  function flushDirty() {
    state.flushTimer = null;
    const dirty = Array.from(state.dirty);
    state.dirty.clear();
    for (const rec of dirty) if (state.downloads.get(rec.data.id) === rec) renderItem(rec);
  }

  const DOWNLOAD_FIELDS = [
    "gid", "completed_length", "total_length", "download_speed", "error_message", "updated_at",
  ];

  function onDownloadUpdate(event) {
    const id = event.download_id;
    if (typeof id !== "number") return;
    const patch = {};
    for (const field of DOWNLOAD_FIELDS) if (event[field] !== undefined) patch[field] = event[field];
    if (event.file_name) patch.file_name = event.file_name;
    if (event.group_key) patch.group_key = event.group_key;
    // A progress-only update carries no status: keep the one we know.
    if (event.status) patch.status = event.status;
    const rec = state.downloads.get(id);
    if (!rec) {
      if (event.status) upsertDownload({ id, ...patch }, { front: true });
      scheduleResync();
      return;
    }
    const becameComplete = patch.status === "completed" && rec.data.status !== "completed";
    const statusChanged = patch.status && patch.status !== rec.data.status;
    if (patch.group_key && patch.group_key !== groupKeyOf(rec.data)) {
      upsertDownload({ id, ...patch });
    } else {
      Object.assign(rec.data, patch);
      markDirty(rec);
    }
    if (becameComplete || (statusChanged && rec.detailsOpen)) refreshOne(rec);
  }

  async function refreshOne(rec) {
    // The stream link and the history are only in the API's answer, not in the push.
    try {
      const data = await api("GET", `/api/downloads/${rec.data.id}`);
      if (Array.isArray(data.history)) rec.history = data.history;
      const { history: _ignored, ...rest } = data;
      if (state.downloads.get(rec.data.id) === rec) upsertDownload(rest);
    } catch (_) {
      // The push keeps the row moving; the links appear on the next resync.
    }
  }

  function onUploadUpdate(event) {
    const rec = state.downloads.get(event.download_id);
    if (!rec || typeof event.upload_id !== "number") {
      scheduleResync();
      return;
    }
    const uploads = Array.isArray(rec.data.uploads) ? rec.data.uploads : (rec.data.uploads = []);
    const { upload_id: uploadId, ...fields } = event;
    const existing = uploads.find((u) => u.id === uploadId);
    if (existing) Object.assign(existing, fields);
    else uploads.push({ id: uploadId, ...fields });
    markDirty(rec);
  }

  function handleMessage(message) {
    if (!message || typeof message !== "object") return;
    const data = message.data || {};
    if (state.syncing && message.type !== "hello" && message.type !== "statistics_update") {
      state.buffered.push(message);
      return;
    }
    switch (message.type) {
      case "hello":
        state.reconnectDelay = 1000;
        setConnection("live");
        if (data.statistics) setStatistics(data.statistics);
        resync();
        break;
      case "download_update":
        onDownloadUpdate(data);
        break;
      case "upload_update":
      case "cleanup_update":
        onUploadUpdate(data);
        break;
      case "statistics_update":
        setStatistics(data);
        break;
      default:
        break;
    }
  }

  function connect() {
    window.clearTimeout(state.reconnectTimer);
    window.clearInterval(state.countdownTimer);
    if (!state.signedIn) return;
    if (state.ws) {
      const old = state.ws;
      state.ws = null;
      old.close();
    }
    setConnection("connecting");
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${window.location.host}/api/ws`);
    state.ws = ws;
    state.seq = 0;
    ws.addEventListener("message", (event) => {
      if (ws !== state.ws) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (_) {
        return;
      }
      if (typeof message.seq === "number") {
        const gap = state.seq !== 0 && message.seq !== state.seq + 1;
        state.seq = message.seq;
        if (gap) scheduleResync();
      }
      handleMessage(message);
    });
    ws.addEventListener("close", () => {
      if (ws !== state.ws) return;
      state.ws = null;
      if (!state.signedIn) return;
      scheduleReconnect();
      checkSession();
    });
  }

  function scheduleReconnect() {
    const delay = Math.min(state.reconnectDelay, RECONNECT_MAX_MS) * (0.8 + Math.random() * 0.4);
    state.reconnectDelay = Math.min(state.reconnectDelay * 2, RECONNECT_MAX_MS);
    const due = Date.now() + delay;
    const tick = () => setConnection("offline", { seconds: Math.max(0, Math.ceil((due - Date.now()) / 1000)) });
    tick();
    window.clearInterval(state.countdownTimer);
    state.countdownTimer = window.setInterval(tick, 1000);
    state.reconnectTimer = window.setTimeout(connect, delay);
  }

  async function checkSession() {
    try {
      await api("GET", "/api/downloads/statistics");
    } catch (_) {
      // api() already switched to the sign-in form on a 401
    }
  }

  function scheduleResync() {
    if (state.resyncTimer !== null) return;
    const wait = Math.max(0, state.lastResync + RESYNC_MIN_INTERVAL_MS - Date.now());
    state.resyncTimer = window.setTimeout(() => {
      state.resyncTimer = null;
      resync();
    }, wait);
  }

  async function resync() {
    if (state.syncing) {
      state.syncAgain = true;
      return;
    }
    state.syncing = true;
    state.lastResync = Date.now();
    state.buffered = [];
    setConnection("syncing");
    try {
      const data = await api("GET", `/api/downloads?grouped=true&limit=${LIST_LIMIT}`);
      installSnapshot(Array.isArray(data.groups) ? data.groups : []);
      state.syncCount += 1;
      state.syncErrorShown = false;
      document.body.dataset.synced = String(state.syncCount);
    } catch (error) {
      if (error.status !== 401 && !state.syncErrorShown) {
        state.syncErrorShown = true;
        toast(t("web.list.sync_failed", { message: error.message }), "bad");
      }
    } finally {
      state.syncing = false;
      const buffered = state.buffered;
      state.buffered = [];
      for (const message of buffered) handleMessage(message);
      if (state.ws && state.ws.readyState === WebSocket.OPEN) setConnection("live");
      if (state.syncAgain) {
        state.syncAgain = false;
        scheduleResync();
      }
    }
  }

  // --- sign-in ----------------------------------------------------------------------------

  function showLogin() {
    $("dashboard").hidden = true;
    $("logout").hidden = true;
    $("login-view").hidden = false;
    setConnection("signed-out");
    $("token").focus();
  }

  function showDashboard() {
    $("login-view").hidden = true;
    $("dashboard").hidden = false;
    $("logout").hidden = false;
    if (window.location.pathname === "/login") window.history.replaceState(null, "", "/");
    drawChart();
  }

  function signedOut(notify) {
    if (!state.signedIn) return;
    state.signedIn = false;
    window.clearTimeout(state.reconnectTimer);
    window.clearInterval(state.countdownTimer);
    if (state.ws) {
      const ws = state.ws;
      state.ws = null;
      ws.close();
    }
    showLogin();
    if (notify) toast(t("web.error.unauthorized"), "bad");
  }

  function signedIn() {
    state.signedIn = true;
    document.body.dataset.loginState = "";
    showDashboard();
    connect();
  }

  async function onLoginSubmit(event) {
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
      if (response.ok) {
        input.value = "";
        signedIn();
        return;
      }
      error.textContent = response.status === 401 || response.status === 403
        ? t("web.login.failed")
        : t("web.login.error", { message: `HTTP ${response.status}` });
      document.body.dataset.loginState = "failed";
      input.select();
    } catch (_) {
      error.textContent = t("web.login.error", { message: t("web.error.network") });
      document.body.dataset.loginState = "failed";
    } finally {
      button.disabled = false;
    }
  }

  async function onLogout() {
    try {
      await fetch("/logout", { method: "POST", credentials: "same-origin", headers: { Accept: "application/json" } });
    } catch (_) {
      // the cookie stays until it expires; the page forgets the session anyway
    }
    signedOut(false);
  }

  // --- adding -----------------------------------------------------------------------------

  function addResult(lines) {
    const list = $("add-result");
    list.replaceChildren(...lines.map(([kind, text]) => h("li", { class: kind, text })));
  }

  async function onAddSubmit(event) {
    event.preventDefault();
    const area = $("add-links");
    const urls = Array.from(new Set(area.value.split(/\s+/).map((s) => s.trim()).filter(Boolean)));
    if (!urls.length) {
      addResult([["bad", t("web.add.empty")]]);
      return;
    }
    const button = $("add-submit");
    button.disabled = true;
    try {
      const data = await api("POST", "/api/downloads", { urls });
      const added = Array.isArray(data.downloads) ? data.downloads : [];
      for (const d of added.slice().reverse()) upsertDownload(d, { front: true });
      const lines = [["ok", t("web.add.added", { count: added.length })]];
      if (Array.isArray(data.duplicates) && data.duplicates.length) {
        lines.push(["bad", t("web.add.duplicates", { count: data.duplicates.length })]);
      }
      addResult(lines);
      area.value = "";
    } catch (error) {
      const body = error.body || {};
      if (error.status === 400 && Array.isArray(body.detail)) {
        addResult(body.detail.map((bad) => ["bad", t("web.add.invalid", { url: bad.url || "?", reason: bad.reason || "" })]));
      } else if (error.status === 409) {
        const duplicates = Array.isArray(body.detail) ? body.detail.length : 1;
        addResult([["bad", t("web.add.duplicates", { count: duplicates })]]);
      } else {
        addResult([["bad", t("web.add.failed", { message: error.message })]]);
      }
    } finally {
      button.disabled = false;
    }
  }

  async function onTorrentChosen(event) {
    const input = event.target;
    const file = input.files && input.files[0];
    if (!file) return;
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const data = await api("POST", "/api/downloads/torrent", form);
      for (const d of data.downloads || []) upsertDownload(d, { front: true });
      addResult([["ok", t("web.add.torrent_added")]]);
    } catch (error) {
      addResult([["bad", t("web.add.failed", { message: error.message })]]);
    } finally {
      input.value = "";
    }
  }

  // --- language ---------------------------------------------------------------------------

  function switchLanguage() {
    i18n.lang = i18n.lang === "zh" ? "en" : "zh";
    try {
      window.localStorage.setItem(LANGUAGE_STORAGE_KEY, i18n.lang);
    } catch (_) {
      // private mode: the choice lasts for this page only
    }
    applyStaticTexts();
    const conn = $("conn-text");
    if (conn.dataset.i18n) conn.textContent = t(conn.dataset.i18n, { seconds: "…" });
    for (const rec of state.downloads.values()) renderItem(rec);
    renderGroups();
    renderStatistics();
    drawChart();
  }

  // --- start ------------------------------------------------------------------------------

  async function boot() {
    await loadMessages();
    i18n.lang = pickLanguage();
    applyStaticTexts();
    $("login-form").addEventListener("submit", onLoginSubmit);
    $("logout").addEventListener("click", onLogout);
    $("lang-switch").addEventListener("click", switchLanguage);
    $("add-form").addEventListener("submit", onAddSubmit);
    $("torrent-file").addEventListener("change", onTorrentChosen);
    $("delete-dialog").addEventListener("close", onDeleteDialogClosed);
    window.addEventListener("resize", drawChart);
    window.setInterval(sampleSpeeds, 1000);

    let authenticated = false;
    try {
      const response = await fetch("/api/downloads/statistics", {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      authenticated = response.ok;
      if (response.ok) setStatistics({ downloads: await response.json() });
    } catch (_) {
      authenticated = false;
    }
    document.documentElement.classList.remove("boot");
    if (authenticated) signedIn();
    else showLogin();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
  else boot();
})();
