// The settings card: speed limits and the other live settings (GET/PATCH /api/settings), and the
// record of changes (GET /api/settings/changes). The server checks every value; its refusal,
// which names the key, is shown as it is.
import { renderTargetChoice } from "./add.js";
import { renderFindTargets } from "./finder.js";
import { api } from "./api.js";
import { $, formatBytes, formatTime, h } from "./dom.js";
import { t } from "./i18n.js";

const LIMIT_INPUTS = { "limits.download": "limit-download", "limits.upload": "limit-upload" };
const NUMBER_TEXT = /^\s*-?\d+(\.\d+)?\s*$/;
const view = { settings: null, changes: [] };

function limitText(value) {
  const n = Number(value);
  return n > 0 ? `${formatBytes(n)}/s` : t("web.settings.no_limit");
}

/** A number typed as digits goes as a number; anything else ("2MiB") as text for the server. */
function typed(text) {
  return NUMBER_TEXT.test(text) ? Number(text) : text.trim();
}

function fieldFor(key, value) {
  const id = `setting-${key.replace(/[^a-z0-9]/gi, "-")}`;
  let input;
  if (typeof value === "boolean") {
    input = h("input", { id, type: "checkbox", dataset: { key, kind: "boolean" } });
    input.checked = value;
  } else if (typeof value === "number" || typeof value === "string") {
    const kind = typeof value === "number" ? "number" : "text";
    input = h("input", { id, type: "text", spellcheck: "false", dataset: { key, kind } });
    input.value = String(value);
  } else {
    input = h("textarea", { id, rows: "3", spellcheck: "false", dataset: { key, kind: "json" } });
    input.value = JSON.stringify(value, null, 1);
  }
  return h("div", { class: "setting" }, h("label", { for: id, text: key }), input);
}

function changeRow(change) {
  return h(
    "tr",
    { dataset: { key: String(change.key) } },
    h("td", { class: "when", text: formatTime(change.changed_at) }),
    h("td", { class: "who", text: String(change.changed_by) }),
    h("td", { class: "key", text: String(change.key) }),
    h("td", { class: "values", text: `${change.old_value} → ${change.new_value}` }),
  );
}

/** The card from the last answers (also after a language switch). */
export function renderSettings() {
  const settings = view.settings;
  if (settings) {
    const targets = Array.isArray(settings["upload.targets"]) ? settings["upload.targets"] : [];
    renderTargetChoice(targets.map((target) => String(target.name)));
    renderFindTargets(targets.map((target) => String(target.name)));
    for (const [key, id] of Object.entries(LIMIT_INPUTS)) {
      $(id).value = String(settings[key]);
      $(`${id}-shown`).textContent = limitText(settings[key]);
    }
    const others = Object.entries(settings).filter(([key]) => !(key in LIMIT_INPUTS));
    $("settings-fields").replaceChildren(...others.map(([key, value]) => fieldFor(key, value)));
  }
  $("changes-body").replaceChildren(...view.changes.map(changeRow));
  $("changes-empty").hidden = view.changes.length > 0;
}

function showResult(kind, text) {
  const result = $("settings-result");
  result.className = `settings-result ${kind}`;
  result.textContent = text;
}

/** Fetch the settings and their changes (after signing in, and after each change). */
export async function loadSettings() {
  try {
    const [current, history] = await Promise.all([
      api("GET", "/api/settings"),
      api("GET", "/api/settings/changes?limit=50"),
    ]);
    view.settings = current.settings;
    view.changes = Array.isArray(history.changes) ? history.changes : [];
    renderSettings();
  } catch (_) {
    // Keep what is shown; a 401 signs out through api.js.
  }
}

async function send(values, button) {
  if (!Object.keys(values).length) {
    showResult("ok", t("web.settings.saved", { count: 0 }));
    return;
  }
  button.disabled = true;
  try {
    const data = await api("PATCH", "/api/settings", values);
    showResult("ok", t("web.settings.saved", { count: data.changes.length }));
    await loadSettings();
  } catch (error) {
    const detail = (error.body && error.body.detail) || {};
    showResult("bad", t("web.settings.refused", { key: detail.key || "?", message: error.message }));
  } finally {
    button.disabled = false;
  }
}

export async function onLimitsSubmit(event) {
  event.preventDefault();
  if (!view.settings) return;
  const values = {};
  for (const [key, id] of Object.entries(LIMIT_INPUTS)) {
    const text = $(id).value;
    if (text.trim() !== String(view.settings[key])) values[key] = typed(text);
  }
  await send(values, $("limits-save"));
}

export async function onSettingsSubmit(event) {
  event.preventDefault();
  if (!view.settings) return;
  const values = {};
  for (const input of $("settings-fields").querySelectorAll("[data-key]")) {
    const key = input.dataset.key;
    let value;
    if (input.dataset.kind === "boolean") value = input.checked;
    else if (input.dataset.kind === "number") value = typed(input.value);
    else if (input.dataset.kind === "text") value = input.value.trim();
    else {
      try {
        value = JSON.parse(input.value);
      } catch (error) {
        showResult("bad", t("web.settings.bad_json", { key, message: error.message }));
        return;
      }
    }
    if (JSON.stringify(value) !== JSON.stringify(view.settings[key])) values[key] = value;
  }
  await send(values, $("settings-save"));
}
