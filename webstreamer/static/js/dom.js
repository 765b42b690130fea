// Building and formatting: every piece of data reaches the DOM through textContent or a checked
// attribute, never as markup (file names and links are hostile input).
import { locale, t } from "./i18n.js";

export const $ = (id) => document.getElementById(id);

export function h(tag, props, ...children) {
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

/** The absolute http(s) form of `value`, or null for anything else (javascript:, data: …). */
export function safeUrl(value) {
  if (typeof value !== "string" || !value) return null;
  try {
    const url = new URL(value, window.location.href);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch (_) {
    return null;
  }
}

export function formatBytes(value) {
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

export const formatSpeed = (value) => `${formatBytes(value)}/s`;

export function formatDuration(seconds) {
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

export function formatTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso || "");
  return date.toLocaleString(locale());
}

function extensionOf(name) {
  const match = /\.([A-Za-z0-9]{1,8})$/.exec(String(name || ""));
  return match ? match[1].toLowerCase() : "";
}

export function toast(message, kind) {
  const box = $("toasts");
  const el = h("div", { class: kind === "bad" ? "toast bad" : "toast", text: message });
  box.append(el);
  while (box.children.length > 4) box.firstElementChild.remove();
  window.setTimeout(() => el.remove(), kind === "bad" ? 8000 : 4000);
}

/** Put `text` on the clipboard (or copy it through a selection); whether that worked. */
export async function copyText(text) {
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

/** A "copy link" button for an already checked URL; `props` adds attributes. */
export function copyLinkButton(url, props) {
  return h("button", {
    ...props,
    type: "button",
    class: "small",
    text: t("web.action.copy_link"),
    onclick: async () => {
      const copied = await copyText(url);
      toast(copied ? t("web.action.copied") : t("web.action.copy_failed", { url }));
    },
  });
}

const MEDIA_EXTENSIONS = new Set([
  "mp4", "m4v", "webm", "mkv", "mov", "ogv", "ogg", "oga", "mp3", "m4a", "aac", "flac",
  "wav", "opus", "mka", "weba",
]);

/** A "watch" link for a checked URL when `fileName` is audio or video the player can try. */
export function watchLink(url, fileName, props) {
  if (!url || !MEDIA_EXTENSIONS.has(extensionOf(fileName))) return null;
  return h("a", {
    ...props,
    href: url,
    target: "_blank",
    rel: "noopener noreferrer",
    text: t("web.action.watch"),
  });
}
