"""``genevolve gateway``: our offline stores behind Serper's ``/search`` and ``/images`` formats.

An agent configured with a Serper base URL (ours: ``--search serper`` with ``SERPER_BASE_URL``; the
official runtime: ``SERPER_BASE_URL``) runs fully offline against it:

    POST /search  {"q": "...", "num": 5}  -> {"searchParameters": {...}, "organic": [{"title", "link", "snippet", "position"}]}
    POST /images  {"q": "...", "num": 5}  -> {"searchParameters": {...}, "images": [{"title", "imageUrl", "imageWidth",
                                              "imageHeight", "thumbnailUrl", "source", "link", "position"}]}
    GET  /files/<ref id>                  -> the picture itself (what ``imageUrl`` points at)

A list of query objects (at most 64) gets a list of answers, as Serper's batch form does. ``q`` is
clean text (no lone surrogates, no control characters) of at most 2000 characters and ``num`` a whole
number from 1 to 100; anything else gets 400 with a message, a body over 2 MB gets 413. Searches run
one at a time, query by query in arrival order, so one request's batch never holds up another's for more
than a query. The store is
the sandbox world folder or any folder built by ``genevolve index``. When started with an API key,
every request must send it as ``X-API-KEY``; the image URLs in answers carry a signature instead (a
client fetches them as plain URLs, as Serper's are). The gateway binds to loopback unless told
otherwise and serves no interactive docs pages (they load scripts from a CDN); /openapi.json stays.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .guard import (ApiKey, BodyLimit, check_signature, is_int, is_loopback, read_json, safe, serve_until_stopped, sign,
                    text_problem)

MAX_NUM = 100
MAX_QUERY_CHARS = 2000
MAX_BATCH = 64
MAX_BODY_BYTES = 2 * 1024 * 1024
MEDIA_TYPES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF87a": "image/gif", b"GIF89a": "image/gif"}


def _query(item: Any) -> tuple[str, int] | str:
    """(q, num) from one query object, or why it is refused."""
    if not isinstance(item, dict):
        return "each query is a JSON object with 'q'"
    q = item.get("q")
    if not isinstance(q, str) or not q.strip():
        return "'q' must be a non-empty string"
    if len(q) > MAX_QUERY_CHARS:
        return f"'q' has {len(q)} characters; at most {MAX_QUERY_CHARS}"
    if (why := text_problem(q)) is not None:
        return f"'q' {why}"
    num = item.get("num")
    if num is None:
        num = 10
    if not is_int(num) or not 1 <= num <= MAX_NUM:
        return f"'num' must be a whole number from 1 to {MAX_NUM}"
    return q.strip(), num


def _queries(body: Any, max_batch: int) -> list[tuple[str, int]] | str:
    """Every query of a body (one object or a batch), all checked before any search runs; or why not."""
    if isinstance(body, list):
        if not body:
            return "the batch is empty"
        if len(body) > max_batch:
            return f"the batch has {len(body)} queries; at most {max_batch} in one request"
    out = []
    for i, item in enumerate(body if isinstance(body, list) else [body]):
        parsed = _query(item)
        if isinstance(parsed, str):
            return f"query {i}: {parsed}" if isinstance(body, list) else parsed
        out.append(parsed)
    return out


def _media_type(path: Path) -> str:
    """The media type the bytes really have (a PNG saved as .jpg is still image/png)."""
    with path.open("rb") as fh:
        head = fh.read(12)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return next((t for magic, t in MEDIA_TYPES.items() if head.startswith(magic)), "application/octet-stream")


class Turns:
    """A lock handed over in the order it was asked for: a batch that takes it once per query lets a
    request that arrived meanwhile in after its current query (a plain lock lets the batch take it straight
    back, however long the other waits)."""

    def __init__(self):
        self._changed = threading.Condition()
        self._queue: deque[object] = deque()
        self._held = False

    def __enter__(self) -> None:
        me = object()
        with self._changed:
            self._queue.append(me)
            self._changed.wait_for(lambda: not self._held and self._queue[0] is me)
            self._queue.popleft()
            self._held = True

    def __exit__(self, *exc: object) -> None:
        with self._changed:
            self._held = False
            self._changed.notify_all()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"message": safe(message), "statusCode": status}, status_code=status)


def _text_results(text, q: str, num: int) -> dict:
    """Serper's /search answer for one query."""
    from ..tools.local import snippet

    hits = text.search_records(q, num)
    organic = [{"title": row.get("title", ""), "link": row.get("url", "") or f"gateway://doc/{row['id']}",
                "snippet": snippet(row.get("text", "")), "position": i + 1} for i, (_, row) in enumerate(hits)]
    return {"searchParameters": {"q": q, "num": num, "type": "search", "engine": "genevolve-gateway"}, "organic": organic}


def _image_results(images, base: str, q: str, num: int, api_key: str | None = None) -> dict:
    """Serper's /images answer for one query; pictures are served by id under ``base``/files/ (with a
    signature when the gateway has a key, so a client can fetch them as plain URLs)."""
    from PIL import Image

    rows = []
    for _, row in images.search_records(q, num):
        try:
            with Image.open(row["local_path"]) as im:
                w, h = im.size
        except OSError:
            continue
        path = f"/files/{quote(str(row['id']), safe='')}"
        url = base + path + (f"?sig={sign(api_key, '/files/' + str(row['id']))}" if api_key else "")
        rows.append({"title": row.get("title", ""), "imageUrl": url, "imageWidth": w, "imageHeight": h,
                     "thumbnailUrl": url, "source": "genevolve-gateway", "link": url, "position": len(rows) + 1})
    return {"searchParameters": {"q": q, "num": num, "type": "images", "engine": "genevolve-gateway"}, "images": rows}


def _signed_file(api_key: str):
    """Lets a request through the key check when it is GET /files/<id>?sig=<that id's signature>."""

    def signed(scope: dict) -> bool:
        path = scope.get("path", "")
        if scope.get("method") not in ("GET", "HEAD") or not path.startswith("/files/"):
            return False
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("sig", [""])[0]
        return check_signature(api_key, path, given)
    return signed


def build_gateway_app(store: str | Path, embedder=None, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                      max_batch: int = MAX_BATCH) -> FastAPI:
    """The gateway over one store. Bodies over ``max_body_bytes`` get 413 and batches over ``max_batch``
    queries 400, before any search runs. With ``api_key`` every route needs ``X-API-KEY``; the image URLs
    in /images answers carry a signature instead, each good for its one picture."""
    from ..tools.local import LocalImageSearch, LocalTextSearch, read_rows

    store = Path(store)
    for name in ("corpus.jsonl", "refs.jsonl"):
        if not (store / name).exists():
            raise FileNotFoundError(f"{store} is not a store: {name} is missing (build one with `genevolve index`)")
    text, images = LocalTextSearch(store, embedder), LocalImageSearch(store, embedder)
    app = FastAPI(title=f"genevolve gateway: {store}", docs_url=None, redoc_url=None)  # those pages load a CDN
    by_id: dict[str, dict] = {}

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:  # 404, 405: in Serper's error shape
        return _error(exc.status_code, str(exc.detail))

    searching = Turns()

    def answer(one, q: str, num: int) -> dict:
        with searching:  # one search at a time, off the event loop: the server keeps accepting and answering
            return one(q, num)

    async def run(request: Request, one) -> Any:
        body, why = read_json(await request.body())
        queries = _queries(body, max_batch) if why is None else why
        if isinstance(queries, str):
            return _error(400, f"invalid query: {queries}")
        out = [await run_in_threadpool(answer, one, q, num) for q, num in queries]  # the turn is given up between queries
        return out if isinstance(body, list) else out[0]

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "store": str(store)}

    @app.post("/search")
    async def search(request: Request) -> Any:
        return await run(request, lambda q, num: _text_results(text, q, num))

    @app.post("/images")
    async def image_search(request: Request) -> Any:
        base = str(request.base_url).rstrip("/")
        return await run(request, lambda q, num: _image_results(images, base, q, num, api_key))

    @app.get("/files/{ref_id}")
    def files(ref_id: str) -> Any:
        # Looked up by id in refs.jsonl, never by path: nothing outside the store can be served.
        if not by_id:
            by_id.update({str(r["id"]): r for r in read_rows(store / "refs.jsonl", ("id", "file"))})
        row = by_id.get(ref_id)
        if row is None:
            return _error(404, f"no image {ref_id!r}")
        path = (store / row["file"]).resolve()
        if store.resolve() not in path.parents or not path.is_file():
            return _error(404, f"image {ref_id!r} is missing from the store")
        return FileResponse(path, media_type=_media_type(path), headers={"X-Content-Type-Options": "nosniff"})

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, answer=_error)
    if api_key:  # added last, so it runs first: a request without the key is refused before anything is parsed
        app.add_middleware(ApiKey, key=api_key, answer=_error, max_bytes=max_body_bytes, signed=_signed_file(api_key))
    return app


def run_gateway(store: str | Path, host: str = "127.0.0.1", port: int = 8200, api_key: str | None = None,
                log_level: str = "warning") -> None:
    app = build_gateway_app(store, api_key=api_key)
    if not is_loopback(host):
        print(f"warning: gateway on {host}:{port} is reachable from other machines"
              + ("" if api_key else " with no API key"), file=sys.stderr)
    serve_until_stopped(app, host, port, log_level)
