"""``medxfer serve``: a small web page for one trained model. A person drops X-rays (JPEG, PNG
8/16-bit, DICOM) and sees per image the probability (per class for multi-class models), the
decision at the run's operating point with a slider to move it, and the Grad-CAM overlay; the
page's JSON endpoint (``POST /api/predict``) gives the same answers to programs.

Built on FastAPI (served by uvicorn): one HTML page with vanilla JavaScript and two JSON
endpoints, no assets from the network. It binds to this machine only unless told otherwise.
"""

import base64
import io
import json
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medxfer.classification.card import NOTICE, model_summary
from medxfer.classification.trained import TrainedModel
from medxfer.errors import MedxferError

MAX_FILES = 16
MAX_BYTES = 32 * 1024 * 1024  # per file: a large DICOM fits, a mistaken upload does not
MAX_REQUEST = MAX_FILES * MAX_BYTES + 2**20  # the whole body: the files and the form around them


def create_app(model: TrainedModel) -> Any:
    """The FastAPI application serving ``model``."""
    try:
        from fastapi import FastAPI, File, HTTPException, UploadFile
        from fastapi.responses import HTMLResponse
    except ImportError:
        raise MedxferError("medxfer serve needs FastAPI: pip install 'medxfer[serve]'") from None

    app = FastAPI(title="medxfer", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=MAX_REQUEST)
    lock = threading.Lock()  # Grad-CAM hooks the shared network: one request at a time
    about = {
        "notice": NOTICE,
        **model.describe(),
        "card": model_summary(model),
        "limits": {"files": MAX_FILES, "bytes": MAX_BYTES},
    }

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/api/model")
    def describe() -> dict:
        return about

    @app.post("/api/predict")
    def predict(files: list[UploadFile] = File(...), cam: bool = True) -> dict:  # noqa: B008
        if len(files) > MAX_FILES:
            raise HTTPException(413, f"at most {MAX_FILES} files per request, got {len(files)}")
        uploads = [
            (f.filename or f"upload {i}", f.file.read(MAX_BYTES + 1)) for i, f in enumerate(files)
        ]
        with lock:
            return {"results": answer(model, uploads, cam=cam), "notice": NOTICE}

    return app


def answer(model: TrainedModel, uploads: list[tuple[str, bytes]], *, cam: bool) -> list[dict]:
    """One result per upload, in order: probabilities and decision, or the reason it failed."""
    from medxfer.inference.predict import decode_input

    results: list[dict] = []
    decoded: list[tuple[int, np.ndarray]] = []
    with tempfile.TemporaryDirectory(prefix="medxfer-serve-") as tmp:
        for i, (name, data) in enumerate(uploads):
            results.append({"file": name})
            if len(data) > MAX_BYTES:
                results[-1]["error"] = f"larger than {MAX_BYTES // 2**20} MB"
                continue
            path = Path(tmp) / f"{i}{_suffix(name)}"
            path.write_bytes(data)
            try:
                decoded.append((i, decode_input(model, path)))
            except MedxferError as exc:
                reason = str(exc).removeprefix(f"{path}: ")
                results[-1]["error"] = reason.replace(str(path), name)  # not our temp path
    if decoded:
        _fill(model, results, decoded, cam=cam)
    return results


def _fill(model: TrainedModel, results: list[dict], decoded, *, cam: bool) -> None:
    """Probabilities, decisions and pictures of the images that decoded."""
    import torch

    from medxfer.inference.cam import overlays

    pixels = torch.from_numpy(np.stack([p for _, p in decoded]))
    prob = model.probabilities(pixels)
    decided = model.task.names(model.decide(prob))
    pictures = overlays(model, pixels) if cam else [None] * len(decoded)
    for row, (i, image) in enumerate(decoded):
        p = np.atleast_1d(prob[row])
        names = [model.classes[1]] if model.task.name == "binary" else list(model.classes)
        results[i].update(
            probabilities={n: float(v) for n, v in zip(names, p, strict=True)},
            predicted=decided[row],
            image=_png(image),
            cam=None if pictures[row] is None else _png(pictures[row]),
        )


def _png(image: np.ndarray) -> str:
    """A data URL of a uint8 image (H, W), (3, H, W) or (H, W, 3)."""
    if image.ndim == 3 and image.shape[0] == 3:
        image = image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _suffix(name: str) -> str:
    """The upload's own suffix when it is a plain one (the decoder goes by it, and by DICOM's
    preamble when there is none)."""
    suffix = Path(name).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,6}", suffix) else ""


def serve(run: str | Path, *, host: str = "127.0.0.1", port: int = 8000, device_name: str = "auto"):
    """Serve the trained model of ``run`` until interrupted."""
    from medxfer.device import select_device

    try:
        import uvicorn
    except ImportError:
        raise MedxferError("medxfer serve needs uvicorn: pip install 'medxfer[serve]'") from None
    model = TrainedModel.load(run).to(select_device(device_name))
    print(f"medxfer: serving {run} at http://{host}:{port}/ ({NOTICE})")
    uvicorn.run(create_app(model), host=host, port=port, log_level="warning")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medxfer</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:70rem;color:#222}
.notice{background:#fff3cd;border:1px solid #e0c36a;padding:.5rem .8rem;font-weight:600}
#drop{border:2px dashed #888;padding:1.5rem;text-align:center;margin:1rem 0;border-radius:6px}
#drop.over{background:#eef}
.result{display:flex;gap:1rem;border-bottom:1px solid #ddd;padding:.8rem 0;align-items:center}
.result img{width:224px;height:224px;image-rendering:auto;border:1px solid #ccc}
.error{color:#b00020;font-weight:600}
.decision{font-weight:700}
#card{font-size:.9rem;color:#444}
table{border-collapse:collapse}td,th{padding:.1rem .5rem;text-align:left}
</style></head><body>
<h1>medxfer</h1>
<p class="notice" id="notice">Research use only, not a medical device.</p>
<div id="card"></div>
<div id="drop">Drop X-rays here (JPEG, PNG, DICOM) or
<input type="file" id="files" multiple
 accept=".jpg,.jpeg,.png,.dcm,.dicom,image/*,application/dicom">
</div>
<div id="operating"></div>
<div id="status"></div>
<div id="results"></div>
<p class="notice">Research use only, not a medical device.</p>
<script>
let about = null, results = [], cuts = [];
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"]/g, (c) =>
  ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const fmt = (v) => (v === null || v === undefined) ? "–" : Number(v).toFixed(4);

function decide(probs) {
  const names = Object.keys(probs);
  if (about.task === "multiclass")
    return names.reduce((a, b) => probs[a] >= probs[b] ? a : b);
  if (about.task === "binary")
    return probs[names[0]] >= cuts[0] ? about.classes[1] : about.classes[0];
  return names.filter((n, j) => probs[n] >= cuts[j]).join(", ") || "(no label)";
}

function showCard() {
  const c = about.card, lines = [];
  lines.push(`<b>${esc(about.arch)}</b>, ${esc(about.mode)}; ${esc(about.task)} task, classes `
    + esc(about.classes.join(", ")) + `; input ${about.image_size} px`);
  if (c.training_data) lines.push("Trained on " + esc(c.training_data.source) + ": "
    + Object.entries(c.training_data.split_sizes || {}).map(([k, v]) => `${k} ${v}`).join(", "));
  if (c.test_metrics) lines.push("Test: " + Object.entries(c.test_metrics).map(([k, m]) =>
    `${k} ${fmt(m.value)}` + (m.ci95 ? ` (95% CI ${fmt(m.ci95[0])}–${fmt(m.ci95[1])})` : ""))
    .join("; "));
  if (c.calibration) lines.push(`Calibration: ${esc(c.calibration.method)}, test ECE `
    + fmt(c.calibration.test_ece));
  $("card").innerHTML = lines.map((l) => `<div>${l}</div>`).join("");
}

function showSliders() {
  if (!about.thresholds) { $("operating").innerHTML =
    "<p>Decision: the most probable class.</p>"; return; }
  const labels = about.task === "binary" ? [about.classes[1]] : about.classes;
  $("operating").innerHTML = labels.map((n, j) =>
    `<label>Operating point for ${esc(n)}: <input type="range" class="threshold" min="0" `
    + `max="1" step="0.01" value="${cuts[j]}" data-j="${j}"> <span id="cut${j}">`
    + `${fmt(cuts[j])}</span></label> `
    + `<small>(stored: ${fmt(about.thresholds[j])})</small><br>`).join("");
  document.querySelectorAll(".threshold").forEach((el) => el.addEventListener("input", () => {
    cuts[el.dataset.j] = Number(el.value);
    $("cut" + el.dataset.j).textContent = fmt(el.value);
    showResults();
  }));
}

function showResults() {
  $("results").innerHTML = results.map((r) => {
    if (r.error) return `<div class="result"><div><b>${esc(r.file)}</b><br>`
      + `<span class="error">Could not read this file: ${esc(r.error)}</span></div></div>`;
    const rows = Object.entries(r.probabilities).map(([n, p]) =>
      `<tr><td>P(${esc(n)})</td><td class="probability" data-class="${esc(n)}">${fmt(p)}`
      + `</td></tr>`).join("");
    return `<div class="result"><img src="${r.image}" alt="image">`
      + (r.cam ? `<img src="${r.cam}" alt="Grad-CAM">` : "")
      + `<div><b class="file">${esc(r.file)}</b><table>${rows}</table>`
      + `Decision: <span class="decision">${esc(decide(r.probabilities))}</span></div></div>`;
  }).join("");
}

async function upload(fileList) {
  if (!fileList.length) return;
  if (fileList.length > about.limits.files) {
    $("status").innerHTML = `<p class="error">At most ${about.limits.files} files at once.</p>`;
    return;
  }
  const form = new FormData();
  for (const f of fileList) form.append("files", f, f.name);
  $("status").textContent = "Working…";
  const reply = await fetch("api/predict", {method: "POST", body: form});
  const body = await reply.json();
  if (!reply.ok) { $("status").innerHTML = `<p class="error">${esc(body.detail)}</p>`; return; }
  results = body.results;
  $("status").textContent = `${results.length} file(s)`;
  showResults();
}

fetch("api/model").then((r) => r.json()).then((a) => {
  about = a; cuts = (a.thresholds || []).slice();
  $("notice").textContent = a.notice;
  showCard(); showSliders();
});
$("files").addEventListener("change", (e) => upload(e.target.files));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over"); upload(e.dataTransfer.files);
});
</script></body></html>
"""


class BodyLimit:
    """Refuses an upload larger than ``limit`` bytes from its Content-Length, before any of it
    is received: Starlette would otherwise spool every part to disk before the per-file limit
    could be checked. A body without a length (chunked) is refused too (411)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT"):
            length = dict(scope["headers"]).get(b"content-length")
            if length is None or not length.isdigit():
                return await _refuse(send, 411, "a Content-Length is required")
            if int(length) > self.limit:
                limit = self.limit // 2**20
                return await _refuse(send, 413, f"request larger than {limit} MB")
        await self.app(scope, receive, send)


async def _refuse(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
