// The API page: every operation of /api/openapi.json, grouped by tag, with its parameters, body
// and answers. Everything from the document reaches the DOM as text (h() never parses markup).
import { $, h } from "./dom.js";

const METHODS = ["get", "head", "post", "put", "patch", "delete"];

/** "#/components/schemas/Download" → "Download"; inline schemas by their type. */
function schemaName(schema) {
  if (!schema) return "";
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.oneOf) return schema.oneOf.map(schemaName).join(" | ");
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (schema.type === "array") return `${schemaName(schema.items)}[]`;
  if (schema.type === "object" && schema.properties) {
    return `{${Object.keys(schema.properties).join(", ")}}`;
  }
  return Array.isArray(schema.type) ? schema.type.join(" | ") : schema.type || "any";
}

function contentLine(content) {
  return Object.entries(content || {})
    .map(([media, { schema }]) => `${media}: ${schemaName(schema)}`)
    .join("; ");
}

function security(op, doc) {
  const schemes = (op.security ?? doc.security ?? []).flatMap((entry) => Object.keys(entry));
  return schemes.length ? schemes.join(" or ") : "public";
}

function operationCard(path, method, op, doc) {
  const rows = [];
  for (const p of op.parameters || []) {
    const optional = p.required ? "" : "?";
    const text = `${p.in} ${p.name}${optional}: ${schemaName(p.schema)} — ${p.description || ""}`;
    rows.push(h("li", { text }));
  }
  if (op.requestBody) rows.push(h("li", { text: `body: ${contentLine(op.requestBody.content)}` }));
  const answers = Object.entries(op.responses || {}).map(([status, answer]) => {
    const shape = contentLine(answer.content);
    return h("li", { text: `${status} ${answer.description}${shape ? ` — ${shape}` : ""}` });
  });
  return h(
    "section",
    { class: "card api-op", id: op.operationId },
    h(
      "h3",
      {},
      h("code", { class: `method ${method}`, text: method.toUpperCase() }),
      " ",
      h("code", { text: path }),
    ),
    h("p", { text: op.summary || "" }),
    op.description ? h("p", { class: "hint", text: op.description }) : null,
    h("p", { class: "hint", text: `auth: ${security(op, doc)}` }),
    rows.length ? h("ul", {}, ...rows) : null,
    h("ul", { class: "answers" }, ...answers),
  );
}

function schemaCard(name, schema) {
  const required = new Set(schema.required || []);
  const fields = Object.entries(schema.properties || {}).map(([field, value]) => {
    const optional = required.has(field) ? "" : "?";
    const note = value.description ? ` — ${value.description}` : "";
    return h("li", {}, h("code", { text: field }), `${optional}: ${schemaName(value)}${note}`);
  });
  return h(
    "section",
    { class: "card api-op", id: `schema-${name}` },
    h("h3", {}, h("code", { text: name })),
    schema.description ? h("p", { class: "hint", text: schema.description }) : null,
    fields.length ? h("ul", {}, ...fields) : h("p", { text: schemaName(schema) }),
  );
}

function render(doc) {
  const byTag = new Map();
  for (const [path, item] of Object.entries(doc.paths || {})) {
    for (const method of METHODS) {
      const op = item[method];
      if (!op) continue;
      const tag = (op.tags && op.tags[0]) || "other";
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push(operationCard(path, method, op, doc));
    }
  }
  const root = $("api-operations");
  root.replaceChildren();
  for (const [tag, cards] of byTag) root.append(h("h2", { text: tag }), ...cards);
  const schemas = Object.entries((doc.components || {}).schemas || {});
  root.append(
    h("h2", { text: "schemas" }),
    ...schemas.map(([name, schema]) => schemaCard(name, schema)),
  );
  // The cards exist only now: follow a link to one of them (#operationId, #schema-Name).
  const hash = decodeURIComponent(window.location.hash.slice(1));
  const target = hash && document.getElementById(hash);
  if (target) target.scrollIntoView();
  const { title, version, description } = doc.info;
  $("api-intro").textContent = `${title} ${version} — OpenAPI ${doc.openapi}. ${description || ""}`;
}

async function load() {
  try {
    const response = await fetch("/api/openapi.json", { credentials: "same-origin" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
  } catch (error) {
    $("api-intro").textContent = `The document could not be loaded: ${error.message}`;
  }
}

load();
