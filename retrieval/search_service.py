"""The image search HTTP service: a JSON API and one HTML page over an ``ImageSearcher``.

``create_app(searcher)`` builds a FastAPI application (``beam_jobs.serve_search``
runs it with uvicorn):

- ``GET /``: a page where a person uploads an image, or picks one of a few
  indexed images, and sees the query and its neighbours' thumbnails with
  labels and scores;
- ``POST /api/search?k=10``: the body is the encoded image itself (any
  content type; no multipart form, so no form parser is needed), embedded
  with the index's model; answers ``{"model_version", "neighbors": [...]}``;
- ``GET /api/neighbors?image_id=ID&k=10``: the neighbours of an indexed image;
- ``GET /api/thumbnail/{image_id}``: a small PNG of an *indexed* image (read
  from the uri in the id map; no other path can be asked for);
- ``GET /api/info``: what the index holds and how it was measured.

Limits: an upload larger than ``max_upload_bytes`` is refused with 413 before
it is read whole (by Content-Length, and again while reading a body sent
without one); a body that is not an image gets 400 with the reason
(``not_an_image``, ``unsupported_format``, ...); ``k`` is bounded. The service
binds to 127.0.0.1 unless told otherwise (``beam_jobs.serve_search``).
"""

from __future__ import annotations

import hashlib
import html
import io
import threading
from typing import Any

from apache_beam.io.filesystems import FileSystems
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from retrieval.searcher import ImageSearcher, SearchHit, UnknownImageId

DEFAULT_MAX_UPLOAD_BYTES = 10 * 2**20
MAX_K = 100
THUMBNAIL_PIXELS = 160
SAMPLE_IMAGES = 12


def _hit_json(hit: SearchHit, rank: int) -> dict[str, Any]:
    return {"rank": rank, **hit.to_dict(), "thumbnail": f"/api/thumbnail/{hit.image_id}"}


def _sample_ids(searcher: ImageSearcher, count: int) -> list[str]:
    """A few indexed images to pick from: the same ones on every start (by hashed id)."""
    ids = searcher.index.all_image_ids()
    return sorted(ids, key=lambda i: hashlib.sha256(f"sample:{i}".encode()).digest())[:count]


def thumbnail_png(data: bytes, pixels: int = THUMBNAIL_PIXELS) -> bytes:
    """A PNG no larger than ``pixels`` on a side (small images are scaled up to stay visible)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB") if image.mode not in ("L", "RGB") else image.copy()
    scale = pixels / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    buffer = io.BytesIO()
    image.resize(size, Image.NEAREST if scale > 1 else Image.BILINEAR).save(buffer, format="PNG")
    return buffer.getvalue()


def create_app(searcher: ImageSearcher, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> Any:
    """The FastAPI application serving ``searcher`` (see the module docstring)."""
    # FastAPI resolves endpoint annotations from this module's globals (postponed
    # annotations), so its types are imported at the top; the model code only here.
    from transforms.embedding_rows import InvalidQueryImage

    app = FastAPI(title="vision-pipelines image search", docs_url=None, redoc_url=None)
    lock = threading.Lock()
    info = searcher.info
    samples = _sample_ids(searcher, SAMPLE_IMAGES)

    def neighbors(query: bytes | str, k: int) -> dict[str, Any]:
        with lock:  # One query at a time through the model and the shards.
            hits = searcher.search(query, k=k)
        return {"model_version": info.model_version, "neighbors": [_hit_json(h, r) for r, h in enumerate(hits, 1)]}

    @app.get("/api/info")
    def index_info() -> dict[str, Any]:
        return {"model_version": info.model_version, "count": info.count, "dimension": info.dimension,
                "num_shards": info.num_shards, "k": info.k, "recall_at_k": info.recall_at_k, "qps": info.qps,
                "query_sample_size": info.query_sample_size, "samples": samples}

    @app.post("/api/search")
    async def search_image(request: Request, k: int = Query(10, ge=1, le=MAX_K)) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
            raise HTTPException(413, f"upload of {declared} bytes exceeds the limit of {max_upload_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_upload_bytes:
                raise HTTPException(413, f"upload exceeds the limit of {max_upload_bytes} bytes")
        if not body:
            raise HTTPException(400, "empty body: POST the encoded image bytes")
        try:
            return neighbors(bytes(body), k)
        except InvalidQueryImage as error:
            return JSONResponse({"detail": str(error), "reason": error.reason}, status_code=400)
        except ValueError as error:
            raise HTTPException(400, str(error)) from error

    @app.get("/api/neighbors")
    def search_id(image_id: str, k: int = Query(10, ge=1, le=MAX_K)) -> Any:
        try:
            return neighbors(image_id, k)
        except UnknownImageId as error:
            raise HTTPException(404, str(error)) from error

    @app.get("/api/thumbnail/{image_id}")
    def thumbnail(image_id: str) -> Response:
        try:
            entry = searcher.index.entry(searcher.index.key_of(image_id))
        except UnknownImageId as error:
            raise HTTPException(404, str(error)) from error
        try:
            with FileSystems.open(entry["uri"], compression_type="uncompressed") as handle:
                data = handle.read()
            png = thumbnail_png(data)
        except (OSError, ValueError) as error:  # Moved or unreadable since it was indexed.
            raise HTTPException(404, f"image {image_id} cannot be read from {entry['uri']}: {error}") from error
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return _PAGE.replace("{{MODEL_VERSION}}", html.escape(info.model_version)).replace(
            "{{COUNT}}", str(info.count)).replace("{{MAX_UPLOAD}}", str(max_upload_bytes)).replace(
            "{{SAMPLES}}", "".join(
                f'<img class="sample" alt="{html.escape(i)}" title="{html.escape(i)}" data-id="{html.escape(i)}" '
                f'src="/api/thumbnail/{html.escape(i)}">' for i in samples))

    return app


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Image search</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
 header p { color: #666; margin-top: 0; }
 .samples img { width: 56px; height: 56px; margin: 2px; cursor: pointer; border: 2px solid transparent; }
 .samples img:hover { border-color: #36c; }
 #query img { width: 160px; height: 160px; object-fit: contain; border: 2px solid #36c; }
 #results { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 1rem; }
 figure.neighbor { margin: 0; text-align: center; font-size: 0.85rem; }
 figure.neighbor img { width: 120px; height: 120px; object-fit: contain; background: #f4f4f4; }
 #error { color: #b00; }
</style></head>
<body>
<header><h1>Image search</h1>
<p>model {{MODEL_VERSION}} &middot; {{COUNT}} images indexed</p></header>
<form id="upload"><input type="file" id="file" accept="image/*">
 <label>k <input type="number" id="k" value="10" min="1" max="100" style="width:4em"></label>
 <button type="submit" id="submit">Search</button></form>
<p>or pick an indexed image:</p><div class="samples">{{SAMPLES}}</div>
<p id="error"></p>
<div id="query"></div>
<div id="results"></div>
<script>
const maxUpload = {{MAX_UPLOAD}};
function show(data, queryUrl) {
  document.getElementById("error").textContent = "";
  document.getElementById("query").innerHTML = '<p>query</p><img id="query-image" alt="query">';
  document.getElementById("query-image").src = queryUrl;
  const results = document.getElementById("results");
  results.innerHTML = "";
  for (const hit of data.neighbors) {
    const figure = document.createElement("figure");
    figure.className = "neighbor";
    const img = document.createElement("img");
    img.src = hit.thumbnail; img.alt = hit.image_id; img.title = hit.uri;
    const caption = document.createElement("figcaption");
    caption.textContent = (hit.label === null ? "?" : hit.label) + " · " + hit.score.toFixed(3);
    figure.append(img, caption);
    results.append(figure);
  }
}
function fail(text) { document.getElementById("error").textContent = text; document.getElementById("results").innerHTML = ""; }
async function answer(response, queryUrl) {
  const data = await response.json();
  if (!response.ok) { fail(response.status + ": " + (data.detail || JSON.stringify(data))); return; }
  show(data, queryUrl);
}
document.getElementById("upload").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = document.getElementById("file").files[0];
  if (!file) { fail("choose an image first"); return; }
  if (file.size > maxUpload) { fail("the image is larger than " + maxUpload + " bytes"); return; }
  const k = document.getElementById("k").value;
  const response = await fetch("/api/search?k=" + encodeURIComponent(k), {method: "POST", body: file,
    headers: {"Content-Type": file.type || "application/octet-stream"}});
  await answer(response, URL.createObjectURL(file));
});
for (const img of document.querySelectorAll("img.sample")) {
  img.addEventListener("click", async () => {
    const k = document.getElementById("k").value;
    const response = await fetch("/api/neighbors?image_id=" + encodeURIComponent(img.dataset.id) + "&k=" + k);
    await answer(response, img.src);
  });
}
</script>
</body></html>
"""
