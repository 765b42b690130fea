// What the page knows: the rows on screen, their groups, the session and the statistics.
// Modules change it only through their own functions (groups.js for rows, stats.js for figures,
// cluster.js for the nodes).
export const state = {
  signedIn: false,
  me: null, // who is signed in (GET /api/me): {role: "admin" | "user", user_id}
  downloads: new Map(), // id → {data, view, detailsOpen, history, historyError}
  groups: new Map(), // key → {key, sourceType, mediaGroupId, ids, view}
  groupOrder: [],
  statistics: null,
  cluster: null, // the last GET /api/cluster answer
  samples: [],
};
