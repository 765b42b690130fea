// Finding downloads: a name search with status, source and target filters over the flat list,
// paged by the server's cursor, and one action on the rows ticked (each row's outcome shown);
// the latest uploads, of the target chosen there.
import { api } from "./api.js";
import { $, formatBytes, formatDuration, h, safeUrl } from "./dom.js";
import { t } from "./i18n.js";

const PAGE = 50;
const finder = { cursor: null, query: "", busy: false };

/** The target filter's choices: every configured upload target. */
export function renderFindTargets(names) {
  const select = $("find-target");
  const chosen = select.value;
  select.replaceChildren(
    h("option", { value: "", text: t("web.find.any_target") }),
    ...names.map((name) => h("option", { value: name, text: name })),
  );
  if (names.includes(chosen)) select.value = chosen;
}

function filters() {
  const params = new URLSearchParams({ limit: String(PAGE) });
  for (const [name, id] of [["q", "find-q"], ["status", "find-status"], ["source", "find-source"], ["target", "find-target"]]) {
    const value = $(id).value.trim();
    if (value) params.set(name, value);
  }
  return params.toString();
}

/** ffprobe's facts of a row, in short: duration, resolution, codecs. */
function mediaFacts(info) {
  if (!info || typeof info !== "object") return "";
  const parts = [];
  if (Number(info.duration) > 0) parts.push(formatDuration(Number(info.duration)));
  if (Number(info.width) > 0 && Number(info.height) > 0) parts.push(`${info.width}×${info.height}`);
  const codecs = [info.video_codec, info.audio_codec].filter((c) => typeof c === "string" && c);
  if (codecs.length) parts.push(codecs.join("/"));
  return parts.join(" · ");
}

function resultRow(d) {
  const targets = (d.uploads || []).map((u) => `${u.upload_target}: ${t(`upload_status.${u.status}`)}`);
  return h(
    "tr",
    { dataset: { id: String(d.id) } },
    h("td", null, h("input", { type: "checkbox", class: "find-pick", value: String(d.id), "aria-label": `#${d.id}` })),
    h("td", { class: "num", text: String(d.id) }),
    h("td", { class: "name", text: d.file_name || d.source_url || "" }),
    h("td", { text: t(`status.${d.status}`) }),
    h("td", { text: d.source_type }),
    h("td", { class: "num", text: formatBytes(d.total_length) }),
    h(
      "td",
      { class: "media" },
      safeUrl(d.thumbnail_url) ? h("img", { class: "thumb", src: safeUrl(d.thumbnail_url), alt: "", loading: "lazy" }) : null,
      mediaFacts(d.media_info),
    ),
    h("td", { class: "uploads", text: targets.join(", ") }),
  );
}

async function load(more) {
  if (finder.busy) return;
  finder.busy = true;
  const body = $("find-body");
  try {
    if (!more) finder.query = filters();
    const cursor = more && finder.cursor ? `&cursor=${encodeURIComponent(finder.cursor)}` : "";
    const page = await api("GET", `/api/downloads?${finder.query}${cursor}`);
    const rows = (page.downloads || []).map(resultRow);
    if (more) body.append(...rows);
    else body.replaceChildren(...rows);
    finder.cursor = page.next_cursor || null;
    $("find-more").hidden = !finder.cursor;
    $("find-empty").hidden = body.children.length > 0;
    $("find-result").textContent = "";
  } catch (error) {
    $("find-result").textContent = error.message;
  } finally {
    finder.busy = false;
  }
}

export function onFindSubmit(event) {
  event.preventDefault();
  load(false);
}

export function onFindMore() {
  load(true);
}

export async function onBulkClick(event) {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const ids = Array.from(document.querySelectorAll(".find-pick:checked"), (box) => Number(box.value));
  if (!ids.length) {
    $("find-result").textContent = t("web.find.none_ticked");
    return;
  }
  try {
    const answer = await api("POST", "/api/downloads/bulk", { action: button.dataset.action, ids });
    await load(false);
    const refused = answer.results.filter((r) => !r.ok);
    const done = answer.results.length - refused.length;
    $("find-result").textContent = [
      t("web.find.done", { done, count: answer.results.length }),
      ...refused.map((r) => `#${r.id}: ${r.message}`),
    ].join(" ");
  } catch (error) {
    $("find-result").textContent = error.message;
  }
}

function uploadRow(u) {
  return h(
    "tr",
    { dataset: { id: String(u.id) } },
    h("td", { class: "num", text: String(u.id) }),
    h("td", { class: "num", text: String(u.download_id) }),
    h("td", { text: u.upload_target }),
    h("td", { text: t(`upload_status.${u.status}`) }),
    h("td", { class: "num", text: `${formatBytes(u.uploaded_size)} / ${formatBytes(u.total_size)}` }),
    h("td", { class: "name", text: u.public_link || u.remote_path || "" }),
  );
}

export async function onUploadsShow() {
  const target = $("find-target").value;
  const query = target ? `&target=${encodeURIComponent(target)}` : "";
  try {
    const answer = await api("GET", `/api/uploads?limit=${PAGE}${query}`);
    $("uploads-body").replaceChildren(...(answer.uploads || []).map(uploadRow));
    $("uploads-table").hidden = false;
    $("find-result").textContent = "";
  } catch (error) {
    $("find-result").textContent = error.message;
  }
}
