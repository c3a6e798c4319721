"""The web workbench served at ``GET /``: caption several images at once, see the results in a table, type
reference captions for a result (posted to ``POST /v1/feedback``) and watch each model's rolling scores.

One static page, no build step and nothing fetched from elsewhere. It only calls the public API: ``/v1/captions``
(one request per image, so one bad file fails one row), ``/v1/feedback``, ``/v1/models`` (roles) and
``/metrics`` (the rolling BLEU-4/CIDEr gauges, public like the page). The API key typed into the page is kept
in a JavaScript variable only, never in storage or cookies, so it is gone when the tab closes.

Its Content-Security-Policy (:data:`PAGE_HEADERS`) lets only this page's own inline script and style run, by
their hashes, talk only to this server, and forbids framing: a page where users paste their key must not be
framed by another site or made to load script from elsewhere.
"""

import base64
import hashlib

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>reefcap workbench</title>
<style>
 body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 1.5rem auto; padding: 0 1rem; color: #123; }
 h1 { color: #06627a; margin-bottom: .2rem; } h2 { font-size: 1.1rem; margin-top: 1.5rem; }
 #drop { border: 2px dashed #7aa; border-radius: 6px; padding: 1.2rem; text-align: center; margin: 1rem 0; }
 #drop.over { background: #e6f4f7; border-color: #06627a; }
 table { border-collapse: collapse; width: 100%; } th, td { border-bottom: 1px solid #ccd; padding: .4rem; }
 th { text-align: left; font-size: .85rem; color: #456; } td { vertical-align: top; font-size: .95rem; }
 img.thumb { max-width: 96px; max-height: 72px; border-radius: 3px; }
 textarea { width: 14rem; height: 3.2rem; font: inherit; font-size: .85rem; }
 .error, tr.failed .caption { color: #a00; } .num { font-variant-numeric: tabular-nums; }
 .caption { font-size: 1.05rem; } .muted { color: #678; font-size: .85rem; }
</style>
</head>
<body>
<h1>reefcap workbench</h1>
<p class="muted">Caption underwater images, give reference captions for the results, and follow each model's
rolling scores against your references.</p>
<p><input id="key" type="password" placeholder="API key (if the server needs one)" autocomplete="off">
<span class="muted">kept in this tab's memory only</span></p>
<div id="drop">
  <p>Drop images here, or <label><u>choose files</u>
  <input id="files" name="images" type="file" accept="image/*" multiple hidden></label> (several at once).</p>
</div>
<p id="status" role="status"></p>
<table id="results" hidden>
  <thead><tr><th>Image</th><th>Caption</th><th>Model</th><th>Route</th><th>Fallback</th><th>Water type</th>
  <th>UIQM</th><th>UCIQE</th><th>Reference captions (one a line)</th></tr></thead>
  <tbody></tbody>
</table>
<template id="row-template">
  <tr class="pending">
    <td><img class="thumb" alt=""><div class="muted name"></div></td>
    <td class="caption">captioning...</td><td class="model"></td><td class="route"></td><td class="fallback"></td>
    <td class="water"></td>
    <td class="uiqm num"></td><td class="uciqe num"></td>
    <td><textarea class="refs" disabled></textarea><br>
      <button class="send" type="button" disabled>Send references</button> <span class="feedback muted"></span></td>
  </tr>
</template>
<h2>Rolling scores (served captions against your references)</h2>
<table id="scores">
  <thead><tr><th>Model</th><th>Role</th><th>BLEU-4</th><th>CIDEr</th><th>Images with references</th></tr></thead>
  <tbody></tbody>
</table>
<p id="scores-status" class="muted"></p>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (v, d) => (v === null || v === undefined) ? "n/a" : Number(v).toFixed(d);
const MAX_IN_FLIGHT = 4;  // one request per image, a few at a time: the server batches them anyway
let apiKey = "";  // in memory only: never written to localStorage, sessionStorage or a cookie
const queue = [];
let inFlight = 0, captioned = 0, failed = 0;
const scores = {};  // model name -> {role, Bleu_4, CIDEr, images}

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  if (apiKey) headers["Authorization"] = "Bearer " + apiKey;
  return headers;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = authHeaders(opts.headers);
  const response = await fetch(path, opts);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const err = data && data.error ? data.error.code + ": " + data.error.message : "HTTP " + response.status;
    throw new Error(err);
  }
  return data;
}

function setStatus() {
  const waiting = queue.length + inFlight;
  $("status").className = failed ? "error" : "";
  $("status").textContent = (waiting ? "Captioning: " + waiting + " to go. " : "Done. ") +
    captioned + " captioned, " + failed + " failed.";
}

function addFiles(files) {
  const body = $("results").tBodies[0];
  for (const file of files) {
    const row = $("row-template").content.firstElementChild.cloneNode(true);
    row.querySelector(".thumb").src = URL.createObjectURL(file);
    row.querySelector(".name").textContent = file.name;
    row.querySelector(".send").addEventListener("click", () => sendReferences(row));
    body.appendChild(row);
    queue.push([file, row]);
  }
  $("results").hidden = body.rows.length === 0;
  pump();
}

function pump() {
  while (inFlight < MAX_IN_FLIGHT && queue.length) {
    const [file, row] = queue.shift();
    inFlight++;
    captionOne(file, row).finally(() => { inFlight--; setStatus(); pump(); });
  }
  setStatus();
}

async function captionOne(file, row) {
  const cell = (cls) => row.querySelector("." + cls);
  const body = new FormData();
  body.append("images", file);
  body.append("options", JSON.stringify({quality: true}));  // the table shows UIQM/UCIQE
  try {
    const data = await api("/v1/captions", { method: "POST", body });
    const r = data.results[0];
    row.dataset.requestId = data.request_id;
    row.dataset.index = r.index;
    row.dataset.model = r.model.name;
    cell("caption").textContent = r.caption;
    cell("model").textContent = r.model.name + " (" + r.model.version + ", " + r.model.backend + ")";
    const route = r.route;  // null unless the serving model has a router
    cell("route").textContent = route ? route.domain.replace("_", " ") + " -> " + route.model +
      " (p underwater " + fmt(route.probability, 2) + ")" : "n/a";
    cell("fallback").textContent = r.fallback.used ? "yes: " + r.fallback.reason : "no";
    const w = r.water_type;  // null unless the model is a water-type experts model
    cell("water").textContent = w ? w.label + " (" + fmt(w.probability, 2) + ")" : "n/a";
    cell("uiqm").textContent = fmt(r.quality.uiqm, 3);
    cell("uciqe").textContent = fmt(r.quality.uciqe, 3);
    cell("refs").disabled = false;
    cell("send").disabled = false;
    row.className = "done";
    captioned++;
  } catch (err) {
    cell("caption").textContent = "Error: " + err.message;
    row.className = "failed";
    failed++;
  }
}

async function sendReferences(row) {
  const status = row.querySelector(".feedback");
  const references = row.querySelector(".refs").value.split("\\n").map((s) => s.trim()).filter(Boolean);
  if (!references.length) { status.textContent = "type a reference caption first"; return; }
  const body = JSON.stringify({ request_id: row.dataset.requestId, index: Number(row.dataset.index), references });
  status.className = "feedback muted"; status.textContent = "sending...";
  try {
    const data = await api("/v1/feedback", { method: "POST", body, headers: { "Content-Type": "application/json" } });
    status.textContent = "stored " + data.stored;
    row.classList.add("has-feedback");
    // The answer carries the model's new rolling scores: show them at once, then re-read everything.
    scores[data.model] = Object.assign(scores[data.model] || {}, data.rolling);
    renderScores();
    await refreshScores();
  } catch (err) {
    status.className = "feedback error"; status.textContent = "Error: " + err.message;
  }
}

function parseRolling(text) {
  // Prometheus text: reefcap_caption_quality_score{model="m",metric="CIDEr",source="feedback",split="rolling"} 0.5
  const out = {};
  const line = /^reefcap_caption_quality_score\\{([^}]*)\\}\\s+(\\S+)/gm;
  for (const m of text.matchAll(line)) {
    const labels = {};
    for (const l of m[1].matchAll(/(\\w+)="((?:[^"\\\\]|\\\\.)*)"/g)) labels[l[1]] = l[2].replace(/\\\\(.)/g, "$1");
    if (labels.source === "feedback" && labels.split === "rolling") {
      (out[labels.model] = out[labels.model] || {})[labels.metric] = Number(m[2]);
    }
  }
  return out;
}

async function refreshScores() {
  const notes = [];
  try {
    const data = await api("/v1/models");
    for (const m of data.models) (scores[m.name] = scores[m.name] || {}).role = m.role;
  } catch (err) { notes.push("models: " + err.message); }
  try {
    const response = await fetch("/metrics");
    const rolling = parseRolling(await response.text());
    for (const [name, values] of Object.entries(rolling)) scores[name] = Object.assign(scores[name] || {}, values);
  } catch (err) { notes.push("metrics: " + err.message); }
  $("scores-status").textContent = notes.join("; ");
  renderScores();
}

function renderScores() {
  const body = $("scores").tBodies[0];
  body.replaceChildren();
  for (const [name, s] of Object.entries(scores)) {
    const row = body.insertRow();
    row.dataset.model = name;
    const cells = [name, s.role || "", fmt(s.Bleu_4, 3), fmt(s.CIDEr, 3), s.images === undefined ? "n/a" : s.images];
    ["name", "role", "bleu4 num", "cider num", "images num"].forEach((cls, i) => {
      const td = row.insertCell(); td.className = cls; td.textContent = cells[i];
    });
  }
}

$("key").addEventListener("input", (event) => { apiKey = event.target.value; });
$("key").addEventListener("change", refreshScores);
$("files").addEventListener("change", (event) => { addFiles(event.target.files); event.target.value = ""; });
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault(); drop.classList.remove("over");
  addFiles([...event.dataTransfer.files].filter((f) => !f.type || f.type.startsWith("image/")));
});
refreshScores();
</script>
</body>
</html>
"""


def _inline_hash(tag: str) -> str:
    """The CSP hash source of the page's one inline ``tag`` element (its exact text between the tags)."""
    body = PAGE.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode() + "'"


# img-src blob: the thumbnails are object URLs of the chosen files.
PAGE_CSP = (
    f"default-src 'none'; script-src {_inline_hash('script')}; style-src {_inline_hash('style')}; "
    "img-src blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP}
