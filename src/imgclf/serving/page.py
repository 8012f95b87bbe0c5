"""``GET /``: a self-contained drop-an-image page. Inline CSS and JS only: no external URL, works offline.

It previews each dropped file, posts them to ``/v1/predict`` (with Grad-CAM when the run has it),
and draws the label, top-k bars, the binary decision and the overlay. A file over the upload limit
is refused in the page before it is sent; every error the server answers is shown as it says it.
"""

from __future__ import annotations

import html
import json
import re

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>imgclf · __TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #f5f6f8; color: #1c2330; }
main { max-width: 880px; margin: 0 auto; padding: 24px; }
h1 { font-size: 20px; margin: 0 0 4px; } .sub { color: #5b6475; margin: 0 0 18px; }
#drop { border: 2px dashed #8a94a8; border-radius: 10px; padding: 36px; text-align: center; background: #fff;
        cursor: pointer; } #drop.over { border-color: #2f6fde; background: #eef4ff; }
#error { display: none; margin: 14px 0; padding: 10px 14px; border-radius: 8px; background: #fdecec;
         color: #8a1c1c; border: 1px solid #f3b8b8; white-space: pre-wrap; }
.card { display: flex; gap: 18px; background: #fff; border-radius: 10px; padding: 16px; margin: 14px 0;
        box-shadow: 0 1px 3px #0002; flex-wrap: wrap; }
.card img { width: 192px; height: 192px; object-fit: contain; image-rendering: pixelated; background: #222;
            border-radius: 6px; }
.label { font-size: 18px; font-weight: 600; } .file { color: #5b6475; font-size: 13px; word-break: break-all; }
.bars { min-width: 260px; flex: 1; } .bar { margin: 6px 0; } .bar span { font-size: 13px; }
.track { background: #e6e9ef; border-radius: 4px; height: 10px; } .fill { background: #2f6fde; height: 10px;
         border-radius: 4px; } .decision { margin-top: 8px; font-size: 13px; color: #39404d; }
label.opt { font-size: 13px; color: #39404d; }
</style></head>
<body><main>
<h1>imgclf · __TITLE__</h1>
<p class="sub">__CLASSES__ · up to __MAX_BATCH__ images of at most __MAX_MB__ MB per request</p>
<div id="drop" tabindex="0">Drop images here, or click to choose</div>
<input id="files" type="file" accept="image/*,.dcm" multiple hidden>
<p><label class="opt"><input id="explain" type="checkbox" __EXPLAIN__> Grad-CAM: show where the model looked</label></p>
<div id="error" role="alert"></div>
<div id="results"></div>
</main>
<script>
const CONFIG = __CONFIG__;
const drop = document.getElementById("drop"), input = document.getElementById("files");
const errorBox = document.getElementById("error"), results = document.getElementById("results");
function showError(text) { errorBox.textContent = text; errorBox.style.display = text ? "block" : "none"; }
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; }
function card(file, result) {
  const c = el("div", "card"), img = el("img"); img.alt = "preview of " + file.name;
  img.src = URL.createObjectURL(file); c.appendChild(img);
  if (result.gradcam) { const cam = el("img"); cam.className = "gradcam"; cam.alt = "Grad-CAM overlay";
    cam.src = result.gradcam; c.appendChild(cam); }
  const bars = el("div", "bars"); bars.appendChild(el("div", "label", result.label));
  bars.appendChild(el("div", "file", file.name));
  for (const p of result.top_k) { const b = el("div", "bar");
    b.appendChild(el("span", "", p.class + " " + (100 * p.probability).toFixed(1) + "%"));
    const t = el("div", "track"), f = el("div", "fill"); f.style.width = (100 * p.probability).toFixed(1) + "%";
    t.appendChild(f); b.appendChild(t); bars.appendChild(b); }
  if (result.decision) { const d = result.decision, rule = d.threshold === null ? "most probable class" :
      "threshold " + d.threshold.toFixed(3);
    bars.appendChild(el("div", "decision", "P(" + d.positive_class + ") = " + d.probability.toFixed(3) +
      " → " + (d.positive ? "positive" : "negative") + " (" + rule + ")")); }
  c.appendChild(bars); return c;
}
async function send(files) {
  showError(""); results.innerHTML = "";
  if (!files.length) return;
  if (files.length > CONFIG.maxBatch) { showError(files.length + " files: at most " + CONFIG.maxBatch +
    " per request"); return; }
  const total = files.reduce((sum, f) => sum + f.size, 0);
  if (total > CONFIG.maxBytes) { showError((files.length === 1 ? files[0].name + " is " : "the files are ") +
    (total / 1048576).toFixed(1) + " MB, over the server's limit of " + CONFIG.maxMB + " MB per request"); return; }
  const form = new FormData(); files.forEach(f => form.append("file", f, f.name));
  const explain = document.getElementById("explain").checked;
  drop.textContent = "Classifying " + files.length + " image(s) …";
  try {
    const r = await fetch("v1/predict?top_k=" + CONFIG.topK + "&explain=" + explain, {method: "POST", body: form});
    const body = await r.json().catch(() => ({error: "the server answered " + r.status + " without JSON"}));
    if (!r.ok) { showError(body.error || ("error " + r.status)); return; }
    body.results.forEach((res, i) => results.appendChild(card(files[i], res)));
  } catch (e) { showError("could not reach the server: " + e.message); }
  finally { drop.textContent = "Drop images here, or click to choose"; }
}
drop.addEventListener("click", () => input.click());
drop.addEventListener("keydown", e => { if (e.key === "Enter" || e.key === " ") input.click(); });
input.addEventListener("change", () => { send(Array.from(input.files)); input.value = ""; });
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over");
  send(Array.from(e.dataTransfer.files)); });
</script></body></html>
"""


def render_page(title: str, classes: list[str], max_batch: int, max_bytes: int, top_k: int, explain: bool) -> str:
    """The page with the server's limits filled in (escaped: class names are user data)."""
    shown = ", ".join(classes[:8]) + (f" and {len(classes) - 8} more" if len(classes) > 8 else "")
    config = {"maxBatch": max_batch, "maxBytes": max_bytes, "maxMB": round(max_bytes / 2**20, 2), "topK": top_k}
    values = {"__TITLE__": html.escape(title), "__CLASSES__": html.escape(f"{len(classes)} classes: {shown}"),
              "__MAX_BATCH__": str(max_batch), "__MAX_MB__": f"{max_bytes / 2**20:g}",
              "__EXPLAIN__": "checked" if explain else "disabled",
              "__CONFIG__": json.dumps(config).replace("<", "\\u003c")}
    # one pass: a class named __EXPLAIN__ is shown as it is, not filled in by a later placeholder
    return re.sub("|".join(map(re.escape, values)), lambda match: values[match.group(0)], PAGE)
