// A download's uploads: one line per target with its state, progress and the upload's own
// `actions` from the server (clicks are handled in controls.js).
import { formatBytes, formatSpeed, h } from "./dom.js";
import { language, t } from "./i18n.js";

function createUploadView(id) {
  const view = {
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
    { class: "upload", dataset: { uploadId: String(id) } },
    view.target,
    view.badge,
    h("div", { class: "progress thin" }, view.bar),
    view.size,
    view.buttons,
    view.error,
  );
  return view;
}

/** Why the upload failed: `failed` is final; `pending` with `next_attempt_at` waits for its retry. */
function errorText(upload, status) {
  if (!upload.error_message) return "";
  if (status === "failed") return upload.error_message;
  if (status !== "pending" || !upload.next_attempt_at) return "";
  return t("web.item.upload_retry", {
    tries: upload.retry_count,
    max_tries: upload.max_retries,
    time: new Date(upload.next_attempt_at).toLocaleTimeString(),
    reason: upload.error_message,
  });
}

function renderUpload(view, upload) {
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
  const error = errorText(upload, status);
  view.error.hidden = !error;
  view.error.textContent = error;
  const actions = Array.isArray(upload.actions) ? upload.actions.map(String) : [];
  const key = `${actions.join(",")}|${language()}`;
  if (view.buttonsKey !== key) {
    view.buttonsKey = key;
    view.buttons.replaceChildren(
      ...actions.map((action) =>
        h("button", { type: "button", class: "small", text: t(`web.action.upload_${action}`), dataset: { action } }),
      ),
    );
  }
}

/** Bring the item view `v`'s upload lines in line with `uploads` (kept by id, in order). */
export function renderUploads(v, uploads) {
  v.uploads.hidden = uploads.length === 0;
  const seen = new Set();
  for (const upload of uploads) {
    seen.add(upload.id);
    let view = v.uploadViews.get(upload.id);
    if (!view) {
      view = createUploadView(upload.id);
      v.uploadViews.set(upload.id, view);
      v.uploads.append(view.root);
    }
    renderUpload(view, upload);
  }
  for (const [id, view] of v.uploadViews) {
    if (!seen.has(id)) {
      view.root.remove();
      v.uploadViews.delete(id);
    }
  }
}
