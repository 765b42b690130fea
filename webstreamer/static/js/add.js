// The add box: links (one or many) and .torrent files.
import { api } from "./api.js";
import { $, h } from "./dom.js";
import { putDownload } from "./groups.js";
import { t } from "./i18n.js";

function addResult(lines) {
  $("add-result").replaceChildren(...lines.map(([kind, text]) => h("li", { class: kind, text })));
}

function showAdded(downloads) {
  for (const d of downloads.slice().reverse()) putDownload(d, { front: true });
}

// The archive step chosen for the new links: extract (with its password, if typed) or zip.
function archiveFields() {
  const action = $("add-archive").value;
  if (!action) return {};
  const password = $("add-archive-password").value;
  return action === "extract" && password ? { archive: action, archive_password: password } : { archive: action };
}

// The upload targets chosen for the new jobs: one target only, or none ("keep here only");
// the empty choice sends nothing, so the targets' match rules decide.
function targetFields() {
  const box = $("add-targets-box");
  const choice = $("add-targets").value;
  if (box.hidden || !choice) return {};
  return { targets: choice === "-" ? [] : [choice.slice(1)] };
}

/** The selector, offered when several upload targets are configured (`names`). */
export function renderTargetChoice(names) {
  const select = $("add-targets");
  const chosen = select.value;
  const option = (value, text) => h("option", { value, text });
  select.replaceChildren(
    option("", t("web.add.targets_rules")),
    ...names.map((name) => option(`=${name}`, t("web.add.targets_only", { name }))),
    option("-", t("web.add.targets_keep")),
  );
  if (Array.from(select.options).some((o) => o.value === chosen)) select.value = chosen;
  $("add-targets-box").hidden = names.length < 2;
}

export function onArchiveChosen() {
  const password = $("add-archive-password");
  password.hidden = $("add-archive").value !== "extract";
  if (password.hidden) password.value = "";
}

export async function onAddSubmit(event) {
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
    const data = await api("POST", "/api/downloads", { urls, ...archiveFields(), ...targetFields() });
    const added = Array.isArray(data.downloads) ? data.downloads : [];
    showAdded(added);
    const lines = [["ok", t("web.add.added", { count: added.length })]];
    if (Array.isArray(data.duplicates) && data.duplicates.length) {
      lines.push(["bad", t("web.add.duplicates", { count: data.duplicates.length })]);
    }
    addResult(lines);
    area.value = "";
    $("add-archive-password").value = "";
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

export async function onTorrentChosen(event) {
  const input = event.target;
  const file = input.files && input.files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file, file.name);
  for (const [name, value] of Object.entries(archiveFields())) form.append(name, value);
  const { targets } = targetFields();
  if (targets) form.append("targets", JSON.stringify(targets));
  try {
    const data = await api("POST", "/api/downloads/torrent", form);
    showAdded(Array.isArray(data.downloads) ? data.downloads : []);
    addResult([["ok", t("web.add.torrent_added")]]);
  } catch (error) {
    addResult([["bad", t("web.add.failed", { message: error.message })]]);
  } finally {
    input.value = "";
  }
}
