"""``genevolve render-service``: any of our generators behind the render-service protocol.

    POST /generate  {"prompt": str, "image_urls": [data URIs], "seed": int, "width": int, "height": int}
    -> 200 {"success": true, "image": "<base64>", "media_type": "image/png", "width": int, "height": int,
            "fixed_size": bool, "note": str (when the requested size was not applied), "seconds": float}
    -> 4xx/5xx {"success": false, "error": "..."}

Every field is checked before any work: ``prompt`` is clean text (no lone surrogates or control
characters) of at most 10,000 characters; ``seed`` an integer a torch generator takes; ``width`` and
``height`` (optional) whole numbers from 64 to 1024; at most 4 ``image_urls``, each a base64 ``data:``
URI of a PNG, JPEG, GIF or WebP picture of at most 4096 pixels a side and 16 megapixels (the server
never fetches URLs, and a decompression bomb is refused before it is decoded). A body over 32 MB gets
413, and so do references of more than 16 megapixels in all (their sizes are read from the pictures'
headers before any is decoded); anything else malformed gets 400 with a message. At most 2 requests
decode their references at once; one that waits 30 s for its turn gets 503 with Retry-After. Other
services' knobs (steps, ...) are accepted and ignored. A generator with ``width``/``height`` settings
renders at the requested size; one with a fixed size (the sandbox's) says so in ``fixed_size`` and ``note``.

One generator, one device: renders run one at a time under a lock. There is no authentication, so
the server binds to loopback unless told otherwise; it serves no interactive docs pages (they load
scripts from a CDN), /openapi.json stays.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import sys
import threading
import time
import warnings
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .guard import BodyLimit, is_loopback, read_json, safe, serve_until_stopped, text_problem

MAX_PROMPT_CHARS = 10_000
MAX_BODY_BYTES = 32 * 1024 * 1024
SIDES = (64, 1024)
MAX_REQUEST_PIXELS = 16_000_000  # a request's references together (each also within the reference store's bounds)
MAX_DECODES = 2  # requests decoding references at once: a decoded picture costs 3-4 bytes a pixel, several times over
DECODE_WAIT_S = 30.0


class Refused(Exception):
    """A request answered with ``status`` and ``message`` before any render."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # strict: 5.0, "5" and true are not integers

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    image_urls: list[str] = Field(default_factory=list)
    seed: int = Field(0, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    width: int | None = None
    height: int | None = None

    @field_validator("prompt", mode="before")  # before: pydantic's own message for a lone surrogate is obscure
    @classmethod
    def _clean(cls, prompt: Any) -> Any:
        if not isinstance(prompt, str):
            return prompt
        if prompt and not prompt.strip():
            raise ValueError("the prompt is blank")
        if (why := text_problem(prompt)) is not None:
            raise ValueError(f"the prompt {why}")
        return prompt


def _fail(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"success": False, "error": safe(message)}, headers=headers)


def _payload(url: str) -> bytes:
    """The bytes a base64 data URI carries, or ValueError saying why not."""
    header, comma, payload = url.partition(",")
    if not header.startswith("data:"):
        raise ValueError("is not a data: URI (this server does not fetch URLs)")
    if not comma or ";base64" not in header:
        raise ValueError("is not a base64 data: URI")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"is not valid base64 ({exc})") from exc
    if not raw:
        raise ValueError("is empty")
    return raw


def _header_pixels(raw: bytes) -> int:
    """Width x height as the picture's header says, without decoding it; 0 for a picture the full check
    refuses anyway (unreadable, or over the reference store's bounds), so that check gets to say why."""
    from PIL import Image

    from ..tools.refstore import MAX_PIXELS, MAX_SIDE

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as im:
                w, h = im.size
    except Exception:  # PIL raises many types for bytes that are not a picture
        return 0
    return w * h if max(w, h) <= MAX_SIDE and w * h <= MAX_PIXELS else 0


def _refused(i: int, exc: Exception) -> Refused:
    why = str(exc).replace("upload a ", "send a ")
    return Refused(400, f"invalid request: image_urls[{i}]" + (f" {why}" if why.startswith("is ") else f": {why}"))


def _request(body: bytes, max_refs: int, sides: tuple[int, int]) -> GenerateRequest:
    """The request with every field checked (cheap checks only: nothing is decoded)."""
    value, why = read_json(body)
    if why is None and not isinstance(value, dict):
        why = "the body must be a JSON object with 'prompt'"
    if why is not None:
        raise Refused(400, f"invalid request: {why}")
    try:
        req = GenerateRequest.model_validate(value)
    except ValidationError as exc:
        why = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise Refused(400, f"invalid request: {why}") from None
    for name in ("width", "height"):
        side = getattr(req, name)
        if side is not None and not sides[0] <= side <= sides[1]:
            raise Refused(400, f"invalid request: {name}: {side} is outside {sides[0]}-{sides[1]} pixels")
    if len(req.image_urls) > max_refs:
        raise Refused(400, f"invalid request: {len(req.image_urls)} image_urls; at most {max_refs}")
    return req


def _parse(body: bytes, max_refs: int, sides: tuple[int, int],
           max_pixels: int = MAX_REQUEST_PIXELS) -> tuple[GenerateRequest, list]:
    """The request and its decoded references, or :class:`Refused` saying why not. Every picture's size is
    read from its header, and their sum checked against ``max_pixels``, before any is decoded."""
    from ..tools.refstore import RefStoreError, check_image

    req = _request(body, max_refs, sides)
    raws = []
    for i, url in enumerate(req.image_urls):
        try:
            raws.append(_payload(url))
        except ValueError as exc:
            raise _refused(i, exc) from None
    total = sum(_header_pixels(raw) for raw in raws)
    if total > max_pixels:
        raise Refused(413, f"the references are too large: {total / 1e6:.1f} megapixels in all, at most "
                           f"{max_pixels / 1e6:g} in one request; send smaller pictures")
    refs = []
    for i, raw in enumerate(raws):
        try:
            refs.append(check_image(raw))
        except RefStoreError as exc:
            raise _refused(i, exc) from None
    return req, refs


def _render(generator, req: GenerateRequest, refs: list):
    """The generator's picture, at the requested size when the generator has size settings."""
    if not (hasattr(generator, "width") and hasattr(generator, "height")) or (req.width, req.height) == (None, None):
        return generator.generate(req.prompt, refs, seed=req.seed)
    before = generator.width, generator.height
    generator.width, generator.height = req.width or before[0], req.height or before[1]
    try:
        return generator.generate(req.prompt, refs, seed=req.seed)
    finally:
        generator.width, generator.height = before


def _answer(generator, req: GenerateRequest, image, seconds: float) -> dict:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    fixed = not (hasattr(generator, "width") and hasattr(generator, "height"))
    out = {"success": True, "image": base64.b64encode(buf.getvalue()).decode("ascii"), "media_type": "image/png",
           "width": image.width, "height": image.height, "fixed_size": fixed, "seconds": round(seconds, 3),
           "generator": generator.name}
    wanted = (req.width or image.width, req.height or image.height)
    if wanted != image.size:
        out["note"] = (f"{generator.name} draws at a fixed {image.width}x{image.height}" if fixed else
                       f"{generator.name} drew {image.width}x{image.height}") + f"; {wanted[0]}x{wanted[1]} was asked for"
    return out


class DecodeSlots:
    """At most ``n`` requests decoding pictures at once. :meth:`take` waits for a turn by polling, so a
    waiting request holds no thread (the event loop of whichever server or test client calls it)."""

    def __init__(self, n: int):
        self._slots = threading.BoundedSemaphore(n)

    async def take(self, wait_s: float) -> bool:
        """True once a slot is ours; False when none came free within ``wait_s`` seconds."""
        deadline = time.monotonic() + wait_s
        while not self._slots.acquire(blocking=False):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def release(self) -> None:
        self._slots.release()


def build_render_app(generator, max_refs: int = 4, max_body_bytes: int = MAX_BODY_BYTES,
                     sides: tuple[int, int] = SIDES, max_pixels: int = MAX_REQUEST_PIXELS,
                     max_decodes: int = MAX_DECODES, decode_wait_s: float = DECODE_WAIT_S) -> FastAPI:
    """The render service over one generator: bodies over ``max_body_bytes`` and references of more than
    ``max_pixels`` in all get 413, and every field is checked (at most ``max_refs`` references, width and
    height within ``sides``) before any work. At most ``max_decodes`` requests decode at once; one that
    waits ``decode_wait_s`` for its turn gets 503."""
    app = FastAPI(title=f"genevolve render-service: {generator.name}", docs_url=None, redoc_url=None)
    lock = threading.Lock()
    decoding = DecodeSlots(max_decodes)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return _fail(exc.status_code, str(exc.detail))

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "generator": generator.name}

    def locked(req: GenerateRequest, refs: list) -> tuple[Any, float]:
        t0 = time.monotonic()
        with lock:
            return _render(generator, req, refs), time.monotonic() - t0

    schema = {"requestBody": {"required": True, "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}}}}

    @app.post("/generate", openapi_extra=schema)
    async def generate(request: Request) -> Any:
        body = await request.body()
        if not await decoding.take(decode_wait_s):
            return _fail(503, f"the server is busy decoding other requests' pictures (at most {max_decodes} at once); "
                              "try again shortly", headers={"Retry-After": "1"})
        try:
            req, refs = await run_in_threadpool(_parse, body, max_refs, sides, max_pixels)  # decoding is CPU work
        except Refused as exc:
            return _fail(exc.status, exc.message)
        finally:
            decoding.release()
        try:
            image, seconds = await run_in_threadpool(locked, req, refs)
        except Exception as exc:  # reported to the client; the server keeps serving
            return _fail(500, f"generation failed: {type(exc).__name__}: {exc}")
        return _answer(generator, req, image, seconds)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, answer=_fail)
    return app


def run_render_server(generator, host: str = "127.0.0.1", port: int = 8100, log_level: str = "warning") -> None:
    if not is_loopback(host):
        print(f"warning: render service on {host}:{port} is reachable from other machines with no authentication",
              file=sys.stderr)
    serve_until_stopped(build_render_app(generator), host, port, log_level)
