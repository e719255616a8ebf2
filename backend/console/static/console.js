// The console: sign in with a mailed code, pick a workspace, list workflows and runs,
// follow a run live. Only the public API; the tokens live in this tab's sessionStorage
// and go in headers (or the WebSocket subprotocol), never in a URL. Everything from the
// server is put on the page as text (textContent), never as HTML.
"use strict";

const API = "/api/v1";
const TERMINAL = ["completed", "failed", "cancelled"];
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

const store = {
  get(key) { return sessionStorage.getItem("studio." + key); },
  set(key, value) {
    if (value === null || value === undefined) sessionStorage.removeItem("studio." + key);
    else sessionStorage.setItem("studio." + key, value);
  },
};

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.detail) || "HTTP " + status);
    this.status = status;
    this.body = body;
  }
}

function say(text) {
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}

async function refresh() {
  const token = store.get("refresh");
  if (!token) return false;
  const r = await fetch(API + "/auth/refresh", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ refresh_token: token }),
  });
  if (!r.ok) return false;
  keepPair(await r.json());
  return true;
}

function keepPair(pair) {
  store.set("access", pair.access_token);
  store.set("refresh", pair.refresh_token);
  store.set("email", pair.user.email);
}

async function api(method, path, body, { auth = true, retried = false } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (auth) headers.Authorization = "Bearer " + store.get("access");
  const workspace = store.get("workspace");
  if (auth && workspace) headers["X-Workspace-ID"] = workspace;
  const r = await fetch(API + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 401 && auth && !retried && (await refresh())) {
    return api(method, path, body, { auth, retried: true });
  }
  if (r.status === 401 && auth) {
    signOut("Your session ended; sign in again.");
    throw new ApiError(401, null);
  }
  const text = await r.text();
  const data = text ? JSON.parse(text) : null;
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function when(iso) { return iso ? iso.replace("T", " ").slice(0, 19) : ""; }

function ms(value) {
  if (value === null || value === undefined) return "";
  if (value < 1000) return Math.round(value) + " ms";
  if (value < 60000) return (value / 1000).toFixed(1) + " s";
  return Math.floor(value / 60000) + " min " + Math.round((value % 60000) / 1000) + " s";
}

function tokensOf(i, o) { return i || o ? (i || 0) + " in / " + (o || 0) + " out" : ""; }
function costOf(c) { return c ? "$" + Number(c).toFixed(4) : ""; }

function show(section) {
  for (const id of ["sign-in", "home", "run"]) $(id).hidden = id !== section;
  $("who").hidden = section === "sign-in";
}

// Signing in ----------------------------------------------------------------------------

function signOut(message) {
  closeRun();
  for (const key of ["access", "refresh", "email", "workspace"]) store.set(key, null);
  $("email-form").hidden = false;
  $("code-form").hidden = true;
  show("sign-in");
  say(message || "");
}

async function requestCode(event) {
  event.preventDefault();
  const email = $("email").value.trim();
  try {
    await api("POST", "/auth/request-otp", { email, purpose: "login" }, { auth: false });
    $("code-email").textContent = email;
    $("email-form").hidden = true;
    $("code-form").hidden = false;
    $("code").focus();
    say("");
  } catch (error) {
    say(error.message);
  }
}

async function verifyCode(event) {
  event.preventDefault();
  const email = $("code-email").textContent;
  try {
    const pair = await api(
      "POST", "/auth/verify-otp", { email, code: $("code").value.trim() }, { auth: false },
    );
    keepPair(pair);
    $("code").value = "";
    say("");
    await start();
  } catch (error) {
    say(error.message);
  }
}

async function start() {
  $("who-email").textContent = store.get("email") || "";
  const page = await api("GET", "/workspaces?limit=100");
  const select = $("workspace");
  select.replaceChildren();
  for (const w of page.items) {
    const option = el("option", w.name + (w.is_personal ? " (personal)" : ""));
    option.value = w.id;
    select.append(option);
  }
  const ids = page.items.map((w) => w.id);
  if (!ids.includes(store.get("workspace"))) {
    const personal = page.items.find((w) => w.is_personal) || page.items[0];
    store.set("workspace", personal ? personal.id : null);
  }
  select.value = store.get("workspace") || "";
  route();
}

// Lists -----------------------------------------------------------------------------------

async function home() {
  closeRun();
  show("home");
  await Promise.all([listWorkflows(), listRuns()]);
}

async function listWorkflows() {
  const page = await api("GET", "/workflows?limit=100");
  const body = $("workflows").tBodies[0];
  body.replaceChildren();
  for (const w of page.items) {
    const row = el("tr");
    row.dataset.workflowId = w.id;
    row.append(el("td", w.name), el("td", w.status), el("td", w.version), el("td", when(w.updated_at)));
    const cell = el("td");
    const button = el("button", "Run");
    button.type = "button";
    button.className = "run-workflow";
    button.addEventListener("click", () => startRun(w.id));
    cell.append(button);
    row.append(cell);
    body.append(row);
  }
  if (!page.items.length) {
    const row = el("tr");
    const cell = el("td", "No workflows yet: create one with the API or `studio workflows push`.", "dim");
    cell.colSpan = 5;
    row.append(cell);
    body.append(row);
  }
}

async function listRuns() {
  const page = await api("GET", "/executions?limit=25");
  const body = $("runs").tBodies[0];
  body.replaceChildren();
  for (const e of page.items) {
    const row = el("tr", null, "link");
    row.dataset.executionId = e.id;
    const status = el("span", e.status, "status " + e.status);
    const statusCell = el("td");
    statusCell.append(status);
    row.append(
      el("td", e.id.slice(0, 8)), el("td", e.workflow_id.slice(0, 8)), statusCell,
      el("td", when(e.created_at)), el("td", ms(e.duration_ms)),
      el("td", tokensOf(e.input_tokens, e.output_tokens)),
    );
    row.addEventListener("click", () => { location.hash = "#/runs/" + e.id; });
    body.append(row);
  }
}

async function startRun(workflowId) {
  try {
    const accepted = await api("POST", "/executions", { workflow_id: workflowId, trigger_data: {} });
    location.hash = "#/runs/" + accepted.id;
  } catch (error) {
    say(error.message);
  }
}

// One run, live -----------------------------------------------------------------------------

let current = null; // {id, socket, nodes: Map, lastSeq, closed, ...}

function closeRun() {
  if (current) {
    current.closed = true;
    if (current.socket) current.socket.close(1000);
    clearTimeout(current.retryTimer);
  }
  current = null;
}

function layout(definition) {
  // Columns by longest path from a root, rows in definition order: a readable DAG
  // without a layout library.
  const nodes = (definition.nodes || []).map((n) => n.id);
  const edges = (definition.connections || []).filter(
    (c) => nodes.includes(c.source) && nodes.includes(c.target),
  );
  const level = new Map(nodes.map((id) => [id, 0]));
  for (let pass = 0; pass < nodes.length; pass++) {
    let changed = false;
    for (const c of edges) {
      if (level.get(c.target) < level.get(c.source) + 1) {
        level.set(c.target, level.get(c.source) + 1);
        changed = true;
      }
    }
    if (!changed) break;
  }
  const rows = new Map();
  const place = new Map();
  for (const id of nodes) {
    const column = level.get(id);
    const row = rows.get(column) || 0;
    rows.set(column, row + 1);
    place.set(id, { x: 20 + column * 190, y: 20 + row * 80 });
  }
  return { nodes, edges, place, width: 40 + (Math.max(0, ...level.values()) + 1) * 190, height: 40 + Math.max(1, ...rows.values()) * 80 };
}

function drawDag(definition) {
  const svg = $("dag");
  svg.replaceChildren();
  const { nodes, edges, place, width, height } = layout(definition);
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  svg.setAttribute("height", String(height));
  for (const c of edges) {
    const a = place.get(c.source);
    const b = place.get(c.target);
    const path = document.createElementNS(SVG, "path");
    const x1 = a.x + 160, y1 = a.y + 27, x2 = b.x, y2 = b.y + 27;
    path.setAttribute("d", `M${x1},${y1} C${x1 + 15},${y1} ${x2 - 15},${y2} ${x2},${y2}`);
    path.setAttribute("class", "edge");
    svg.append(path);
  }
  for (const id of nodes) {
    const p = place.get(id);
    const g = document.createElementNS(SVG, "g");
    g.setAttribute("class", "node pending");
    g.setAttribute("transform", `translate(${p.x},${p.y})`);
    g.dataset.nodeId = id;
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("width", "160");
    rect.setAttribute("height", "54");
    const name = document.createElementNS(SVG, "text");
    name.setAttribute("x", "8");
    name.setAttribute("y", "18");
    name.textContent = id.length > 22 ? id.slice(0, 21) + "…" : id;
    const meta = document.createElementNS(SVG, "text");
    meta.setAttribute("x", "8");
    meta.setAttribute("y", "34");
    meta.setAttribute("class", "meta");
    meta.textContent = "pending";
    const usage = document.createElementNS(SVG, "text");
    usage.setAttribute("x", "8");
    usage.setAttribute("y", "48");
    usage.setAttribute("class", "meta");
    const title = document.createElementNS(SVG, "title");
    title.textContent = id;
    g.append(title, rect, name, meta, usage);
    g.addEventListener("click", () => showNode(id));
    svg.append(g);
  }
}

function paintNode(id, state) {
  const g = [...$("dag").querySelectorAll("g.node")].find((n) => n.dataset.nodeId === id);
  if (!g) return;
  const selected = g.classList.contains("selected");
  g.setAttribute("class", "node " + state.status + (selected ? " selected" : ""));
  g.dataset.status = state.status;
  const texts = g.querySelectorAll("text");
  texts[1].textContent = [state.status, ms(state.duration_ms)].filter(Boolean).join(" · ");
  texts[2].textContent = [tokensOf(state.input_tokens, state.output_tokens), costOf(state.cost_usd)]
    .filter(Boolean).join(" · ");
}

function setRunStatus(status) {
  const badge = $("run-status");
  badge.textContent = status;
  badge.className = "status " + status;
  $("run").dataset.status = status;
  $("cancel").disabled = TERMINAL.includes(status);
  $("retry").disabled = !["failed", "cancelled"].includes(status);
}

function runFacts(data) {
  const parts = [];
  if (data.duration_ms !== undefined && data.duration_ms !== null) parts.push(ms(data.duration_ms));
  const used = tokensOf(data.input_tokens, data.output_tokens);
  if (used) parts.push(used);
  if (data.cost_usd) parts.push(costOf(data.cost_usd));
  $("run-facts").textContent = parts.join(" · ");
  $("run-error").textContent = data.error ? JSON.stringify(data.error, null, 2) : "";
}

function onEvent(event) {
  const run = current;
  if (!run) return;
  if (typeof event.seq === "number") run.lastSeq = event.seq;
  if (event.type === "snapshot") {
    setRunStatus(event.execution.status);
    for (const n of event.nodes || []) {
      const state = Object.assign(run.nodes.get(n.node_id) || {}, n);
      run.nodes.set(n.node_id, state);
      paintNode(n.node_id, state);
    }
    if (TERMINAL.includes(event.execution.status)) runFacts(event.execution);
  } else if (event.type === "execution.status") {
    setRunStatus(event.status);
    if (TERMINAL.includes(event.status)) runFacts(event.data || {});
  } else if (event.type === "node.status") {
    const state = run.nodes.get(event.node_id) || {};
    Object.assign(state, event.data || {}, { status: event.status });
    run.nodes.set(event.node_id, state);
    paintNode(event.node_id, state);
  } else if (event.type === "agent.delta") {
    const text = $("agent-text");
    const data = event.data || {};
    if (run.lastAgent !== event.node_id) {
      text.append(document.createTextNode((text.textContent ? "\n" : "") + "[" + event.node_id + "] "));
      run.lastAgent = event.node_id;
    }
    text.append(document.createTextNode(data.text || ""));
    text.scrollTop = text.scrollHeight;
  }
}

function connect() {
  const run = current;
  if (!run || run.closed) return;
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const socket = new WebSocket(
    scheme + location.host + API + "/ws/executions/" + run.id + "?batch=1",
    ["bearer", store.get("access")],
  );
  run.socket = socket;
  $("live").textContent = "connecting…";
  // From seq 0: the whole story, so a run that ended is replayed from its events and
  // one that goes on shows its agent text from the start. Later: only what we missed.
  socket.addEventListener("open", () => {
    socket.send(JSON.stringify({ resume_from: run.lastSeq }));
    $("live").textContent = "live";
  });
  socket.addEventListener("message", (message) => {
    const data = JSON.parse(message.data);
    for (const event of Array.isArray(data) ? data : [data]) {
      if (event.type !== "ping") onEvent(event);
    }
  });
  socket.addEventListener("close", async (closed) => {
    if (run.closed || current !== run) return;
    const status = $("run").dataset.status;
    if (TERMINAL.includes(status)) {
      $("live").textContent = "ended";
      return;
    }
    if (closed.code === 4401 && (await refresh())) {
      connect();
      return;
    }
    if ([4403, 4404, 4401].includes(closed.code)) {
      $("live").textContent = "stream refused: " + (closed.reason || closed.code);
      return;
    }
    $("live").textContent = "reconnecting…";
    run.retryTimer = setTimeout(connect, 1000);
  });
}

async function openRun(id) {
  closeRun();
  show("run");
  $("run-id").textContent = id;
  $("agent-text").textContent = "";
  $("node-detail").textContent = "";
  $("node-title").textContent = "(click one)";
  $("run-facts").textContent = "";
  $("run-error").textContent = "";
  current = { id, nodes: new Map(), lastSeq: 0, closed: false, lastAgent: null };
  const run = current;
  try {
    const execution = await api("GET", "/executions/" + id);
    const version = await api(
      "GET", "/workflows/" + execution.workflow_id + "/versions/" + execution.version,
    );
    if (current !== run) return;
    setRunStatus(execution.status);
    drawDag(version.definition);
    connect();
  } catch (error) {
    $("run-error").textContent = error.message;
  }
}

async function showNode(nodeId) {
  const run = current;
  if (!run) return;
  for (const g of $("dag").querySelectorAll("g.node")) {
    g.classList.toggle("selected", g.dataset.nodeId === nodeId);
  }
  $("node-title").textContent = nodeId;
  try {
    const rows = await api("GET", "/executions/" + run.id + "/nodes");
    const mine = rows.filter((r) => r.node_id === nodeId);
    $("node-detail").textContent = mine.length
      ? JSON.stringify(mine.map((r) => ({
        iteration: r.iteration, status: r.status, attempt: r.attempt,
        duration: ms(r.duration_ms), input: r.input, output: r.output, error: r.error,
      })), null, 2)
      : "not run (yet)";
  } catch (error) {
    $("node-detail").textContent = error.message;
  }
}

async function cancelRun() {
  if (!current) return;
  try {
    await api("POST", "/executions/" + current.id + "/cancel");
  } catch (error) {
    say(error.message);
  }
}

async function retryRun() {
  if (!current) return;
  try {
    const accepted = await api("POST", "/executions/" + current.id + "/retry");
    location.hash = "#/runs/" + accepted.id;
  } catch (error) {
    say(error.message);
  }
}

// Routing -----------------------------------------------------------------------------------

function route() {
  if (!store.get("access")) {
    signOut();
    return;
  }
  const match = /^#\/runs\/([0-9a-f-]{36})$/.exec(location.hash);
  const done = match ? openRun(match[1]) : home();
  done.catch((error) => say(error.message));
}

document.addEventListener("DOMContentLoaded", () => {
  $("email-form").addEventListener("submit", requestCode);
  $("code-form").addEventListener("submit", verifyCode);
  $("sign-out").addEventListener("click", async () => {
    try { await api("POST", "/auth/logout"); } catch (_) { /* signing out anyway */ }
    signOut("Signed out.");
  });
  $("workspace").addEventListener("change", (event) => {
    store.set("workspace", event.target.value);
    location.hash = "";
    home().catch((error) => say(error.message));
  });
  $("refresh-runs").addEventListener("click", () => listRuns().catch((e) => say(e.message)));
  $("back").addEventListener("click", (event) => { event.preventDefault(); location.hash = ""; });
  $("cancel").addEventListener("click", cancelRun);
  $("retry").addEventListener("click", retryRun);
  window.addEventListener("hashchange", route);
  if (store.get("access")) start().catch((error) => say(error.message));
  else signOut();
});
