// The morag-pipeline dashboard: plain browser JavaScript, no build step, nothing loaded from elsewhere.
// The API key is kept in this tab's sessionStorage and sent as an Authorization header; never in a URL.
"use strict";

const KEY = "morag.apiKey";
const POLL_MS = 2000;
const CHART_MS = 15000;
const DEAD_MS = 5000;
const ROLES = ["readonly", "client", "admin"];
const SVG = "http://www.w3.org/2000/svg";

const app = { you: null, filters: { state: "", kind: "", worker: "" }, timers: [], deadCount: null };

// ---- DOM helpers: every text goes in as text, never as HTML.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "value") el.value = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) el.setAttribute(name, String(value));
  for (const child of children.flat()) if (child) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return el;
}
const $ = (sel) => document.querySelector(sel);
function fill(el, ...children) { el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined)); }

// ---- Formatting.
function dur(sec) {
  if (sec === null || sec === undefined) return "–";
  if (sec < 1) return `${Math.round(sec * 1000)} ms`;
  if (sec < 90) return `${sec.toFixed(sec < 10 ? 1 : 0)} s`;
  if (sec < 5400) return `${Math.round(sec / 60)} min`;
  return `${(sec / 3600).toFixed(1)} h`;
}
function clock(ts) { return ts ? new Date(ts * 1000).toLocaleTimeString() : "–"; }
function num(v, digits = 1) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits).replace(/\.0+$/, ""); }
function mb(v) { return v === null || v === undefined ? "–" : v >= 1024 ? `${(v / 1024).toFixed(1)} GiB` : `${v} MiB`; }
function can(role) { return app.you && ROLES.indexOf(app.you.role) >= ROLES.indexOf(role); }
function badge(state) { return h("span", { class: `badge ${state}`, "data-state": state }, state); }

// ---- The API, with the key as a header.
class Unauthorized extends Error {}
async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  if (options.json !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET", headers, cache: "no-store", credentials: "omit",
    body: options.json !== undefined ? JSON.stringify(options.json) : undefined,
  });
  if (response.status === 401) throw new Unauthorized("this API key was not accepted");
  const body = options.raw ? await response.blob() : await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(`${response.status}: ${body.detail || response.statusText}`);
  return body;
}

function setStatus(text, ok) {
  const el = $("#status");
  el.textContent = text;
  el.className = `status ${ok ? "ok" : "bad"}`;
}

// ---- Logging in and out.
function showLogin(message) {
  stopTimers();
  sessionStorage.removeItem(KEY);
  $("#login").hidden = false;
  fill($("#view"));
  $("#you").hidden = true;
  $("#logout").hidden = true;
  $("#login-error").textContent = message || "";
  setStatus("not logged in", false);
  $("#key").focus();
}
function showYou(you) {
  app.you = you;
  $("#login").hidden = true;
  $("#you").hidden = !you;
  if (you) $("#you").textContent = `${you.name} (${you.role})`;
  $("#logout").hidden = !sessionStorage.getItem(KEY);
}

// ---- Polling.
function stopTimers() { app.timers.forEach(clearInterval); app.timers = []; }
function every(ms, fn) {
  const run = async () => {
    try { await fn(); } catch (err) {
      if (err instanceof Unauthorized) return showLogin(err.message);
      setStatus(`error: ${err.message}`, false);
    }
  };
  run();
  app.timers.push(setInterval(run, ms));
}
function updated(at) { setStatus(`live · updated ${clock(at)}`, true); }

// ---- Output downloads: fetched with the key, handed to the browser as a file.
async function download(taskId, format, filename) {
  const blob = await api(`/api/v1/tasks/${encodeURIComponent(taskId)}/result?format=${format}`, { raw: true });
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: `${filename.replace(/\.[^.]*$/, "")}.${format}` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
function outputLinks(task) {
  return task.outputs.map((fmt) => h("a", {
    href: "#", class: "output", "data-format": fmt,
    onclick: (e) => { e.preventDefault(); download(task.id, fmt, task.filename).catch((err) => alert(err.message)); },
  }, fmt));
}

// ---- Overview.
function overviewSkeleton() {
  const stateSelect = h("select", { id: "filter-state", onchange: (e) => { app.filters.state = e.target.value; refreshOverview(); } },
    h("option", { value: "" }, "any state"), ...["queued", "running", "done", "failed", "canceled"].map((v) => h("option", { value: v }, v)));
  const kindSelect = h("select", { id: "filter-kind", onchange: (e) => { app.filters.kind = e.target.value; refreshOverview(); } },
    h("option", { value: "" }, "any kind"));
  const workerSelect = h("select", { id: "filter-worker", onchange: (e) => { app.filters.worker = e.target.value; refreshOverview(); } },
    h("option", { value: "" }, "any worker"));
  fill($("#view"),
    h("section", { id: "workers" }, h("h2", {}, "Workers ", h("small", { id: "workers-summary" })),
      h("table", {}, h("thead", {}, h("tr", {}, ...["Name", "Host", "Capability", "Processes", "GPU", "VRAM used / total",
        "State", "Last heartbeat", "Current tasks", "Done / failed", "Speed (audio s/s)"].map((t) => h("th", {}, t)))),
      h("tbody", { id: "workers-body" }))),
    h("section", { id: "queues" }, h("h2", {}, "Queues ", h("small", { id: "queues-source" })),
      h("table", {}, h("thead", {}, h("tr", {}, ...["Queue", "Waiting", "Unacked", "Waiting by priority", "Consumers",
        "Live workers", "Publish /s", "Deliver /s", "Dead letters", "Time to drain"].map((t) => h("th", {}, t)))),
      h("tbody", { id: "queues-body" }))),
    h("section", { id: "dead" }, h("h2", {}, "Dead letters"), h("div", { id: "dead-body" }, "none")),
    h("section", { id: "charts" }, h("h2", {}, "Over time ", h("small", {}, "(one sample per sweep, kept in the store)")),
      h("div", { class: "charts" },
        h("figure", {}, h("figcaption", {}, "Throughput (tasks per minute)"), s("svg", { id: "chart-throughput", viewBox: "0 0 420 160" })),
        h("figure", {}, h("figcaption", {}, "Queue depth (messages waiting)"), s("svg", { id: "chart-depth", viewBox: "0 0 420 160" })),
        h("figure", {}, h("figcaption", {}, "GPU vs CPU share of finished tasks (%)"), s("svg", { id: "chart-share", viewBox: "0 0 420 160" })))),
    h("section", { id: "tasks" }, h("h2", {}, "Tasks ", h("small", { id: "task-counts" })),
      h("div", { class: "filters" }, "Filter: ", stateSelect, kindSelect, workerSelect),
      h("table", {}, h("thead", {}, h("tr", {}, ...["Task", "File", "Kind", "State", "Route and reason", "Reroutes", "Worker",
        "Wait", "Transfer", "Processing", "Outputs"].map((t) => h("th", {}, t)))),
      h("tbody", { id: "tasks-body" }))));
}

function workerRows(workers) {
  return workers.map((w) => h("tr", { "data-worker": w.id, "data-state": w.state },
    h("td", {}, h("a", { href: `/dashboard/workers/${encodeURIComponent(w.id)}` }, w.id)),
    h("td", {}, w.host || "–"),
    h("td", {}, w.capability),
    h("td", { class: "processes" }, `${w.processes}`, w.processes_known > w.processes ? ` (${w.processes_known} on record)` : ""),
    h("td", {}, w.gpu ? w.gpu.name : "none"),
    h("td", {}, w.gpu ? `${mb(w.gpu.vram_used_mb)} / ${mb(w.gpu.vram_total_mb)}` : "–"),
    h("td", { class: "state" }, badge(w.state), w.draining ? " draining" : "", w.reason ? h("div", { class: "reason" }, w.reason) : null),
    h("td", {}, `${dur(w.age_s)} ago`),
    h("td", { class: "current" }, w.current.length ? w.current.map(currentTask) : "idle"),
    h("td", {}, `${w.done} / ${w.failed}`),
    h("td", {}, num(w.audio_s_per_s, 2))));
}
function currentTask(t) {
  const p = t.progress || {};
  return h("div", { class: "current-task" },
    h("a", { href: `/dashboard/tasks/${encodeURIComponent(t.id)}` }, t.filename || t.id.slice(0, 8)), " ",
    h("progress", { max: 100, value: p.percent || 0 }), ` ${p.stage || ""} ${num(p.percent, 0)}%`);
}

function queueRows(queues) {
  return queues.map((q) => h("tr", { "data-queue": q.name },
    h("td", {}, q.name),
    h("td", { class: "depth" }, num(q.messages, 0)),
    h("td", {}, num(q.unacked, 0)),
    h("td", {}, Object.keys(q.waiting_by_priority).length
      ? Object.entries(q.waiting_by_priority).map(([p, n]) => `${p}: ${n}`).join(", ") : "–"),
    h("td", { class: "consumers" }, num(q.consumers, 0)),
    h("td", {}, q.live_processes === null ? "–" : `${q.live_processes} (${q.live_workers} workers)`),
    h("td", {}, num(q.publish_rate, 2)),
    h("td", {}, num(q.deliver_rate, 2)),
    h("td", { class: "dead" }, num(q.dead, 0)),
    h("td", { class: "drain" }, q.drain === "empty" ? "empty" : q.drain_s === null ? "not while nothing consumes it" : dur(q.drain_s),
      q.drain === "empty" ? null : h("div", { class: "reason" }, q.drain))));
}

function routeCell(t) {
  return h("td", { class: "route" }, `${t.queue || "?"}${t.priority ? ` · ${t.priority}` : ""}`,
    h("div", { class: "reason" }, (t.reasons || []).join("; ")));
}
function taskRows(tasks) {
  if (!tasks.length) return [h("tr", {}, h("td", { colspan: 11 }, "no task matches"))];
  return tasks.map((t) => h("tr", { "data-task": t.id, "data-state": t.state },
    h("td", {}, h("a", { href: `/dashboard/tasks/${encodeURIComponent(t.id)}` }, t.id.slice(0, 8))),
    h("td", {}, t.filename),
    h("td", {}, t.kind),
    h("td", { class: "state" }, badge(t.state),
      t.state === "running" && t.progress.percent !== undefined ? ` ${num(t.progress.percent, 0)}%` : "",
      t.error ? h("div", { class: "reason" }, t.error) : null),
    routeCell(t),
    h("td", {}, t.reroutes.length ? t.reroutes.map((m) => h("div", {}, `${m.from} → ${m.to}: ${m.reason}`)) : "–"),
    h("td", {}, t.worker ? h("a", { href: `/dashboard/workers/${encodeURIComponent(t.worker)}` }, t.worker) : "–"),
    h("td", {}, dur(t.wait_s)),
    h("td", {}, dur(t.transfer_s)),
    h("td", {}, dur(t.processing_s)),
    h("td", { class: "outputs" }, t.outputs.length ? outputLinks(t) : "–")));
}

function syncOptions(select, values, current) {
  const have = new Set([...select.options].map((o) => o.value));
  for (const v of values) if (!have.has(v)) select.append(h("option", { value: v }, v));
  select.value = current;
}

async function refreshOverview() {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(app.filters)) if (v) params.set(k, v);
  const data = await api(`/api/v1/dashboard?${params}`);
  showYou(data.you);
  const byState = Object.entries(data.workers_by_state).filter(([, n]) => n).map(([k, n]) => `${n} ${k}`).join(", ");
  $("#workers-summary").textContent = byState ? `(${byState}${data.workers_left_out ? `; ${data.workers_left_out} not listed` : ""})` : "(none yet)";
  fill($("#workers-body"), data.workers.length ? workerRows(data.workers) : [h("tr", {}, h("td", { colspan: 11 }, "no worker has reported yet"))]);
  const q = data.queues;
  $("#queues-source").textContent = q.source ? `(from RabbitMQ's ${q.source === "management" ? "management API" : "AMQP declares, no rates"})` : `(RabbitMQ unreachable: ${q.error})`;
  fill($("#queues-body"), queueRows(q.queues));
  $("#task-counts").textContent = `(${Object.entries(data.counts).map(([k, n]) => `${n} ${k}`).join(", ")})`;
  fill($("#tasks-body"), taskRows(data.tasks));
  syncOptions($("#filter-kind"), data.kinds, app.filters.kind);
  syncOptions($("#filter-worker"), data.workers.map((w) => w.id), app.filters.worker);
  const dead = q.queues.reduce((n, x) => n + (x.dead || 0), 0);
  if (dead !== app.deadCount) { app.deadCount = dead; refreshDead().catch((err) => setStatus(`error: ${err.message}`, false)); }
  updated(data.at);
}

async function refreshDead() {
  const body = $("#dead-body");
  if (!body) return;
  if (!app.deadCount) { fill(body, "none"); return; }
  const data = await api("/api/v1/dead");
  fill(body, h("table", {}, h("thead", {}, h("tr", {}, ...["Queue", "Task", "File", "Reason", "Died", "Retries"].map((t) => h("th", {}, t)))),
    h("tbody", {}, data.letters.map((l) => h("tr", { "data-letter": l.message_id },
      h("td", {}, l.queue),
      h("td", {}, h("a", { href: `/dashboard/dead/${encodeURIComponent(l.message_id)}` }, (l.task_id || l.message_id).slice(0, 8))),
      h("td", {}, l.filename || "–"),
      h("td", { class: "reason" }, l.reason),
      h("td", {}, clock(l.dead_at)),
      h("td", {}, `${l.retries}`))))));
}

// ---- Charts: plain SVG lines, drawn from the store's samples.
function lineChart(svg, series, opts = {}) {
  const W = 420, H = 160, L = 40, R = 8, T = 8, B = 22;
  const all = series.flatMap((x) => x.points);
  svg.replaceChildren();
  if (!all.length) { svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no samples yet")); return; }
  const t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]));
  const vmax = opts.max || Math.max(1, ...all.map((p) => p[1]));
  const x = (t) => L + (t1 === t0 ? (W - L - R) / 2 : ((t - t0) / (t1 - t0)) * (W - L - R));
  const y = (v) => T + (1 - v / vmax) * (H - T - B);
  svg.append(s("line", { x1: L, y1: y(0), x2: W - R, y2: y(0), class: "axis" }), s("line", { x1: L, y1: T, x2: L, y2: y(0), class: "axis" }),
    s("text", { x: L - 4, y: T + 8, "text-anchor": "end", class: "tick" }, num(vmax, 1)), s("text", { x: L - 4, y: y(0), "text-anchor": "end", class: "tick" }, "0"),
    s("text", { x: L, y: H - 6, class: "tick" }, clock(t0)), s("text", { x: W - R, y: H - 6, "text-anchor": "end", class: "tick" }, clock(t1)));
  series.forEach((line, i) => {
    if (!line.points.length) return;
    const d = line.points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
    svg.append(s("polyline", { points: d, class: `line c${i}`, "data-series": line.name }));
    line.points.forEach((p) => svg.append(s("circle", { cx: x(p[0]).toFixed(1), cy: y(p[1]).toFixed(1), r: 2, class: `dot c${i}` })));
    svg.append(s("text", { x: L + 6 + i * 90, y: T + 10, class: `legend c${i}` }, line.name));
  });
}

async function refreshCharts() {
  const data = await api("/api/v1/dashboard/history?hours=6");
  const pts = data.points;
  const q = (p, name) => p.queues[name] || {};
  const perMin = (p, field) => ["gpu", "cpu"].reduce((n, name) => n + (q(p, name)[field] || 0), 0) * 60 / Math.max(1, p.interval_s);
  lineChart($("#chart-throughput"), [
    { name: "done", points: pts.map((p) => [p.ts, perMin(p, "done")]) },
    { name: "failed", points: pts.map((p) => [p.ts, perMin(p, "failed")]) }]);
  lineChart($("#chart-depth"), ["gpu", "cpu"].map((name) => ({
    name, points: pts.filter((p) => q(p, name).messages !== null && q(p, name).messages !== undefined).map((p) => [p.ts, q(p, name).messages]) })));
  const shares = pts.map((p) => {
    const g = q(p, "gpu").done || 0, c = q(p, "cpu").done || 0;
    return g + c ? [p.ts, (100 * g) / (g + c), (100 * c) / (g + c)] : null;
  }).filter(Boolean);
  lineChart($("#chart-share"), [
    { name: "gpu", points: shares.map((p) => [p[0], p[1]]) },
    { name: "cpu", points: shares.map((p) => [p[0], p[2]]) }], { max: 100 });
  $("#charts").dataset.points = String(pts.length);
}

// ---- Task page.
async function refreshTask(id) {
  const t = await api(`/api/v1/dashboard/tasks/${encodeURIComponent(id)}`);
  showYou(app.you);
  const row = t.row;
  const live = t.state === "queued" || t.state === "running";
  fill($("#view"), h("section", { id: "task", "data-state": t.state },
    h("h1", {}, `Task ${t.id}`),
    h("dl", {},
      h("dt", {}, "File"), h("dd", {}, t.filename),
      h("dt", {}, "Kind"), h("dd", {}, t.kind),
      h("dt", {}, "State"), h("dd", { class: "state" }, badge(t.state), t.error ? ` — ${t.error}` : ""),
      h("dt", {}, "Progress"), h("dd", {}, t.progress.stage ? `${t.progress.stage} ${num(t.progress.percent, 0)}%` : "–"),
      h("dt", {}, "Route"), h("dd", { class: "route" }, `${row.queue} · ${row.priority || "?"}`, h("ul", {}, row.reasons.map((r) => h("li", {}, r)))),
      h("dt", {}, "Reroutes"), h("dd", {}, row.reroutes.length ? h("ul", {}, row.reroutes.map((m) => h("li", {}, `${clock(m.at)} ${m.from} → ${m.to} by ${m.by}: ${m.reason}`))) : "none"),
      h("dt", {}, "Worker"), h("dd", {}, t.worker ? h("a", { href: `/dashboard/workers/${encodeURIComponent(t.worker)}` }, t.worker) : "–"),
      h("dt", {}, "Attempts"), h("dd", {}, `${t.attempts} (messages published: ${t.deliveries})`),
      h("dt", {}, "Wait"), h("dd", {}, dur(row.wait_s)),
      h("dt", {}, "Transfer"), h("dd", {}, dur(row.transfer_s)),
      h("dt", {}, "Processing"), h("dd", {}, dur(row.processing_s)),
      h("dt", {}, "Outputs"), h("dd", { class: "outputs" }, row.outputs.length ? outputLinks(row) : "none")),
    live && can("client") ? h("button", { id: "cancel", type: "button", onclick: () => act(`/api/v1/tasks/${encodeURIComponent(t.id)}/cancel`, { reason: "canceled from the dashboard" }, "Cancel this task?") }, "Cancel task") : null,
    h("p", { id: "action-result", role: "status" }, app.lastAction || ""),
    h("h2", {}, "Events"),
    h("table", {}, h("tbody", {}, t.events.map((e) => h("tr", {}, h("td", {}, clock(e.ts)), h("td", {}, e.event),
      h("td", { class: "detail" }, Object.keys(e.detail).length ? JSON.stringify(e.detail) : "")))))));
  updated(Date.now() / 1000);
}

// ---- Worker page.
async function refreshWorker(id) {
  const w = await api(`/api/v1/dashboard/workers/${encodeURIComponent(id)}`);
  showYou(app.you);
  fill($("#view"), h("section", { id: "worker", "data-state": w.state },
    h("h1", {}, `Worker ${w.id}`),
    h("dl", {},
      h("dt", {}, "Host"), h("dd", {}, w.host || "–"),
      h("dt", {}, "Capability"), h("dd", {}, `${w.capability} (queues ${w.queues.join(", ")})`),
      h("dt", {}, "State"), h("dd", { class: "state" }, badge(w.state), w.reason ? ` — ${w.reason}` : ""),
      h("dt", {}, "Last heartbeat"), h("dd", {}, `${dur(w.age_s)} ago (${clock(w.last_seen)})`),
      h("dt", {}, "GPU"), h("dd", {}, w.gpu ? `${w.gpu.name}: ${mb(w.gpu.vram_used_mb)} / ${mb(w.gpu.vram_total_mb)} VRAM used` : "none"),
      h("dt", {}, "Models"), h("dd", {}, w.models.join(", ") || "none loaded"),
      h("dt", {}, "Done / failed / skipped"), h("dd", {}, `${w.done} / ${w.failed} / ${w.skipped}`),
      h("dt", {}, "Speed"), h("dd", {}, `${num(w.audio_s_per_s, 2)} audio s per s; ${dur(w.task_s)} per task`),
      h("dt", {}, "Current tasks"), h("dd", { class: "current" }, w.current.length ? w.current.map(currentTask) : "idle"),
      h("dt", {}, "Version"), h("dd", {}, w.version || "–")),
    h("h2", {}, "Processes"),
    h("table", {}, h("thead", {}, h("tr", {}, ...["Session", "PID", "Host", "State", "Last heartbeat", "Threads", "Done / failed"].map((t) => h("th", {}, t)))),
      h("tbody", {}, w.processes_detail.map((p) => h("tr", {}, h("td", {}, p.session.slice(0, 8)), h("td", {}, p.pid ?? "–"), h("td", {}, p.host),
        h("td", {}, badge(p.state)), h("td", {}, `${dur(p.age_s)} ago`), h("td", {}, `${p.threads}`), h("td", {}, `${p.done} / ${p.failed}`))))),
    h("h2", {}, "Latest tasks"),
    h("table", {}, h("tbody", {}, taskRows(w.tasks))),
    h("h2", {}, "History"),
    h("table", {}, h("tbody", {}, w.history.map((e) => h("tr", {}, h("td", {}, clock(e.ts)), h("td", {}, e.event),
      h("td", { class: "detail" }, JSON.stringify(e.detail || {}))))))));
  updated(Date.now() / 1000);
}

// ---- Dead letter page.
async function refreshDeadLetter(id) {
  let letters;
  try {
    letters = (await api(`/api/v1/dead/${encodeURIComponent(id)}`)).letters;
  } catch (err) {
    if (String(err.message).startsWith("404")) letters = [];
    else throw err;
  }
  fill($("#view"), h("section", { id: "deadletter", "data-count": letters.length },
    h("h1", {}, `Dead letter ${id}`),
    letters.length ? null : h("p", { class: "gone" }, "No dead letter with this id now: it was retried or purged."),
    h("p", { id: "action-result", role: "status" }, app.lastAction || ""),
    letters.map((l) => h("article", {},
      h("dl", {},
        h("dt", {}, "Queue"), h("dd", {}, l.queue),
        h("dt", {}, "Task"), h("dd", {}, l.task_id ? h("a", { href: `/dashboard/tasks/${encodeURIComponent(l.task_id)}` }, l.task_id) : "–"),
        h("dt", {}, "File"), h("dd", {}, l.filename || "–"),
        h("dt", {}, "Actor"), h("dd", {}, l.actor),
        h("dt", {}, "Reason"), h("dd", { class: "reason" }, l.reason),
        h("dt", {}, "Died"), h("dd", {}, clock(l.dead_at)),
        h("dt", {}, "Worker"), h("dd", {}, l.worker || "–"),
        h("dt", {}, "Retries / deliveries"), h("dd", {}, `${l.retries} / ${l.deliveries}`)),
      can("admin") ? h("div", { class: "actions" },
        h("button", { id: "retry", type: "button", onclick: () => act("/api/v1/dead/retry", { queue: l.queue, ids: [l.message_id] }, "Send this message back to its queue?") }, "Retry"),
        h("button", { id: "purge", type: "button", class: "danger", onclick: () => act("/api/v1/dead/purge", { queue: l.queue, ids: [l.message_id] }, "Drop this message for good?") }, "Purge"))
        : h("p", { class: "note" }, "Retrying and purging need the admin role."),
      l.traceback ? h("details", {}, h("summary", {}, "Traceback"), h("pre", {}, l.traceback)) : null,
      h("details", {}, h("summary", {}, "Message (secrets redacted)"), h("pre", {}, JSON.stringify(l.body, null, 2)))))));
  updated(Date.now() / 1000);
}

// ---- Admin actions: the API's own endpoints, which check the role and audit who acted.
async function act(path, payload, question) {
  if (!window.confirm(question)) return;
  try {
    const result = await api(path, { method: "POST", json: payload });
    if (result.retried) app.lastAction = `retried ${result.retried.length}, skipped ${result.skipped.length}${result.skipped.map((x) => `: ${x.why}`).join("")}`;
    else if (result.purged !== undefined) app.lastAction = `purged ${result.purged}`;
    else if (result.state) app.lastAction = `task is ${result.state}`;
    else app.lastAction = "done";
  } catch (err) {
    if (err instanceof Unauthorized) return showLogin(err.message);
    app.lastAction = `refused: ${err.message}`;
  }
  const el = $("#action-result");
  if (el) el.textContent = app.lastAction;
  route().refresh();
}

// ---- Which page.
function route() {
  const parts = location.pathname.replace(/\/+$/, "").split("/").slice(2).map(decodeURIComponent);
  if (parts[0] === "tasks" && parts[1]) return { refresh: () => refreshTask(parts[1]), start: null };
  if (parts[0] === "workers" && parts[1]) return { refresh: () => refreshWorker(parts[1]), start: null };
  if (parts[0] === "dead" && parts[1]) return { refresh: () => refreshDeadLetter(parts[1]), start: null };
  return { refresh: refreshOverview, start: overviewSkeleton, extra: [[CHART_MS, refreshCharts], [DEAD_MS, refreshDead]] };
}

async function start() {
  stopTimers();
  const page = route();
  // Who is looking (and whether a key is needed at all: a server in development mode lets anyone in).
  try {
    const data = await api("/api/v1/dashboard?limit=1");
    showYou(data.you);
  } catch (err) {
    return showLogin(err instanceof Unauthorized ? (sessionStorage.getItem(KEY) ? err.message : "") : err.message);
  }
  if (page.start) page.start();
  every(POLL_MS, page.refresh);
  for (const [ms, fn] of page.extra || []) every(ms, fn);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("#key").value.trim());
    $("#key").value = "";
    start();
  });
  $("#logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); showLogin("logged out"); });
  start();
});
