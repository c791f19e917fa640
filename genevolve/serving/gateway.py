"""``genevolve gateway``: our offline stores behind Serper's ``/search`` and ``/images`` formats.

An agent configured with a Serper base URL (ours: ``--search serper`` with ``SERPER_BASE_URL``; the
official runtime: ``SERPER_BASE_URL``) runs fully offline against it:

    POST /search  {"q": "...", "num": 5}  -> {"searchParameters": {...}, "organic": [{"title", "link", "snippet", "position"}]}
    POST /images  {"q": "...", "num": 5}  -> {"searchParameters": {...}, "images": [{"title", "imageUrl", "imageWidth",
                                              "imageHeight", "thumbnailUrl", "source", "link", "position"}]}
    GET  /files/<ref id>                  -> the picture itself (what ``imageUrl`` points at)

A list of query objects gets a list of answers, as Serper's batch form does. The store is the
sandbox world folder or any folder built by ``genevolve index``. When started with an API key,
requests must send it as ``X-API-KEY``; the gateway binds to loopback unless told otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
MAX_NUM = 100


def _query(item: Any) -> tuple[str, int] | str:
    """(q, num) from one query object, or an error message."""
    if not isinstance(item, dict):
        return "each query is a JSON object with 'q'"
    q = item.get("q")
    if not isinstance(q, str) or not q.strip():
        return "'q' must be a non-empty string"
    try:
        num = int(item.get("num", 10) or 10)
    except (TypeError, ValueError):
        return "'num' must be an integer"
    return q.strip(), max(1, min(num, MAX_NUM))


def _text_results(text, q: str, num: int) -> dict:
    """Serper's /search answer for one query."""
    from ..tools.local import snippet

    hits = text.search_records(q, num)
    organic = [{"title": row.get("title", ""), "link": row.get("url", "") or f"gateway://doc/{row['id']}",
                "snippet": snippet(row.get("text", "")), "position": i + 1} for i, (_, row) in enumerate(hits)]
    return {"searchParameters": {"q": q, "num": num, "type": "search", "engine": "genevolve-gateway"}, "organic": organic}


def _image_results(images, base: str, q: str, num: int) -> dict:
    """Serper's /images answer for one query; pictures are served by id under ``base``/files/."""
    from PIL import Image

    rows = []
    for _, row in images.search_records(q, num):
        try:
            with Image.open(row["local_path"]) as im:
                w, h = im.size
        except OSError:
            continue
        url = f"{base}/files/{row['id']}"
        rows.append({"title": row.get("title", ""), "imageUrl": url, "imageWidth": w, "imageHeight": h,
                     "thumbnailUrl": url, "source": "genevolve-gateway", "link": f"{base}/files/{row['id']}",
                     "position": len(rows) + 1})
    return {"searchParameters": {"q": q, "num": num, "type": "images", "engine": "genevolve-gateway"}, "images": rows}


def build_gateway_app(store: str | Path, embedder=None, api_key: str | None = None) -> FastAPI:
    from ..tools.local import LocalImageSearch, LocalTextSearch, read_rows

    store = Path(store)
    for name in ("corpus.jsonl", "refs.jsonl"):
        if not (store / name).exists():
            raise FileNotFoundError(f"{store} is not a store: {name} is missing (build one with `genevolve index`)")
    text, images = LocalTextSearch(store, embedder), LocalImageSearch(store, embedder)
    app = FastAPI(title=f"genevolve gateway: {store}")
    by_id: dict[str, dict] = {}

    def refused(request: Request) -> JSONResponse | None:
        if api_key and request.headers.get("x-api-key") != api_key:
            return JSONResponse({"message": "Unauthorized: send the gateway's key as X-API-KEY"}, status_code=403)
        return None

    def run(body: Any, one) -> Any:
        items = body if isinstance(body, list) else [body]
        out = []
        for item in items:
            parsed = _query(item)
            if isinstance(parsed, str):
                return JSONResponse({"message": f"invalid query: {parsed}"}, status_code=400)
            out.append(one(*parsed))
        return out if isinstance(body, list) else out[0]

    async def body_of(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            return None

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "store": str(store)}

    @app.post("/search")
    async def search(request: Request) -> Any:
        if (r := refused(request)) is not None:
            return r
        body = await body_of(request)

        return run(body, lambda q, num: _text_results(text, q, num))

    @app.post("/images")
    async def image_search(request: Request) -> Any:
        if (r := refused(request)) is not None:
            return r
        body = await body_of(request)
        base = str(request.base_url).rstrip("/")

        return run(body, lambda q, num: _image_results(images, base, q, num))

    @app.get("/files/{ref_id}")
    def files(ref_id: str, request: Request) -> Any:
        # Looked up by id in refs.jsonl, never by path: nothing outside the store can be served.
        if not by_id:
            by_id.update({str(r["id"]): r for r in read_rows(store / "refs.jsonl", ("id", "file"))})
        row = by_id.get(ref_id)
        if row is None:
            return JSONResponse({"message": f"no image {ref_id!r}"}, status_code=404)
        path = (store / row["file"]).resolve()
        if store.resolve() not in path.parents or not path.is_file():
            return JSONResponse({"message": f"image {ref_id!r} is missing from the store"}, status_code=404)
        return FileResponse(path)

    return app


def run_gateway(store: str | Path, host: str = "127.0.0.1", port: int = 8200, api_key: str | None = None,
                log_level: str = "warning") -> None:
    import uvicorn

    app = build_gateway_app(store, api_key=api_key)
    if host not in LOOPBACK_HOSTS:
        print(f"warning: gateway on {host}:{port} is reachable from other machines"
              + ("" if api_key else " with no API key"), file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
