// The live connection: WebSocket pushes numbered by `seq`, a list resync after a gap or a
// reconnect, and the pushes that arrive during a resync buffered and replayed after it.
import { api } from "./api.js";
import { loadHistory } from "./controls.js";
import { $, toast } from "./dom.js";
import { installSnapshot, putDownload, putUpload, removeAllDownloads, removeDownload } from "./groups.js";
import { t } from "./i18n.js";
import { state } from "./state.js";
import { setStatistics } from "./stats.js";

const LIST_LIMIT = 200;
const RECONNECT_MIN_MS = 1000;
const RECONNECT_MAX_MS = 15000;
const RESYNC_MIN_INTERVAL_MS = 3000;
const CONNECTION_TEXTS = {
  connecting: "web.conn.connecting",
  live: "web.conn.live",
  syncing: "web.conn.syncing",
  offline: "web.conn.offline",
  "signed-out": "web.conn.signed_out",
};

const live = {
  ws: null,
  seq: 0,
  reconnectDelay: RECONNECT_MIN_MS,
  reconnectTimer: null,
  countdownTimer: null,
  syncing: false,
  syncAgain: false,
  buffered: [],
  lastResync: 0,
  resyncTimer: null,
  syncCount: 0,
  syncErrorShown: false,
};

export function setConnection(kind, values) {
  $("conn").dataset.state = kind;
  const label = $("conn-text");
  label.dataset.i18n = CONNECTION_TEXTS[kind];
  label.textContent = t(CONNECTION_TEXTS[kind], values);
}

function onDownloadUpdate(data) {
  if (data.deleted_all === true) {
    removeAllDownloads();
    return;
  }
  if (typeof data.id !== "number") return;
  if (data.deleted === true) {
    removeDownload(data.id);
    return;
  }
  const rec = state.downloads.get(data.id);
  const statusBefore = rec && rec.data.status;
  const added = putDownload(data, { front: true });
  // A Telegram row's album (its group's label) is only in the grouped list.
  if (added && data.source_type === "telegram") scheduleResync();
  if (rec && rec.detailsOpen && data.status !== statusBefore) loadHistory(rec);
}

function onUploadUpdate(data) {
  if (typeof data.id !== "number" || !putUpload(data)) scheduleResync();
}

function handleMessage(message) {
  if (!message || typeof message !== "object") return;
  const data = message.data || {};
  if (live.syncing && message.type !== "hello" && message.type !== "statistics_update") {
    live.buffered.push(message);
    return;
  }
  switch (message.type) {
    case "hello":
      live.reconnectDelay = RECONNECT_MIN_MS;
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

function closeSocket() {
  if (live.ws) {
    const ws = live.ws;
    live.ws = null;
    ws.close();
  }
}

/** Open the WebSocket (closing any previous one); the hello message starts a resync. */
export function connect() {
  window.clearTimeout(live.reconnectTimer);
  window.clearInterval(live.countdownTimer);
  if (!state.signedIn) return;
  closeSocket();
  setConnection("connecting");
  const scheme = window.location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${window.location.host}/api/ws`);
  live.ws = ws;
  live.seq = 0;
  ws.addEventListener("message", (event) => {
    if (ws !== live.ws) return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch (_) {
      return;
    }
    if (typeof message.seq === "number") {
      const gap = live.seq !== 0 && message.seq !== live.seq + 1;
      live.seq = message.seq;
      if (gap) scheduleResync();
    }
    handleMessage(message);
  });
  ws.addEventListener("close", () => {
    if (ws !== live.ws) return;
    live.ws = null;
    if (!state.signedIn) return;
    scheduleReconnect();
    // A 401 here means the session ended: the API's handler shows the sign-in form.
    api("GET", "/api/me").catch(() => {});
  });
}

/** Stop the live connection and any pending reconnect (signed out). */
export function disconnect() {
  window.clearTimeout(live.reconnectTimer);
  window.clearInterval(live.countdownTimer);
  closeSocket();
}

function scheduleReconnect() {
  const delay = Math.min(live.reconnectDelay, RECONNECT_MAX_MS) * (0.8 + Math.random() * 0.4);
  live.reconnectDelay = Math.min(live.reconnectDelay * 2, RECONNECT_MAX_MS);
  const due = Date.now() + delay;
  const tick = () => setConnection("offline", { seconds: Math.max(0, Math.ceil((due - Date.now()) / 1000)) });
  tick();
  window.clearInterval(live.countdownTimer);
  live.countdownTimer = window.setInterval(tick, 1000);
  live.reconnectTimer = window.setTimeout(connect, delay);
}

function scheduleResync() {
  if (live.resyncTimer !== null) return;
  const wait = Math.max(0, live.lastResync + RESYNC_MIN_INTERVAL_MS - Date.now());
  live.resyncTimer = window.setTimeout(() => {
    live.resyncTimer = null;
    resync();
  }, wait);
}

async function resync() {
  if (live.syncing) {
    live.syncAgain = true;
    return;
  }
  live.syncing = true;
  live.lastResync = Date.now();
  live.buffered = [];
  setConnection("syncing");
  try {
    const data = await api("GET", `/api/downloads?grouped=true&limit=${LIST_LIMIT}`);
    installSnapshot(Array.isArray(data.groups) ? data.groups : []);
    live.syncCount += 1;
    live.syncErrorShown = false;
    document.body.dataset.synced = String(live.syncCount);
  } catch (error) {
    if (error.status !== 401 && !live.syncErrorShown) {
      live.syncErrorShown = true;
      toast(t("web.list.sync_failed", { message: error.message }), "bad");
    }
  } finally {
    live.syncing = false;
    const buffered = live.buffered;
    live.buffered = [];
    for (const message of buffered) handleMessage(message);
    if (live.ws && live.ws.readyState === WebSocket.OPEN) setConnection("live");
    if (live.syncAgain) {
      live.syncAgain = false;
      scheduleResync();
    }
  }
}
