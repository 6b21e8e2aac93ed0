// The playground: reads the run summary, streams completions over server-sent events, and colours
// each token by its probability. Plain browser JavaScript: no framework, no build step, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const ALTERNATIVES = 5; // top alternatives requested per token for the hover table
let modelName = null;
let controller = null; // AbortController of the running generation
const tokenInfo = new WeakMap(); // token <span> -> {logprob, top}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function formatCount(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} k`;
  return String(n);
}

function addPart(parent, label, value) {
  if (value === null || value === undefined || value === "") return;
  if (parent.childNodes.length) parent.append(" · ");
  const b = document.createElement("b");
  b.textContent = value;
  parent.append(`${label} `, b);
}

async function loadSummary() {
  const res = await fetch("/v1/run", { headers: authHeaders() });
  if (res.status === 401) {
    $("key-row").hidden = false;
    $("summary").textContent = "This server needs an API key: enter it in the form.";
    return;
  }
  const run = await res.json();
  if (!res.ok) {
    $("summary").textContent = run.error ? run.error.message : `HTTP ${res.status}`;
    return;
  }
  modelName = run.model;
  const summary = $("summary");
  summary.textContent = "";
  addPart(summary, "run", run.model);
  const tuned = run.trainable !== null && run.trainable !== run.params ? `, ${formatCount(run.trainable)} trained` : "";
  addPart(summary, "model", `${run.family} ${formatCount(run.params)} params${tuned}`);
  summary.title = run.description;
  addPart(summary, "shape", `${run.n_layer} layers × ${run.n_embd}, context ${run.block_size}, vocab ${run.vocab_size}`);
  const data = run.data || {};
  const source = data.source || data.dataset || data.path || null;
  const trained = data.train_tokens ? ` (${formatCount(data.train_tokens)} training tokens)` : "";
  addPart(summary, "data", source && source + trained);
  if (run.val_bpb !== null) {
    const best = run.best_val_bpb !== null ? ` (best ${run.best_val_bpb.toFixed(3)})` : "";
    addPart(summary, "val", `${run.val_bpb.toFixed(3)} bits/byte at step ${run.step}${best}`);
  } else {
    addPart(summary, "val", "no evaluation recorded");
  }
  for (const id of ["label", "negative-label"]) {
    const select = $(id);
    select.length = 1;
    for (const label of run.labels) select.add(new Option(label, label));
    select.disabled = run.labels.length === 0;
  }
  const slider = $("max-tokens");
  slider.max = String(run.max_tokens_limit);
  if (Number(slider.value) > run.max_tokens_limit) slider.value = String(run.max_tokens_limit);
  syncOutputs();
}

const SLIDERS = ["temperature", "top-p", "max-tokens", "guidance"];

function syncOutputs() {
  for (const id of SLIDERS) $(`${id}-value`).textContent = $(id).value;
}

function requestBody() {
  const body = {
    model: modelName,
    prompt: $("prompt").value,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    logprobs: ALTERNATIVES,
    stream: true,
  };
  if ($("label").value) body.label = $("label").value;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  // Classifier-free guidance: a negative label without guidance > 1 is sent too, so that the
  // server's message says why it does nothing.
  if (Number($("guidance").value) > 1) body.guidance_scale = Number($("guidance").value);
  if ($("negative-label").value) body.negative_label = $("negative-label").value;
  return body;
}

// Probability on a log scale, 0.1% -> 0 (red) ... 100% -> 1 (green): small models rarely exceed 50%,
// and the difference between 0.1% and 5% matters as much as the one between 5% and 100%.
function colourPosition(logprob) {
  return Math.min(1, Math.max(0, (logprob / Math.LN10 + 3) / 3));
}

function addToken(text, logprobs) {
  if (text === "") return; // an unfinished multi-byte character or the end-of-text token
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  if (logprobs) {
    const logprob = logprobs.token_logprobs[0];
    span.style.setProperty("--c", colourPosition(logprob).toFixed(3));
    tokenInfo.set(span, { text, logprob, top: logprobs.top_logprobs[0] || {} });
  }
  $("generated").append(span);
}

// Parse one server-sent event; returns true once the stream says [DONE].
function handleEvent(raw, stats) {
  for (const line of raw.split("\n")) {
    if (!line.startsWith("data: ")) continue;
    const data = line.slice(6);
    if (data === "[DONE]") return true;
    const message = JSON.parse(data);
    if (message.error) throw new Error(message.error.message);
    for (const choice of message.choices) {
      if (choice.finish_reason) stats.finish = choice.finish_reason;
      else {
        stats.tokens += 1;
        addToken(choice.text, choice.logprobs);
      }
    }
  }
  return false;
}

async function readStream(res, stats) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      if (handleEvent(event, stats)) return;
    }
    const seconds = (performance.now() - stats.start) / 1000;
    setStatus(`${stats.tokens} tokens · ${(stats.tokens / seconds).toFixed(1)} tokens/s …`);
  }
}

async function generate(event) {
  event.preventDefault();
  if (controller) return;
  if (!modelName) await loadSummary();
  if (!modelName) return;
  $("shown-prompt").textContent = $("prompt").value;
  $("generated").textContent = "";
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  const stats = { tokens: 0, finish: null, start: performance.now() };
  setStatus("Generating…");
  try {
    const res = await fetch("/v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      if (res.status === 401) $("key-row").hidden = false;
      throw new Error(body.error ? body.error.message : `HTTP ${res.status}`);
    }
    await readStream(res, stats);
    const seconds = (performance.now() - stats.start) / 1000;
    const rate = (stats.tokens / seconds).toFixed(1);
    setStatus(`Done: ${stats.tokens} tokens in ${seconds.toFixed(2)} s (${rate} tokens/s), finish reason: ${stats.finish}.`);
  } catch (error) {
    if (error.name === "AbortError") setStatus(`Stopped after ${stats.tokens} tokens.`);
    else setStatus(`Error: ${error.message}`, true);
  } finally {
    controller = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

function visible(text) {
  return text.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥");
}

function showTooltip(event) {
  const info = tokenInfo.get(event.target);
  if (!info || !$("output").classList.contains("coloured")) return;
  const tip = $("tooltip");
  const table = document.createElement("table");
  const entries = Object.entries(info.top).sort((a, b) => b[1] - a[1]);
  if (!entries.some(([text]) => text === info.text)) entries.unshift([info.text, info.logprob]);
  for (const [text, logprob] of entries) {
    const row = table.insertRow();
    if (text === info.text) row.className = "chosen";
    row.insertCell().textContent = visible(text);
    const cell = row.insertCell();
    cell.className = "prob";
    cell.textContent = `${(100 * Math.exp(logprob)).toFixed(1)}%`;
  }
  tip.replaceChildren(table);
  tip.hidden = false;
  const box = event.target.getBoundingClientRect();
  tip.style.left = `${Math.min(box.left, window.innerWidth - tip.offsetWidth - 8)}px`;
  tip.style.top = `${box.bottom + 6}px`;
}

function init() {
  for (const id of SLIDERS) $(id).addEventListener("input", syncOutputs);
  $("controls").addEventListener("submit", generate);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("controls").requestSubmit();
  });
  $("colour").addEventListener("change", () => {
    $("output").classList.toggle("coloured", $("colour").checked);
    $("legend").hidden = !$("colour").checked;
  });
  $("api-key").addEventListener("change", loadSummary);
  $("generated").addEventListener("mouseover", showTooltip);
  $("generated").addEventListener("mouseout", () => { $("tooltip").hidden = true; });
  syncOutputs();
  loadSummary().catch((error) => setStatus(`Cannot reach the server: ${error.message}`, true));
}

init();
