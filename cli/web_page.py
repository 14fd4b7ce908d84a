"""The dashboard page `llmplan ui` serves at `/`: one self-contained HTML file (no external assets: the machine
may reach nothing) whose script calls the JSON API in web_api.py and nothing else."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>llmplan</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d232a; background: #f6f7f9; }
  header { background: #1d232a; color: #fff; padding: 10px 20px; font-weight: 600; }
  main { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 16px; padding: 16px 20px; }
  section { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 12px 16px; min-width: 0;
            overflow-x: auto; }
  h2 { font-size: 15px; margin: 0 0 8px; }
  label { display: inline-block; margin: 0 10px 6px 0; }
  input, select { font: inherit; padding: 2px 4px; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: 3px 6px; border-bottom: 1px solid #eef0f2; white-space: nowrap; }
  .bar { display: flex; height: 12px; width: 220px; background: #eef0f2; border-radius: 3px; overflow: hidden; }
  .bar span { display: block; height: 100%; }
  .error { color: #b3261e; white-space: normal; overflow-wrap: anywhere; }
  .legend { display: flex; flex-wrap: wrap; gap: 4px 12px; font-size: 12px; margin: 6px 0; }
  .legend i { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px; }
  .muted { color: #6b7580; }
  pre { background: #1d232a; color: #e6e6e6; padding: 8px; max-height: 240px; overflow: auto; font-size: 12px; }
  #plan, #job, #submit { grid-column: 1 / span 2; }
  tr.job { cursor: pointer; }
  #submit-form label { display: inline-flex; flex-direction: column; vertical-align: top; }
  td.wrap { white-space: normal; overflow-wrap: anywhere; }
  #data-preview { flex-basis: 100%; max-width: 100%; font-size: 12px; }
  #data-preview td.wrap { max-width: 40em; vertical-align: top; }
  #chat-log { max-height: 220px; overflow-y: auto; margin: 6px 0; white-space: pre-wrap; overflow-wrap: anywhere; }
  #chat-log div { margin: 2px 0; }
  .chat-assistant { color: #1d4f7a; }
  .field-error { color: #b3261e; font-size: 12px; max-width: 28em; white-space: normal; }
</style>
</head>
<body>
<header>llmplan &mdash; what fits, what runs, what it measured</header>
<main>
<section id="plan">
  <h2>Plan</h2>
  <form id="plan-form">
    <label>model <input name="model" list="models" value="7B" required></label>
    <datalist id="models"></datalist>
    <label>task <select name="task"><option>finetune</option><option>infer</option></select></label>
    <label>method <select name="method"><option>auto</option><option>lora</option><option>qlora</option><option>full</option></select></label>
    <label>GPUs <input name="gpus" type="number" min="1" value="1" style="width:4em"></label>
    <label>card <input name="gpu" placeholder="A100-80GB" style="width:9em"></label>
    <label>or memory <input name="gpu_mem" placeholder="24GiB" style="width:6em"></label>
    <label>seq len <input name="seq_len" type="number" value="512" style="width:6em"></label>
    <label>batch <input name="batch_size" type="number" value="16" style="width:5em"></label>
    <button type="submit">Plan</button>
  </form>
  <p id="plan-error" class="error"></p>
  <div id="plan-result"></div>
</section>
<section id="gpus"><h2>GPUs</h2><div id="gpu-list" class="muted">reading NVML&hellip;</div></section>
<section id="chat">
  <h2>Chat</h2>
  <form id="chat-form">
    <label>model <input name="model" list="models" value="smollm2-135m-instruct" style="width:14em"></label>
    <label>or the adapter of job <input name="job" type="number" min="1" style="width:5em" placeholder="none"></label>
    <label>reply tokens <input name="max_new_tokens" type="number" min="1" max="2048" value="128" style="width:5em"></label>
    <button type="button" id="chat-reset">New conversation</button>
    <div id="chat-log"></div>
    <textarea name="message" rows="2" cols="48" placeholder="a message"></textarea> <button type="submit">Send</button>
  </form>
  <p id="chat-error" class="error"></p>
</section>
<section id="submit" hidden>
  <h2 id="submit-title">Submit</h2>
  <form id="submit-form"><div id="submit-fields"></div>
    <button type="submit">Submit job</button> <button type="button" id="submit-close">Close</button></form>
  <p id="submit-error" class="error"></p>
</section>
<section id="jobs" style="grid-column: 1 / span 2">
  <h2>Jobs</h2>
  <label>status <select id="job-status"><option value="">any</option><option>queued</option><option>running</option>
    <option>succeeded</option><option>failed</option><option>cancelled</option></select></label>
  <label>model <input id="job-model" style="width:10em"></label>
  <table><thead><tr><th>id</th><th>name</th><th>status</th><th>model</th><th>created</th><th>error</th></tr></thead>
  <tbody id="job-rows"></tbody></table>
</section>
<section id="job" hidden></section>
</main>
<script>
const GIB = 2 ** 30;
const colors = ["#3b6ea8", "#e08a2c", "#5a9e4b", "#a8443b", "#7c5aa8", "#2ca3a3", "#a8a23b", "#888"];
const esc = (text) => String(text ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const gib = (bytes) => bytes == null ? "" : (bytes / GIB).toFixed(1) + " GiB";
// A stored time (ISO, UTC, microseconds) as the reader's local time to the second: 2026-12-03 11:25:42.
const when = (iso) => {
  if (!iso) return "";
  const text = String(iso).replace(" ", "T").replace(/(\.\d{3})\d+/, "$1");
  const time = new Date(/[zZ]$|[+-]\d\d:?\d\d$/.test(text) ? text : text + "Z");
  if (isNaN(time)) return String(iso);
  const two = (n) => String(n).padStart(2, "0");
  return `${time.getFullYear()}-${two(time.getMonth() + 1)}-${two(time.getDate())} ` +
         `${two(time.getHours())}:${two(time.getMinutes())}:${two(time.getSeconds())}`;
};
// A record's key as words: peak_memory_per_gpu_bytes -> "peak memory per GPU" (the value carries its unit),
// tokens_per_s -> "tokens per second".
const label = (key) => key.replace(/_per_s$/, "_per_second").replace(/_bytes$/, "").replace(/_s$/, "_(s)")
  .replaceAll("_", " ").replace(/\bgpu\b/g, "GPU");
// One colour per memory term, whichever candidate shows it (the legend names them).
const termColors = new Map();
const termColor = (name) => {
  if (!termColors.has(name)) termColors.set(name, colors[termColors.size % colors.length]);
  return termColors.get(name);
};
let choices = {};  // the submit commands' menus: {task: {key: [values]}}

async function api(path, body) {
  const init = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (token) init.headers = {...(init.headers || {}), Authorization: "Bearer " + token};
  const response = await fetch(path, init);
  const data = await response.json();
  if (!response.ok) throw Object.assign(new Error(data.error || response.statusText), {field: data.field});
  return data;
}

function memoryBar(candidate, capacity) {
  const parts = (candidate.breakdown || []).filter((term) => term.bytes > 0);
  const spans = parts.map((term) => `<span title="${esc(term.name)}: ${gib(term.bytes)} (${esc(term.note)})"
    data-term="${esc(term.name)}" style="width:${100 * term.bytes / capacity}%;background:${termColor(term.name)}"></span>`);
  return `<div class="bar" title="${gib(candidate.memory_bytes)} of ${gib(capacity)}">${spans.join("")}</div>`;
}

function memoryLegend(candidates) {
  const names = [...new Set(candidates.flatMap((c) => (c.breakdown || []).filter((t) => t.bytes > 0).map((t) => t.name)))];
  return `<div id="memory-legend" class="legend">${names.map((name) =>
    `<span data-term="${esc(name)}"><i style="background:${termColor(name)}"></i>${esc(name)}</span>`).join("")}</div>`;
}

async function plan(event) {
  event.preventDefault();
  const form = Object.fromEntries(new FormData(event.target).entries());
  for (const key of ["gpus", "seq_len", "batch_size"]) if (form[key]) form[key] = Number(form[key]);
  document.getElementById("plan-error").textContent = "";
  try {
    const report = await api("/api/plan", form);
    const capacity = report.hardware.memory_bytes;
    planned = report.candidates;
    const rows = report.candidates.map((c, i) => `<tr><td>${i + 1}</td><td>${esc(c.method)}</td><td>${esc(c.quant)}</td>
      <td>${esc(c.precision)}</td><td>${esc(c.parallelism.label || c.parallelism.backend)}</td><td>${c.micro_batch} x ${c.grad_accum}</td>
      <td>${gib(c.memory_bytes)}</td><td>${memoryBar(c, capacity)}</td><td>${c.tokens_per_s ? Math.round(c.tokens_per_s) : ""}</td>
      <td>${c.time_s ? (c.time_s / 3600).toFixed(1) + " h" : ""}</td>
      <td><button type="button" class="submit-candidate" data-index="${i}">Submit</button></td></tr>`);
    document.getElementById("plan-result").innerHTML = `<p>${esc(report.model.name)} on ${report.hardware.count} x
      ${esc(report.hardware.gpu)} (${gib(capacity)} each); a plan may use ${gib(report.budget_bytes)}</p>` +
      (report.feasible ? `<table id="candidates"><thead><tr><th>#</th><th>method</th><th>quant</th><th>precision</th>
      <th>parallelism</th><th>micro x accum</th><th>memory/GPU</th><th>vs capacity</th><th>tokens/s</th><th>time</th><th></th></tr></thead>
      <tbody>${rows.join("")}</tbody></table>${memoryLegend(report.candidates)}
      <p class="muted">${esc(report.recommendation.command)}</p>`
      : `<p class="error">nothing fits: ${esc((report.suggestions || []).map((s) => s.text).join("; "))}</p>`);
  } catch (error) {
    document.getElementById("plan-error").textContent = error.message;
  }
}

// The submit form: a candidate's job spec (the keys `llmplan submit SPEC.yaml` reads), plus what a run needs.
let planned = [];
const RUN_FIELDS = {finetune: ["data", "max-steps", "epochs", "lr", "output", "priority"],
                    infer: ["prompt", "input", "output", "priority"]};
const FIELD_HINTS = {data: "JSONL on the server", output: "folder on the server [default: the job's folder]",
                     prompt: "one prompt a line", input: "prompts JSONL on the server"};

function specField(key, value, menu) {
  const error = `<span class="field-error" data-field="${esc(key)}"></span>`;
  let input;
  if (menu) {
    const values = value === "" || menu.includes(String(value)) ? menu : [String(value), ...menu];
    const options = ["", ...values].map((option) => `<option value="${esc(option)}" ${option === String(value) ? "selected" : ""}>
      ${option ? esc(option) : "default"}</option>`);
    input = `<select name="${esc(key)}">${options.join("")}</select>`;
  } else if (typeof value === "boolean") {
    input = `<select name="${esc(key)}" data-kind="boolean"><option value="">planner's choice</option>
      <option value="true" ${value ? "selected" : ""}>yes</option><option value="false" ${value ? "" : "selected"}>no</option></select>`;
  } else if (key === "prompt") {
    input = `<textarea name="prompt" rows="3" cols="40" data-kind="lines"></textarea>`;
  } else {
    input = `<input name="${esc(key)}" value="${esc(value)}" placeholder="${esc(FIELD_HINTS[key] || "")}">`;
  }
  if (key === "data") {  // the data set's preview sits next to its field
    return `<label>${esc(key)} ${input}${error}<button type="button" id="data-preview-button">Preview</button></label>
      <div id="data-preview"></div>`;
  }
  return `<label>${esc(key)} ${input}${error}</label>`;
}

function openSubmit(candidate) {
  const spec = candidate.job, task = spec.task;
  const keys = [...Object.keys(spec).filter((k) => k !== "task"), ...RUN_FIELDS[task].filter((k) => !(k in spec))];
  const menus = choices[task] || {};
  document.getElementById("submit-fields").innerHTML = keys.map((k) => specField(k, spec[k] ?? "", menus[k])).join("");
  const form = document.getElementById("submit-form");
  form.dataset.task = task;
  document.getElementById("submit-title").textContent = `Submit: ${task} ${spec.model}`;
  document.getElementById("submit-error").textContent = "";
  const section = document.getElementById("submit");
  section.hidden = false;
  section.scrollIntoView();
}

// The data set as the job will read it: format, record count, token lengths and the first rows.
async function previewData() {
  const form = document.getElementById("submit-form"), box = document.getElementById("data-preview");
  const path = form.elements["data"].value.trim(), model = (form.elements["model"]?.value || "").trim();
  if (!path) { box.innerHTML = ""; return; }
  box.innerHTML = `<span class="muted">reading ${esc(path)}&hellip;</span>`;
  try {
    const p = await api("/api/data/preview", {path, ...(/[\/.~]/.test(model[0] || "") && {model})});
    const rows = p.rows.map((messages, i) => `<tr><td>${i + 1}</td>${messages.map((m) =>
      `<td class="wrap"><b>${esc(m.role)}</b>: ${esc(m.content)}</td>`).join("")}</tr>`).join("");
    box.innerHTML = `<p id="data-summary">${esc(p.format)} format, ${p.records} records; tokens per record
      min ${p.tokens.min}, median ${p.tokens.median}, max ${p.tokens.max} <span class="muted">(${esc(p.tokens.counted_by)})</span></p>
      <table id="data-rows">${rows}</table>`;
  } catch (error) {
    box.innerHTML = `<p class="error" id="data-preview-error">${esc(error.message)}</p>`;
  }
}

function submittedSpec(form) {
  const spec = {task: form.dataset.task};
  for (const element of form.querySelectorAll("[name]")) {
    const value = element.value.trim();
    if (!value) continue;
    if (element.dataset.kind === "boolean") spec[element.name] = value === "true";
    else if (element.dataset.kind === "lines") spec[element.name] = value.split("\n").map((l) => l.trim()).filter(Boolean);
    else spec[element.name] = value;
  }
  return spec;
}

async function submitJob(event) {
  event.preventDefault();
  const form = event.target;
  for (const span of form.querySelectorAll(".field-error")) span.textContent = "";
  document.getElementById("submit-error").textContent = "";
  try {
    const queued = await api("/api/jobs", submittedSpec(form));
    document.getElementById("submit").hidden = true;
    loadJobs();
    showJob(queued.id);
  } catch (error) {
    const next = error.field && form.querySelector(`.field-error[data-field="${CSS.escape(error.field)}"]`);
    (next || document.getElementById("submit-error")).textContent = error.message;
  }
}

async function loadGpus() {
  try {
    const probe = await api("/api/gpus");
    document.getElementById("gpu-list").innerHTML = probe.gpus.length ? probe.gpus.map((g) =>
      `<div>GPU ${g.index} ${esc(g.name)}: ${gib(g.memory_used_bytes)} used of ${gib(g.memory_total_bytes)}</div>`).join("")
      : esc(probe.reason || "no GPU found");
  } catch (error) {
    document.getElementById("gpu-list").textContent = error.message;
  }
}

async function loadJobs() {
  const status = document.getElementById("job-status").value, model = document.getElementById("job-model").value;
  const query = new URLSearchParams({...(status && {status}), ...(model && {model})});
  const jobs = await api("/api/jobs?" + query);
  document.getElementById("job-rows").innerHTML = jobs.map((j) => `<tr class="job" data-id="${j.id}"><td>${j.id}</td>
    <td>${esc(j.name)}</td><td class="status">${esc(j.status)}</td><td>${esc(j.model)}</td><td class="time">${esc(when(j.created_at))}</td>
    <td class="error">${esc(j.error_message)}</td></tr>`).join("");
}

function lossCurve(metrics) {
  const points = metrics.filter((m) => m.loss != null);
  if (points.length < 2) return "";
  const steps = points.map((m) => m.step), losses = points.map((m) => m.loss);
  const [x0, x1, y0, y1] = [Math.min(...steps), Math.max(...steps), Math.min(...losses), Math.max(...losses)];
  const x = (step) => (50 + 360 * (step - x0) / ((x1 - x0) || 1)).toFixed(1);
  const y = (loss) => (10 + 100 * (y1 - loss) / ((y1 - y0) || 1)).toFixed(1);
  const path = points.map((m, i) => `${i ? "L" : "M"}${x(m.step)},${y(m.loss)}`).join(" ");
  const [first, last] = [points[0], points[points.length - 1]];
  return `<h3>loss</h3><svg id="loss-curve" width="420" height="130" viewBox="0 0 420 130" font-size="10" fill="#6b7580">
    <line x1="46" y1="10" x2="46" y2="112" stroke="#c9ced3"/><line x1="46" y1="112" x2="412" y2="112" stroke="#c9ced3"/>
    <text x="42" y="14" text-anchor="end">${y1.toFixed(2)}</text><text x="42" y="112" text-anchor="end">${y0.toFixed(2)}</text>
    <text x="50" y="125">step ${x0}</text><text x="410" y="125" text-anchor="end">step ${x1}</text>
    <path d="${path}" fill="none" stroke="#3b6ea8" stroke-width="2"/></svg>
    <div class="muted" id="loss-summary">step ${first.step}: ${first.loss.toFixed(3)} &rarr; step ${last.step}: ${last.loss.toFixed(3)}</div>`;
}

const shown = (key, value) => value == null ? "" : key.endsWith("bytes") ? gib(value) : Math.round(value);

const ENDED = new Set(["succeeded", "failed", "cancelled"]);
const CANCELLABLE = new Set(["queued", "scheduled", "running"]);
let followed = null;
async function showJob(id) {
  followed = id;
  const section = document.getElementById("job");
  section.hidden = false;
  section.innerHTML = `<h2>Job ${id}: <span id="job-name"></span> &mdash; <span id="job-status-text"></span>
    <button id="cancel" hidden>Cancel</button></h2>
    <div id="merge-box" hidden>merge the adapter into its base model at <input id="merge-output" placeholder="new folder on the server">
      <button type="button" id="merge">Merge</button> <span id="merge-result"></span>
      <button type="button" id="chat-with-job">Chat with this adapter</button></div><div id="job-detail"></div><h3>log</h3><pre id="log"></pre>`;
  document.getElementById("cancel").onclick = async () => { await api(`/api/jobs/${id}/cancel`, {}); refreshJob(id); loadJobs(); };
  document.getElementById("merge").onclick = () => mergeAdapter(id);
  document.getElementById("chat-with-job").onclick = () => chatWithJob(id);
  section.scrollIntoView();
  await refreshJob(id);
  followLog(id, 0);
}

// The job's record until it ends: its status, planned vs measured, loss curve and events.
async function refreshJob(id) {
  if (followed !== id) return;
  const detail = await api(`/api/jobs/${id}`);
  if (followed !== id) return;
  const job = detail.job, cmp = detail.planned_vs_measured || {};
  const rows = Object.entries(cmp).filter(([, v]) => v && typeof v === "object" && "planned" in v).map(([k, v]) =>
    `<tr><td class="label">${esc(label(k))}</td><td>${esc(shown(k, v.planned))}</td><td>${esc(shown(k, v.measured))}</td></tr>`).join("");
  document.getElementById("job-name").textContent = job.name;
  document.getElementById("job-status-text").textContent = job.status;
  document.getElementById("cancel").hidden = !CANCELLABLE.has(job.status);
  document.getElementById("merge-box").hidden = !(job.kind === "finetune" && job.status === "succeeded" && job.adapter_path);
  document.getElementById("job-detail").innerHTML = `
    ${job.error_message ? `<p class="error">${esc(job.error_class)}: ${esc(job.error_message)}</p>` : ""}
    ${rows ? `<table><tr><th></th><th>planned</th><th>measured</th></tr>${rows}</table>` : ""}
    ${lossCurve(detail.metrics)}
    <h3>events</h3><table>${detail.events.map((e) => `<tr><td class="time">${esc(when(e.at))}</td><td>${esc(e.from_status)}</td>
      <td>${esc(e.to_status)}</td><td class="wrap">${esc(e.message)}</td></tr>`).join("")}</table>`;
  if (ENDED.has(job.status)) loadJobs();
  else setTimeout(() => refreshJob(id), 2000);
}

// A finished LoRA job's adapter folded into its base model (`llmplan merge`), at a new folder on the server.
async function mergeAdapter(id) {
  const result = document.getElementById("merge-result"), button = document.getElementById("merge");
  result.className = "muted";
  result.textContent = "merging…";
  button.disabled = true;
  try {
    const merged = await api(`/api/jobs/${id}/merge`, {output: document.getElementById("merge-output").value.trim()});
    result.textContent = `merged into ${merged.output}`;
  } catch (error) {
    result.className = "error";
    result.textContent = error.message;
  } finally {
    button.disabled = false;
  }
}

// The chat panel: the conversation so far goes with each message (POST /api/chat runs one turn, as `llmplan chat`).
let chatHistory = [];
function chatLine(role, text) {
  const line = document.createElement("div");
  line.className = `chat-${role}`;
  line.innerHTML = `<b>${role === "user" ? "you" : "model"}:</b> <span class="text"></span>`;
  line.querySelector(".text").textContent = text;
  document.getElementById("chat-log").append(line);
  return line;
}

function resetChat() {
  chatHistory = [];
  document.getElementById("chat-log").innerHTML = "";
  document.getElementById("chat-error").textContent = "";
}

function chatWithJob(id) {
  const form = document.getElementById("chat-form");
  form.elements["job"].value = id;
  resetChat();
  document.getElementById("chat").scrollIntoView();
  form.elements["message"].focus();
}

async function sendChat(event) {
  event.preventDefault();
  const form = event.target, text = form.elements["message"].value.trim();
  if (!text) return;
  const job = form.elements["job"].value.trim(), model = form.elements["model"].value.trim();
  const messages = [...chatHistory, {role: "user", content: text}];
  document.getElementById("chat-error").textContent = "";
  chatLine("user", text);
  const waiting = chatLine("assistant", "…");
  form.elements["message"].value = "";
  try {
    const max_new_tokens = Number(form.elements["max_new_tokens"].value) || 128;
    const turn = await api("/api/chat", {...(job ? {job: Number(job)} : {model}), messages, max_new_tokens});
    waiting.querySelector(".text").textContent = turn.reply || "(an empty answer: the model stopped at once)";
    waiting.dataset.job = turn.job;
    chatHistory = [...messages, {role: "assistant", content: turn.reply}];
    loadJobs();
  } catch (error) {
    waiting.remove();
    document.getElementById("chat-log").lastElementChild?.remove();
    form.elements["message"].value = text;
    document.getElementById("chat-error").textContent = error.message;
  }
}

async function followLog(id, offset) {
  if (followed !== id) return;
  const chunk = await api(`/api/jobs/${id}/log?offset=${offset}`);
  const log = document.getElementById("log");
  if (log) { log.textContent += chunk.text; log.scrollTop = log.scrollHeight; }
  if (!chunk.ended) setTimeout(() => followLog(id, chunk.offset), 1000);
}

document.getElementById("plan-form").addEventListener("submit", plan);
document.getElementById("plan-result").addEventListener("click", (e) => {
  const button = e.target.closest("button.submit-candidate"); if (button) openSubmit(planned[Number(button.dataset.index)]);
});
document.getElementById("submit-form").addEventListener("submit", submitJob);
document.getElementById("chat-form").addEventListener("submit", sendChat);
document.getElementById("chat-reset").addEventListener("click", resetChat);
for (const name of ["model", "job"]) document.getElementById("chat-form").elements[name].addEventListener("change", resetChat);
document.getElementById("submit-form").addEventListener("click", (e) => { if (e.target.id === "data-preview-button") previewData(); });
document.getElementById("submit-close").addEventListener("click", () => { document.getElementById("submit").hidden = true; });
document.getElementById("job-rows").addEventListener("click", (e) => {
  const row = e.target.closest("tr.job"); if (row) showJob(Number(row.dataset.id));
});
for (const id of ["job-status", "job-model"]) document.getElementById(id).addEventListener("change", loadJobs);
api("/api/choices").then((menus) => { choices = menus; });
api("/api/models").then((models) => {
  document.getElementById("models").innerHTML = models.map((m) => `<option value="${esc(m.name)}">`).join("");
});
// Links that open a view: #job=ID, or a plan: #model=7B&gpu=A100-80GB&task=finetune (the form's field names).
function openFromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("job")) showJob(Number(params.get("job")));
  if (params.get("model")) {
    const form = document.getElementById("plan-form");
    for (const [key, value] of params) if (form.elements[key]) form.elements[key].value = value;
    form.requestSubmit();
  }
}
loadGpus();
loadJobs();
openFromHash();
setInterval(loadJobs, 3000);
</script>
</body>
</html>
"""
