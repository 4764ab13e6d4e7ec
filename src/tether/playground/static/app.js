// tether playground: drives /v1/responses from a browser. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = { key: "tether.apiKey", model: "tether.model", recent: "tether.recent",
                live: "tether.live", conversation: "tether.conversation" };
const RECENT_MAX = 20;
const TERMINAL_EVENTS = new Set(["response.completed", "response.incomplete", "response.failed"]);
const TERMINAL = new Set(["completed", "incomplete", "failed", "cancelled"]);
// OpenAI's name for a reasoning delta, and Open Responses' name for the same event.
const REASONING_DELTAS = new Set(["response.reasoning_text.delta", "response.reasoning.delta"]);
const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The response on screen: everything the timeline shows, and what a reload restores.
let view = newView({});
// The connection feeding the view, while one is open: {abort, stopped, owns}. `owns`: the
// body is the POST of a non-background stream, so closing it cancels the response.
let run = null;
let saveTimer = null;

function newView(fields) {
  return { id: null, background: false, stream: true, startedAt: Date.now(), lastSeq: -1,
           entries: [], text: "", deltas: 0, status: "idle", usage: null, elapsed: null,
           terminal: false,
           // The thinking (reasoning items' text and summary), shown apart from the answer.
           reasoning: "", summary: "", reasoningDeltas: 0, reasoningItem: null,
           ...fields };
}

// --- HTTP -----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, { method = "GET", body, signal } = {}) {
  const headers = { Authorization: `Bearer ${$("api-key").value.trim() || "unused"}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, signal,
                                  body: body === undefined ? undefined : JSON.stringify(body) });
  if (!res.ok) {
    let message = `HTTP ${res.status}`;
    try { message = (await res.json()).error.message || message; } catch { /* not JSON */ }
    throw new ApiError(res.status, message);
  }
  return res;
}

const json = async (path, options) => (await api(path, options)).json();

function streamPath(id, after) {
  const from = after >= 0 ? `&starting_after=${after}` : "";
  return `/v1/responses/${encodeURIComponent(id)}?stream=true${from}`;
}

// Server-sent events from a fetch body: EventSource can neither POST nor send headers.
// Resolves true on `data: [DONE]`, false when the body ends without it.
async function readSSE(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) countKeepalive();  // `: keepalive` while the run is idle
        else if (line.startsWith("data:")) data.push(line.slice(line[5] === " " ? 6 : 5));
      }
      if (!data.length) continue;
      if (data.join("\n") === "[DONE]") {
        reader.cancel().catch(() => {});
        return true;
      }
      onEvent(JSON.parse(data.join("\n")));
    }
  }
}

// --- the view ---------------------------------------------------------------------------------

function apply(event) {
  const seq = event.sequence_number;
  if (seq <= view.lastSeq) return;  // a resume overlapping what is shown: each event once
  const gap = seq !== view.lastSeq + 1;
  view.lastSeq = seq;
  const ms = Date.now() - view.startedAt;
  view.entries.push([seq, event.type, ms]);
  view.elapsed = ms;
  addRow(seq, event.type, ms, gap);
  if (event.type === "response.output_text.delta") {
    view.text += event.delta;
    view.deltas += 1;
    $("output").append(event.delta);
  } else if (REASONING_DELTAS.has(event.type)) {
    // A token of thinking: a delta like a text one, streamed into the reasoning panel.
    const part = (view.reasoningItem && view.reasoningItem !== event.item_id ? "\n\n" : "")
      + event.delta;
    view.reasoningItem = event.item_id;
    view.reasoning += part;
    view.deltas += 1;
    view.reasoningDeltas += 1;
    $("reasoning-text").append(part);
  } else if (event.type === "response.reasoning_summary_text.delta") {
    view.summary += event.delta;
    $("reasoning-summary").append(event.delta);
  }
  if (event.type === "error") showError(event.message);
  if (event.response) {
    if (!view.id) adopt(event.response.id);
    view.status = event.response.status;
    view.usage = event.response.usage || view.usage;
  }
  if (TERMINAL_EVENTS.has(event.type)) finish();
  renderStats();
  saveSoon();
}

function adopt(id) {
  view.id = id;
  $("response-id").textContent = id;
  remember(id);
  // Stop pressed before the id was known: the cancel could not be sent until now.
  if (run && run.stopped && !run.owns) cancel(id);
}

function finish() {
  view.terminal = true;
  clearTimeout(saveTimer);
  sessionStorage.removeItem(STORE.live);
  refreshRecent();
  loadConversation();  // the turn's items were added with its terminal event
}

function addRow(seq, type, ms, gap) {
  const box = $("timeline-box");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const row = document.createElement("tr");
  row.dataset.seq = seq;
  row.dataset.type = type;
  row.className = type.replace(/^response\./, "").split(".")[0] + (gap ? " gap" : "");
  for (const text of [seq, type, ms]) row.insertCell().textContent = text;
  $("timeline").append(row);
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function renderView() {
  $("timeline").replaceChildren();
  for (const [seq, type, ms] of view.entries) addRow(seq, type, ms, false);
  $("output").textContent = view.text;
  $("reasoning-text").textContent = view.reasoning;
  $("reasoning-summary").textContent = view.summary;
  $("reasoning").open = false;
  $("response-id").textContent = view.id || "–";
  $("keepalives").textContent = "";
  renderStats();
}

function renderStats() {
  setOutput("status", view.status);
  $("status").dataset.status = view.status;
  setOutput("tokens", view.stream ? view.deltas : "–");
  setOutput("usage-output", view.usage ? view.usage.output_tokens : "–");
  setOutput("usage-input", view.usage ? view.usage.input_tokens : "–");
  setOutput("elapsed", view.elapsed === null ? "–" : `${view.elapsed} ms`);
  renderReasoning();
}

// The reasoning panel's count: the usage's `reasoning_tokens` once a response reports it
// (exact, also after a cancel), the reasoning deltas seen while it streams.
function renderReasoning() {
  const count = view.usage?.output_tokens_details?.reasoning_tokens ?? view.reasoningDeltas;
  const shown = Boolean(view.reasoning || view.summary || count);
  if ($("reasoning").hidden === shown) $("reasoning").hidden = !shown;
  $("reasoning-summary").hidden = !view.summary;
  setOutput("reasoning-tokens", shown ? `· ${count} token${count === 1 ? "" : "s"}` : "");
}

function setOutput(id, value) {
  const text = String(value);
  if ($(id).textContent !== text) $(id).textContent = text;
}

function setConn(state) {
  $("conn").textContent = state;
  $("conn").dataset.conn = state;
}

function countKeepalive() {
  view.keepalives = (view.keepalives || 0) + 1;
  $("keepalives").textContent = `· ${view.keepalives} keepalive${view.keepalives > 1 ? "s" : ""}`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// A non-streamed response (JSON create, or a poll): the same view, without a timeline.
function showResponse(response) {
  if (!view.id) adopt(response.id);
  view.status = response.status;
  view.usage = response.usage;
  view.elapsed = Date.now() - view.startedAt;
  const output = response.output || [];
  const texts = (type, field) => output.filter((item) => item.type === type)
    .map((item) => (item[field] || []).map((part) => part.text || "").join(""));
  view.text = texts("message", "content").join("");
  view.reasoning = texts("reasoning", "content").filter(Boolean).join("\n\n");
  view.summary = texts("reasoning", "summary").filter(Boolean).join("\n\n");
  $("output").textContent = view.text;
  $("reasoning-text").textContent = view.reasoning;
  $("reasoning-summary").textContent = view.summary;
  if (TERMINAL.has(response.status)) view.terminal = true;
  renderStats();
}

// A background stream survives a reload: keep a consistent snapshot (entries, last sequence
// number, text) so the next page resumes right after it, with no gap and no duplicate.
function saveSoon() {
  if (saveTimer === null && resumable()) saveTimer = setTimeout(save, 250);
}

// Only while a stream feeds the view: a resume that failed is not retried by every reload.
function resumable() {
  return Boolean(run && view.background && view.stream && view.id && !view.terminal);
}

function save() {
  clearTimeout(saveTimer);
  saveTimer = null;
  if (resumable()) sessionStorage.setItem(STORE.live, JSON.stringify(view));
}

// --- running ----------------------------------------------------------------------------------

function setRunning(running) {
  $("start").disabled = running;
  $("stop").disabled = !running || run.stopped;
  document.body.dataset.running = running ? "true" : "false";
}

async function drive(task, owns) {
  run = { abort: new AbortController(), stopped: false, owns };
  setRunning(true);
  showError("");
  try {
    await task(run);
  } catch (err) {
    if (err.name === "AbortError" && !view.id) {
      view.status = "aborted";  // a synchronous request left: the server cancelled it
      renderStats();
    } else {
      showError(err.message);
    }
  } finally {
    setConn("closed");
    run = null;
    setRunning(false);
    refreshRecent();
    loadConversation();
  }
}

async function start(event) {
  event.preventDefault();
  if (run) return;
  const model = $("model").value;
  const request = { model, input: $("prompt").value, stream: $("stream").checked,
                    background: $("background").checked };
  const max = parseInt($("max-tokens").value, 10);
  if (max > 0) request.max_output_tokens = max;
  const conversation = $("conversation").value.trim();
  if (conversation) request.conversation = conversation;
  localStorage.setItem(STORE.model, model);
  sessionStorage.removeItem(STORE.live);
  view = newView({ background: request.background, stream: request.stream, status: "starting" });
  renderView();
  await drive(async (current) => {
    setConn(request.stream ? "open" : "waiting");
    const res = await api("/v1/responses", { method: "POST", body: request,
                                             signal: current.abort.signal });
    if (request.stream) return follow(res);
    showResponse(await res.json());
    if (!view.terminal) await poll(view.id);
  }, !request.background);
}

// Read a stream to its terminal event. A body that ends early (Stop aborted a non-background
// stream, which the server then cancels; or the connection broke) is resumed from the log.
async function follow(res) {
  for (let tries = 0; ; tries++) {
    let failure = null;
    let done = false;
    setConn("open");
    try {
      done = await readSSE(res, apply);
    } catch (err) {
      failure = err;
    }
    if (view.terminal || done) return;
    if (!view.id || tries >= 5) throw failure || new Error("The stream ended early.");
    setConn("reconnecting");
    if (!run.stopped) await delay(250 * 2 ** tries);
    run.abort = new AbortController();
    run.owns = false;  // a resumed stream is only a reader: closing it cancels nothing
    res = await api(streamPath(view.id, view.lastSeq), { signal: run.abort.signal });
  }
}

async function poll(id) {
  setConn("polling");
  while (!view.terminal) {
    await delay(500);
    showResponse(await json(`/v1/responses/${encodeURIComponent(id)}`));
  }
}

function stop() {
  if (!run || run.stopped) return;
  run.stopped = true;
  setRunning(true);
  if (run.owns) run.abort.abort();
  else if (view.id) cancel(view.id);
  // else: cancelled as soon as `response.created` names it (adopt)
}

async function cancel(id) {
  try {
    const reply = await json(`/v1/responses/${encodeURIComponent(id)}/cancel`,
                             { method: "POST" });
    if (view.id === id && !view.stream) showResponse(reply);
  } catch (err) {
    showError(`Cancel: ${err.message}`);
  }
  refreshRecent();
}

// Re-stream a response into the view: after what is shown if it is on screen unfinished,
// else from its first event.
async function resume(id) {
  if (run) return;
  if (view.id !== id || !view.stream || view.terminal) {
    const response = await json(`/v1/responses/${encodeURIComponent(id)}`).catch((err) => {
      showError(err.message);
    });
    if (!response) return;
    view = newView({ id, background: response.background, status: response.status });
    renderView();
  }
  await drive(async (current) => {
    const res = await api(streamPath(id, view.lastSeq), { signal: current.abort.signal });
    await follow(res);
  }, false);
}

// --- recent responses ----------------------------------------------------------------------------

const recentIds = () => JSON.parse(localStorage.getItem(STORE.recent) || "[]");

function remember(id) {
  const ids = [id, ...recentIds().filter((known) => known !== id)].slice(0, RECENT_MAX);
  localStorage.setItem(STORE.recent, JSON.stringify(ids));
  refreshRecent();
}

let refreshing = null;
let refreshAgain = false;
let recentTimer = null;

// One refresh at a time; a request during one runs once more after it.
function refreshRecent() {
  if (refreshing) {
    refreshAgain = true;
    return refreshing;
  }
  refreshing = loadRecent().finally(() => {
    refreshing = null;
    if (refreshAgain) {
      refreshAgain = false;
      refreshRecent();
    }
  });
  return refreshing;
}

async function loadRecent() {
  clearTimeout(recentTimer);
  const ids = recentIds();
  const rows = await Promise.all(ids.map(async (id) => {
    try {
      return await json(`/v1/responses/${encodeURIComponent(id)}`);
    } catch (err) {
      return { id, status: err.status === 404 ? "gone" : "error", error: err.message };
    }
  }));
  // Deleted or expired responses leave the list.
  const kept = rows.filter((r) => r.status !== "gone");
  if (kept.length !== rows.length) {
    localStorage.setItem(STORE.recent, JSON.stringify(kept.map((r) => r.id)));
  }
  $("recent").replaceChildren(...kept.map(recentRow));
  if (kept.some((r) => !TERMINAL.has(r.status))) recentTimer = setTimeout(refreshRecent, 1000);
}

function recentRow(response) {
  const row = document.createElement("tr");
  row.dataset.id = response.id;
  const code = document.createElement("code");
  code.textContent = response.id;
  code.title = response.error || response.id;
  const end = response.completed_at || Math.floor(Date.now() / 1000);
  const tokens = span("tokens", response.usage ? response.usage.output_tokens : "–");
  const time = span("time", response.created_at ? `${end - response.created_at} s` : "–");
  const detail = document.createElement("small");
  detail.append(tokens, response.usage?.output_tokens === 1 ? " token · " : " tokens · ", time);
  row.insertCell().append(code, detail);
  const badge = span("badge", response.status);
  badge.dataset.status = response.status;
  row.insertCell().append(badge);
  const actions = row.insertCell();
  actions.className = "actions";
  actions.append(
    button("resume", `Resume ${response.id}`, () => resume(response.id), Boolean(run)),
    button("cancel", `Cancel ${response.id}`, () => cancel(response.id),
           TERMINAL.has(response.status) || response.status === "error"),
  );
  return row;
}

function span(className, text) {
  const s = document.createElement("span");
  s.className = className;
  s.textContent = text;
  return s;
}

function button(kind, label, onClick, disabled) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `small ${kind}`;
  b.dataset.testid = `recent-${kind}`;
  b.textContent = kind;
  b.setAttribute("aria-label", label);
  b.disabled = disabled;
  b.addEventListener("click", onClick);
  return b;
}

// --- the conversation (issue 18) ---------------------------------------------------------------

async function newConversation() {
  try {
    const conversation = await json("/v1/conversations", { method: "POST", body: {} });
    $("conversation").value = conversation.id;
    conversationChanged();
  } catch (err) {
    showError(`Conversation: ${err.message}`);
  }
}

function conversationChanged() {
  localStorage.setItem(STORE.conversation, $("conversation").value.trim());
  showError("");
  loadConversation();
}

// Its items, oldest first (at most the last 100).
async function loadConversation() {
  const id = $("conversation").value.trim();
  $("conversation-panel").hidden = !id;
  if (!id) return;
  try {
    const path = `/v1/conversations/${encodeURIComponent(id)}/items?order=desc&limit=100`;
    const { data, has_more: more } = await json(path);
    data.reverse();
    $("conversation-items").replaceChildren(...data.map(itemRow));
    $("conversation-count").textContent = `· ${data.length}${more ? "+" : ""} item${data.length === 1 ? "" : "s"}`;
  } catch (err) {
    $("conversation-items").replaceChildren();
    $("conversation-count").textContent = `· ${err.message}`;
  }
}

function itemRow(item) {
  const li = document.createElement("li");
  li.dataset.id = item.id;
  li.dataset.status = item.status || "";
  const who = item.type === "message" ? item.role : item.type;
  const text = (item.content || []).map((part) => part.text || "").join("");
  li.append(span("role", who), text);
  if (item.status === "incomplete") li.append(span("incomplete", "(incomplete)"));
  return li;
}

// --- start-up ---------------------------------------------------------------------------------

async function loadModels() {
  try {
    const { data } = await json("/v1/models");
    const saved = localStorage.getItem(STORE.model);
    $("model").replaceChildren(...data.map((m) => new Option(m.id, m.id)));
    if (data.some((m) => m.id === saved)) $("model").value = saved;
  } catch (err) {
    const hint = err.status === 401 ? " Type a key in the API key field." : "";
    showError(`Models: ${err.message}${hint}`);
  }
}

function init() {
  $("api-key").value = localStorage.getItem(STORE.key) || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(STORE.key, $("api-key").value.trim());
    showError("");
    loadModels();
    refreshRecent();
  });
  $("form").addEventListener("submit", start);
  $("stop").addEventListener("click", stop);
  $("recent-refresh").addEventListener("click", refreshRecent);
  $("conversation").value = localStorage.getItem(STORE.conversation) || "";
  $("conversation").addEventListener("change", conversationChanged);
  $("conversation-new").addEventListener("click", newConversation);
  window.addEventListener("pagehide", save);
  loadModels();
  refreshRecent();
  loadConversation();
  const saved = JSON.parse(sessionStorage.getItem(STORE.live) || "null");
  if (saved && saved.id && !saved.terminal) {
    // A reload while a background stream ran: show what we had, continue after it.
    sessionStorage.removeItem(STORE.live);
    view = newView(saved);
    renderView();
    drive(async (current) => {
      const res = await api(streamPath(view.id, view.lastSeq), { signal: current.abort.signal });
      await follow(res);
    }, false);
  } else {
    renderView();
  }
}

init();
