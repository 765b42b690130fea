// The page's texts in English and Chinese, from /static/i18n/common.json.
const LANGUAGE_STORAGE_KEY = "mistrelay.lang";

const i18n = { lang: "en", messages: { en: {}, zh: {} } };

function storedLanguage() {
  try {
    return window.localStorage.getItem(LANGUAGE_STORAGE_KEY);
  } catch (_) {
    return null;
  }
}

function pickLanguage() {
  const stored = storedLanguage();
  if (stored === "en" || stored === "zh") return stored;
  for (const code of navigator.languages || [navigator.language || "en"]) {
    const primary = String(code).toLowerCase().split("-")[0];
    if (primary === "zh" || primary === "en") return primary;
  }
  return "en";
}

export function t(key, values) {
  const table = i18n.messages[i18n.lang] || {};
  let text = table[key] ?? (i18n.messages.en || {})[key] ?? key;
  if (values) {
    text = text.replace(/\{(\w+)\}/g, (match, name) =>
      Object.prototype.hasOwnProperty.call(values, name) ? String(values[name]) : match,
    );
  }
  return text;
}

/** The current language, as a key of the rendered views ("en" or "zh"). */
export const language = () => i18n.lang;

/** The locale for dates: the browser's own for English. */
export const locale = () => (i18n.lang === "zh" ? "zh-CN" : undefined);

/** Load the texts and choose the language (stored choice, else the browser's). */
export async function loadMessages() {
  try {
    const response = await fetch("/static/i18n/common.json", { credentials: "same-origin" });
    if (response.ok) i18n.messages = await response.json();
  } catch (_) {
    // The page still works with the English texts built into the markup.
  }
  i18n.lang = pickLanguage();
}

/** The texts of the markup's data-i18n elements, placeholders and titles. */
export function applyStaticTexts() {
  document.documentElement.lang = i18n.lang === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) {
    el.placeholder = t(el.dataset.i18nPlaceholder);
  }
  for (const el of document.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
  document.title = t("web.title");
}

/** Switch between English and Chinese and remember the choice. */
export function toggleLanguage() {
  i18n.lang = i18n.lang === "zh" ? "en" : "zh";
  try {
    window.localStorage.setItem(LANGUAGE_STORAGE_KEY, i18n.lang);
  } catch (_) {
    // private mode: the choice lasts for this page only
  }
}
