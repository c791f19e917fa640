"""The render service's front door: every field checked, limits before work, true sizes and media types."""

from __future__ import annotations

import base64
import inspect
import io
import json
import struct
import zlib

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from genevolve.generators.render_service import image_to_data_uri
from genevolve.serving import render
from genevolve.serving.render import build_render_app

from _loopback import serve_app


class Counting:
    """A generator that records its calls; with ``sized`` it has width/height settings, as diffusers backends do."""

    def __init__(self, sized: bool = False):
        self.name, self.calls = ("sized" if sized else "fixed"), []
        if sized:
            self.width, self.height = None, None

    def generate(self, prompt, references=(), seed=0):
        self.calls.append((prompt, len(references), seed))
        size = (self.width or 96, self.height or 80) if hasattr(self, "width") else (120, 140)
        return Image.new("RGB", size, "teal")


def _png_header(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels (IHDR and one empty IDAT): enough for PIL to read its size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="BMP")
    return buf.getvalue()


def _uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


TINY = image_to_data_uri(Image.new("RGB", (4, 4), "red"))
BAD_BODIES = [
    (b'{"prompt": "a flag", "seed": Infinity}', "not a number"), (b'{"prompt": "a flag", "seed": NaN}', "not a number"),
    (b'{"prompt": "a flag", "seed": 1e400}', "out of range"), (b'{"prompt": "a flag", "seed": 2.0}', "seed"),
    (b'{"prompt": "a flag", "seed": 99999999999999999999999}', "seed: Input should be less than"),
    (b'{"prompt": "a flag", "seed": "3"}', "seed"), (b'{"prompt": "a flag", "seed": true}', "seed"),
    (b'{"prompt": "a \\ud800 flag"}', "lone surrogate"), (b'{"prompt": "a\\u0007flag"}', "control character (U+0007)"),
    (b'{"prompt": "   "}', "blank"), (b'{"prompt": ""}', "prompt"), (b'{"prompt": 5}', "prompt: Input should be a valid string"),
    (b'{"prompt": "%s"}' % (b"x" * 10001), "at most 10000 characters"), (b'{"seed": 1}', "prompt: Field required"),
    (b'{"prompt": "a flag", "image_urls": "data:x"}', "image_urls"), (b'{"prompt": "a flag", "image_urls": [1]}', "image_urls.0"),
    (b'{"prompt": "a flag", "width": 63}', "width: 63 is outside 64-1024"), (b'{"prompt": "a flag", "height": 1025}', "height"),
    (b'{"prompt": "a flag", "width": -512}', "width"), (b'{"prompt": "a flag", "width": 512.0}', "width"),
    (b'{"prompt": "a flag", "height": Infinity}', "not a number"), (b'{"prompt": "a flag", "steps": NaN}', "not a number"),
    (b'["a flag"]', "JSON object"), (b"null", "JSON object"), (b"", "empty"), (b'{"prompt": ' + b"[" * 50000, "nested too deeply"),
    (b'{"prompt": "\xff"}', "not valid JSON"), (b"{not json", "not valid JSON"),
]


@pytest.fixture
def gen():
    return Counting()


def test_every_field_is_checked_before_any_render(gen):
    client = TestClient(build_render_app(gen))
    for body, words in BAD_BODIES:
        r = client.post("/generate", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["success"] is False and words in r.json()["error"], (body[:50], r.text[:300])
    assert not gen.calls
    ok = client.post("/generate", json={"prompt": "Ein Leuchtturm 灯台 🗼 at night\n", "seed": -7, "steps": 4, "width": 1024})
    assert ok.status_code == 200 and gen.calls == [("Ein Leuchtturm 灯台 🗼 at night\n", 0, -7)]


def test_references_are_data_uris_at_most_four_and_never_bombs(gen):
    client = TestClient(build_render_app(gen))
    refused = {
        "http://127.0.0.1:1/a.png": "is not a data: URI (this server does not fetch URLs)",
        "file:///etc/passwd": "is not a data: URI", "data:image/png,rawbytes": "is not a base64 data: URI",
        "data:image/png;base64,@@@": "is not valid base64", "data:image/png;base64,AAAA": "not a readable image",
        "data:image/png;base64,": "image_urls[1] is empty",
        _uri(_png_header(20000, 20000)): "not a readable image (DecompressionBombError)",
        _uri(_png_header(5000, 20)): "at most 4096 a side", _uri(_png_header(4090, 4000)): "16 megapixels",
        _uri(_bmp(), "image/bmp"): "BMP files are not accepted",
    }
    for url, words in refused.items():
        r = client.post("/generate", json={"prompt": "a flag", "image_urls": [TINY, url]})
        assert r.status_code == 400 and "image_urls[1]" in r.json()["error"] and words in r.json()["error"], (url[:40], r.text)
    r = client.post("/generate", json={"prompt": "a flag", "image_urls": ["not even a URI"] * 5})
    assert r.status_code == 400 and "5 image_urls; at most 4" in r.json()["error"]  # counted before anything is decoded
    assert not gen.calls
    assert client.post("/generate", json={"prompt": "a flag", "image_urls": [TINY] * 4}).status_code == 200
    assert gen.calls == [("a flag", 4, 0)]


def test_a_big_body_gets_413_not_a_reset_connection(gen):
    assert inspect.signature(build_render_app).parameters["max_body_bytes"].default == 32 * 1024 * 1024
    with serve_app(build_render_app(gen, max_body_bytes=1024 * 1024)) as url:
        big = json.dumps({"prompt": "a flag", "image_urls": [TINY + "A" * (2 * 1024 * 1024)]}).encode()
        r = httpx.post(f"{url}/generate", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json() == {"success": False, "error": "the request body is over 1048576 bytes (the server's limit)"}
        r = httpx.post(f"{url}/generate", content=(b" " * 65536 for _ in range(32)))  # streamed, no Content-Length
        assert r.status_code == 413
        assert httpx.post(f"{url}/generate", json={"prompt": "a flag"}).status_code == 200
    assert gen.calls == [("a flag", 0, 0)]


def test_the_requested_size_is_honoured_or_the_fixed_size_is_said(world):
    sized = Counting(sized=True)
    r = TestClient(build_render_app(sized)).post("/generate", json={"prompt": "a flag", "width": 512, "height": 256}).json()
    assert (r["width"], r["height"], r["fixed_size"]) == (512, 256, False) and "note" not in r
    assert Image.open(io.BytesIO(base64.b64decode(r["image"]))).size == (512, 256)
    assert (sized.width, sized.height) == (None, None)  # the generator's own settings are back
    client = TestClient(build_render_app(world.generator))
    r = client.post("/generate", json={"prompt": "a red circle in the center", "width": 512, "height": 512}).json()
    assert (r["width"], r["height"], r["fixed_size"]) == (120, 140, True)
    assert r["note"] == f"{world.generator.name} draws at a fixed 120x140; 512x512 was asked for"
    assert "note" not in client.post("/generate", json={"prompt": "a red circle in the center"}).json()


def test_the_image_is_labelled_with_its_true_media_type(world):
    r = TestClient(build_render_app(world.generator)).post("/generate", json={"prompt": "a red circle"}).json()
    raw = base64.b64decode(r["image"])
    assert r["media_type"] == "image/png" and raw[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(raw)).format == "PNG"


def test_no_docs_pages_that_load_a_cdn_and_errors_keep_the_protocol(gen):
    client = TestClient(build_render_app(gen))
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/docs").json() == {"success": False, "error": "Not Found"}
    schema = client.get("/openapi.json").json()["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]
    assert {"prompt", "image_urls", "seed", "width", "height"} <= set(schema["schema"]["properties"])
    assert client.get("/generate").json()["success"] is False  # 405, in the protocol's shape


def test_loopback_by_default(gen, monkeypatch, capsys):
    from genevolve.cli.serving import gateway, render_service
    from genevolve.serving.gateway import run_gateway

    for fn in (render.run_render_server, run_gateway):
        assert inspect.signature(fn).parameters["host"].default == "127.0.0.1"
    for cmd in (render_service, gateway):
        assert inspect.signature(cmd).parameters["host"].default.default == "127.0.0.1"
    started = []
    monkeypatch.setattr(render, "serve_until_stopped", lambda app, host, port, log_level="warning": started.append({"host": host}))
    render.run_render_server(gen)
    assert started[-1]["host"] == "127.0.0.1" and capsys.readouterr().err == ""
    render.run_render_server(gen, host="0.0.0.0")
    assert "reachable from other machines with no authentication" in capsys.readouterr().err


def test_fuzzed_bodies_never_get_a_500(world):
    """Malformed bodies of every shape against the sandbox generator: always an answer, never a server error."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    client = TestClient(build_render_app(world.generator))
    text = st.text(st.characters(categories=["Cs", "Cc", "Ll", "Lo", "Nd", "Zs", "So", "Po"]), max_size=16)
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | text
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=8)
    urls = st.sampled_from([TINY, "data:image/png;base64,AAAA", _uri(_png_header(20000, 20000)), "http://x/y.png"]) | text
    request = st.fixed_dictionaries({"prompt": text | values}, optional={
        "seed": st.integers() | values, "image_urls": st.lists(urls, max_size=5) | values,
        "width": st.integers(0, 2048) | values, "height": st.integers(0, 2048) | values})
    bodies = (values | request).map(lambda v: json.dumps(v).encode()) | st.binary(max_size=64)

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies)
    def check(body):
        r = client.post("/generate", content=body, headers={"content-type": "application/json"})
        assert r.status_code in (200, 400), (body, r.status_code, r.text[:300])
        assert r.json()["success"] is (r.status_code == 200)

    check()
