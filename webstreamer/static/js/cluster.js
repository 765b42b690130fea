// The cluster: every node with its state, jobs, free disk and heartbeat, from GET /api/cluster
// every few seconds while the page is visible. A single node shows no panel and no node labels.
import { api } from "./api.js";
import { $, formatBytes, formatDuration, formatTime, h } from "./dom.js";
import { renderAll } from "./groups.js";
import { t } from "./i18n.js";
import { state } from "./state.js";

const REFRESH_MS = 4000;
const poll = { on: false, busy: false, timer: null };

const clusterEnabled = () => Boolean(state.cluster && state.cluster.enabled);

function nodeRow(node, leader) {
  const name = String(node.name || "");
  const nodeState = String(node.state || "");
  const isLeader = leader !== null && name === leader;
  const marks = [];
  if (isLeader) marks.push(h("span", { class: "badge leader", text: t("web.nodes.leader") }));
  if (node.self === true) marks.push(h("span", { class: "badge self", text: t("web.nodes.self") }));
  const age = Number(node.heartbeat_age);
  return h(
    "tr",
    { dataset: { node: name, state: nodeState, leader: String(isLeader) } },
    h("td", { class: "node-name" }, h("span", { text: name }), ...marks),
    h("td", null, h("span", { class: "badge", dataset: { nodeState }, text: t(`web.nodes.state.${nodeState}`) })),
    h("td", { class: "num", text: `${Number(node.running) || 0} / ${Number(node.slots) || 0}` }),
    h("td", { class: "num", text: formatBytes(node.disk_free) }),
    h("td", {
      class: "num",
      title: formatTime(node.heartbeat_at),
      text: t("web.nodes.age", { age: formatDuration(age) }),
    }),
  );
}

/** The nodes panel from the last answer: shown only in a cluster. */
export function renderNodes() {
  const enabled = clusterEnabled();
  $("nodes").hidden = !enabled;
  if (!enabled) {
    $("nodes-body").replaceChildren();
    return;
  }
  const leader = typeof state.cluster.leader === "string" ? state.cluster.leader : null;
  const nodes = Array.isArray(state.cluster.nodes) ? state.cluster.nodes : [];
  $("nodes-body").replaceChildren(...nodes.map((node) => nodeRow(node, leader)));
}

function setCluster(data) {
  if (!data || typeof data !== "object") return;
  const wasEnabled = clusterEnabled();
  state.cluster = data;
  $("nodes").dataset.enabled = String(clusterEnabled()); // set once the server has answered
  renderNodes();
  if (clusterEnabled() !== wasEnabled) renderAll(); // the rows' node labels come or go
}

/** Fetch now, then every few seconds while signed in and visible (a hidden page pauses). */
export async function refreshCluster() {
  window.clearTimeout(poll.timer);
  poll.timer = null;
  if (!poll.on || poll.busy || document.hidden) return;
  poll.busy = true;
  try {
    const data = await api("GET", "/api/cluster");
    if (poll.on) setCluster(data);
  } catch (_) {
    // Keep what is shown: the next refresh tries again, and a 401 signs out through api.js.
  } finally {
    poll.busy = false;
  }
  if (poll.on && !document.hidden) poll.timer = window.setTimeout(refreshCluster, REFRESH_MS);
}

export function startCluster() {
  poll.on = true;
  refreshCluster();
}

export function stopCluster() {
  poll.on = false;
  window.clearTimeout(poll.timer);
  poll.timer = null;
}
