// The figures at the top and the speed chart of the last few minutes.
import { $, formatBytes, formatSpeed } from "./dom.js";
import { t } from "./i18n.js";
import { state } from "./state.js";

const CHART_MINUTES = 5;
const CHART_POINTS = CHART_MINUTES * 60;

function setStat(name, text) {
  const el = document.querySelector(`[data-stat="${name}"] .value`);
  if (el) el.textContent = text;
}

export function renderStatistics() {
  $("chart-title").textContent = t("web.chart.title", { minutes: CHART_MINUTES });
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

/** Merge a statistics message ({downloads, uploads}, either may be missing) and show it. */
export function setStatistics(statistics) {
  if (!statistics || typeof statistics !== "object") return;
  state.statistics = { ...(state.statistics || {}), ...statistics };
  renderStatistics();
}

/** One chart point per second from the latest speeds. */
export function sampleSpeeds() {
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

export function drawChart() {
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
