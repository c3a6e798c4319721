"""The one-page web client served at ``GET /``: upload an image, see its caption, model and image quality."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>reefcap</title>
<style>
 body { font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; color: #123; }
 h1 { color: #06627a; } img { max-width: 100%; margin-top: 1rem; border-radius: 4px; }
 dl { display: grid; grid-template-columns: max-content 1fr; gap: .3rem 1rem; }
 dt { font-weight: 600; } .error { color: #a00; } #caption { font-size: 1.3rem; }
</style>
</head>
<body>
<h1>reefcap</h1>
<p>Caption an underwater image.</p>
<form id="form">
  <input id="file" name="images" type="file" accept="image/*" required>
  <input id="key" type="password" placeholder="API key (if the server needs one)" autocomplete="off">
  <button id="submit" type="submit">Caption</button>
</form>
<p id="status" role="status"></p>
<div id="result" hidden>
  <p id="caption"></p>
  <dl>
    <dt>Model</dt><dd id="model"></dd>
    <dt>Fallback</dt><dd id="fallback"></dd>
    <dt>Confidence</dt><dd id="confidence"></dd>
    <dt>Water type</dt><dd id="water-type"></dd>
    <dt>UIQM</dt><dd id="uiqm"></dd>
    <dt>UCIQE</dt><dd id="uciqe"></dd>
    <dt>Latency</dt><dd id="latency"></dd>
    <dt>Request id</dt><dd id="request-id"></dd>
  </dl>
</div>
<img id="preview" alt="" hidden>
<script>
const $ = (id) => document.getElementById(id);
const fmt = (v, d) => (v === null || v === undefined) ? "n/a" : Number(v).toFixed(d);
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) return;
  $("preview").src = URL.createObjectURL(file); $("preview").hidden = false;
  $("status").className = ""; $("status").textContent = "Captioning...";
  const body = new FormData(); body.append("images", file);
  const headers = {}; if ($("key").value) headers["Authorization"] = "Bearer " + $("key").value;
  try {
    const response = await fetch("/v1/captions", { method: "POST", body, headers });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error ? data.error.code + ": " + data.error.message : response.status);
    const r = data.results[0];
    $("caption").textContent = r.caption;
    $("model").textContent = r.model.name + " (" + r.model.version + ", " + r.model.backend + ")";
    $("fallback").textContent = r.fallback.used ? "yes: " + r.fallback.reason : "no";
    $("confidence").textContent = fmt(r.confidence, 3);
    const w = r.water_type;  // null unless the model is a water-type experts model
    $("water-type").textContent = w ? w.label + " (" + fmt(w.probability, 2) + ")" : "n/a";
    $("uiqm").textContent = fmt(r.quality.uiqm, 3);
    $("uciqe").textContent = fmt(r.quality.uciqe, 3);
    $("latency").textContent = fmt(r.latency_ms, 1) + " ms";
    $("request-id").textContent = data.request_id;
    $("result").hidden = false; $("status").textContent = "Done";
  } catch (err) {
    $("result").hidden = true; $("status").className = "error"; $("status").textContent = "Error: " + err.message;
  }
});
</script>
</body>
</html>
"""
