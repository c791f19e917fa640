"""``genevolve render-service``: any of our generators behind the render-service protocol.

    POST /generate  {"prompt": str, "image_urls": [data URIs], "seed": int (optional)}
    -> 200 {"success": true, "image": "<base64 PNG>", "seconds": float}
    -> 4xx/5xx {"success": false, "error": "..."}

One generator, one device: renders run one at a time under a lock. Only ``data:`` URIs are
accepted for references (the server never fetches URLs). There is no authentication, so the
server binds to loopback unless told otherwise.
"""

from __future__ import annotations

import base64
import io
import sys
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..generators.render_service import decode_image

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other services' knobs (width, steps, ...) are accepted and ignored

    prompt: str
    image_urls: list[str] = Field(default_factory=list)
    seed: int = 0


def _fail(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"success": False, "error": message})


def build_render_app(generator, max_refs: int = 4) -> FastAPI:
    app = FastAPI(title=f"genevolve render-service: {generator.name}")
    lock = threading.Lock()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body')}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return _fail(400, "invalid request: " + "; ".join(parts))

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "generator": generator.name}

    @app.post("/generate")
    def generate(req: GenerateRequest) -> Any:
        if len(req.image_urls) > max_refs:
            return _fail(400, f"{len(req.image_urls)} image_urls; at most {max_refs}")
        refs = []
        for i, url in enumerate(req.image_urls):
            if not url.startswith("data:"):
                return _fail(400, f"image_urls[{i}] is not a data: URI (this server does not fetch URLs)")
            try:
                refs.append(decode_image(url))
            except ValueError as exc:
                return _fail(400, f"image_urls[{i}]: {exc}")
        t0 = time.monotonic()
        with lock:
            try:
                image = generator.generate(req.prompt, refs, seed=req.seed)
            except Exception as exc:  # reported to the client; the server keeps serving
                return _fail(500, f"generation failed: {type(exc).__name__}: {exc}")
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        return {"success": True, "image": base64.b64encode(buf.getvalue()).decode("ascii"),
                "seconds": round(time.monotonic() - t0, 3), "generator": generator.name}

    return app


def run_render_server(generator, host: str = "127.0.0.1", port: int = 8100, log_level: str = "warning") -> None:
    import uvicorn

    if host not in LOOPBACK_HOSTS:
        print(f"warning: render service on {host}:{port} is reachable from other machines with no authentication",
              file=sys.stderr)
    uvicorn.run(build_render_app(generator), host=host, port=port, log_level=log_level)
