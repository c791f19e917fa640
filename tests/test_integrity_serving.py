"""Integrity of what the project serves: the studio's login (who is counted, how much is read), model output
that reaches HTML, and bounds on the render service, the policy client and the gateway."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html.parser
import importlib.metadata
import io
import json
import os
import socket
import socketserver
import struct
import threading
import time
import zlib

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from _loopback import serve_app

# ---------------------------------------------------------------------------
# 1. The login throttle counts the connection's address, not a header anyone can write
# ---------------------------------------------------------------------------


def _login_app():
    """A stand-in for Gradio's /login: 200 for the password "right", else 400."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    calls = []

    async def login(request: Request):
        form = await request.form()
        calls.append(form.get("username"))
        ok = form.get("password") == "right"
        return JSONResponse({"success": True} if ok else {"detail": "Incorrect credentials."}, status_code=200 if ok else 400)
    app = Starlette(routes=[Route("/login", login, methods=["POST"])])
    app.state.calls = calls
    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_studio(monkeypatch, tmp_path):
    """``launch`` made to serve a one-line page instead of the studio (the login and its middleware are the same)."""
    import types

    import gradio as gr

    import studio.app

    def build_app(services):
        with gr.Blocks() as page:
            gr.Markdown("studio")
        return page
    monkeypatch.setattr(studio.app, "build_app", build_app)
    return types.SimpleNamespace(world=types.SimpleNamespace(root=tmp_path, refs_root=tmp_path), runs_dir=tmp_path)


def _logins(port: int, passwords_and_addresses) -> list[int]:
    return [httpx.post(f"http://127.0.0.1:{port}/login", headers={"X-Forwarded-For": address},
                       files={"username": (None, "me"), "password": (None, password)}).status_code
            for password, address in passwords_and_addresses]


def test_forwarded_for_is_believed_only_from_a_named_proxy(monkeypatch, tmp_path):
    from studio.app import launch

    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    services = _tiny_studio(monkeypatch, tmp_path)
    port = _free_port()
    app = launch(services, port=port, password="s3cret", block=False)
    try:  # a new X-Forwarded-For each time changes nothing: the connection comes from 127.0.0.1
        assert _logins(port, [("guess", f"203.0.113.{i}") for i in range(7)]) == [400] * 5 + [429] * 2
    finally:
        app.close()
    assert "FORWARDED_ALLOW_IPS" not in os.environ  # put back as it was
    port = _free_port()
    app = launch(services, port=port, password="s3cret", block=False, forwarded_allow_ips="127.0.0.1")
    try:  # behind a proxy on this machine: the address it forwards is the one counted
        assert _logins(port, [("guess", "203.0.113.1")] * 6) == [400] * 5 + [429]
        assert _logins(port, [("s3cret", "203.0.113.2")]) == [200]
    finally:
        app.close()


class _Recorder:
    def __init__(self, calls):
        self.calls = calls

    def load(self):
        return lambda **kw: self.calls.append(kw)


def test_the_studio_command_names_the_trusted_proxies(monkeypatch):
    from genevolve.cli import app as cli

    calls, real = [], importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [_Recorder(calls)] if kw.get("group") == "genevolve.apps" else real(**kw))
    assert CliRunner().invoke(cli, ["studio"]).exit_code == 0 and calls[-1]["forwarded_allow_ips"] is None
    r = CliRunner().invoke(cli, ["studio", "--forwarded-allow-ips", "10.0.0.1,10.1.0.0/16"])
    assert r.exit_code == 0 and calls[-1]["forwarded_allow_ips"] == "10.0.0.1,10.1.0.0/16"
    monkeypatch.setattr(importlib.metadata, "entry_points", real)  # the real studio: refused before anything loads
    r = CliRunner().invoke(cli, ["studio", "--no-demo", "--forwarded-allow-ips", "proxy.lan"])
    assert r.exit_code == 2 and r.stderr.startswith("error: --forwarded-allow-ips: 'proxy.lan' is not an IP address")
    from studio.app import check_proxies

    assert check_proxies(" 10.0.0.1 , ::1 ") == "10.0.0.1,::1" and check_proxies(None) == ""
    with pytest.raises(ValueError, match="'proxy.lan' is not an IP address or network"):
        check_proxies("10.0.0.1,proxy.lan")
    with pytest.raises(ValueError, match="'\\*' would believe X-Forwarded-For from anyone"):
        check_proxies("*")


# ---------------------------------------------------------------------------
# 2. A login body is capped before it is read
# ---------------------------------------------------------------------------


def test_a_huge_login_body_gets_413_before_it_is_read():
    from studio.app import BLANK_USER, BlankUserName, LoginThrottle

    inner = _login_app()
    app = BlankUserName(LoginThrottle(inner))
    sent = []

    async def stream(n_chunks: int):
        for _ in range(n_chunks):
            sent.append(1)
            yield b"x" * 65536

    async def scenario():
        transport = httpx.ASGITransport(app=app, client=("10.0.0.1", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://studio") as c:
            declared = await c.post("/login", content=b"password=" + b"x" * (1 << 20),
                                    headers={"content-type": "application/x-www-form-urlencoded"})
            assert declared.status_code == 413 and "the request body is over 16384 bytes" in declared.json()["detail"]
            counted = await c.post("/login", content=stream(320), headers={"content-type": "application/x-www-form-urlencoded"})
            assert counted.status_code == 413 and "Content-Length" not in counted.request.headers
            assert (await c.post("/login", data={"username": " ", "password": "right"})).json()["detail"] == BLANK_USER
            assert (await c.post("/login", files={"username": (None, "me"), "password": (None, "right")})).status_code == 200

    t0 = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - t0 < 3 and inner.state.calls == ["me"]  # the big ones never reached the login


# ---------------------------------------------------------------------------
# 3. Model output reaching HTML is escaped
# ---------------------------------------------------------------------------

EVIL = "<script>alert(1)</script> and <img src=x onerror=alert(1)> <a href=\"javascript:alert(1)\">x</a>"


class _Live(html.parser.HTMLParser):
    """Every element a browser would run or fire: script tags, on* attributes, javascript: URLs."""

    def __init__(self, text: str):
        super().__init__()
        self.found: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.found.append(tag)
        for name, value in attrs:
            if name.startswith("on") or (value or "").strip().lower().startswith("javascript:"):
                self.found.append(f"{tag} {name}={value}")


def _evil_trajectory(tid: str, rid: str = "bench-1", text: str = "Draw the flag"):
    from genevolve.records.schema import ImageRef, Observation, Program, ProgramRef, ToolCall, Trajectory, Turn

    images = [ImageRef(img_id="IMG_001", title=EVIL, local_path="/nonexistent.png")]
    program = Program(gen_prompt=f"A flag {EVIL}", reference_images=[ProgramRef(img_id="IMG_001", note=EVIL)], issues=[EVIL])
    turns = [Turn(index=0, raw=EVIL, think=EVIL, tool_call=ToolCall(name="image_search", arguments={"query": EVIL}),
                  observation=Observation(tool="image_search", text=EVIL * 20, images=images, error=EVIL)),
             Turn(index=1, raw=EVIL, error=EVIL),
             Turn(index=2, raw=f"<answer>{EVIL}</answer>", answer=program)]
    return Trajectory(id=tid, request_id=rid, request_text=text, turns=turns, images=images, program=program,
                      termination="answer")


def test_model_output_in_report_html_is_escaped(world, tmp_path):
    from genevolve.evaluation.bench import aggregate, over_seeds
    from genevolve.evaluation.report_html import write_report_html
    from genevolve.evaluation.report import write_examples
    from genevolve.records.schema import ImageStore, Verdict

    reqs = world.split("bench")[:2]
    results = {}
    for name, k in (("before", 0.2), ("after", 0.7)):
        records, pairs = [], []
        for r in reqs:
            v = Verdict(trajectory_id=f"{name}-{r.id}", request_id=r.id, F=1.0, V=k, A=k, kscore=k, r_text=k, reward=k,
                        rationale=EVIL)
            records.append({"seed": 0, "sample": 0, "request": r.id, "verdict": v,
                            "trajectory": _evil_trajectory(v.trajectory_id, r.id, r.text)})
            pairs.append((r, v))
        results[name] = {"summary": over_seeds({0: aggregate(pairs)}, ("overall", "track")), "records": records,
                         "store": ImageStore(tmp_path / "images")}
    md = write_examples(world, results, tmp_path)
    assert EVIL in md  # the Markdown keeps what the model wrote
    (tmp_path / "report.md").write_text(f"# Report\n\n{md}\n\n<details><summary>every setting</summary>\n\n```json\n"
                                        f"{json.dumps({'prompt': EVIL})}\n```\n\n</details>\n", "utf-8")
    page = write_report_html(tmp_path / "report.md").read_text("utf-8")
    assert _Live(page).found == []
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown as text
    assert "<details><summary>every setting</summary>" in page and '<img src="data:image/png;base64,' in page


def test_model_output_in_the_studio_views_is_escaped():
    from genevolve.records.schema import Request, Verdict
    from studio.html import columns_html, diff_html, token_gap_html, trajectory_column, turns_table

    a, b = _evil_trajectory("t-a"), _evil_trajectory("t-b")
    b.turns[0].tool_call.arguments = {"query": EVIL + " other"}
    verdicts = {"t-a": Verdict(trajectory_id="t-a", request_id="bench-1", reward=0.9, kscore=0.9, rationale=EVIL),
                "t-b": Verdict(trajectory_id="t-b", request_id="bench-1", reward=0.1, kscore=0.1, failed=EVIL)}
    req = Request(id="bench-1", text=EVIL)
    pages = [columns_html(req, [a, b], verdicts, lambda h: None, titles={"t-a": EVIL}),
             trajectory_column(a, verdicts["t-a"], lambda h: None, mark="best", title=EVIL, badge=EVIL),
             diff_html(a, b, verdicts["t-a"], verdicts["t-b"], labels=(EVIL, EVIL), turns=True),
             turns_table(a, b, (EVIL, EVIL), 0),
             token_gap_html([{"t": EVIL, "a": 0}, {"t": EVIL, "a": 1, "p": -1.0, "q": -0.5}, {"t": EVIL, "a": 1, "p": -1.0}])]
    for page in pages:
        assert _Live(page).found == [] and "&lt;script&gt;" in page


# ---------------------------------------------------------------------------
# 4. The render service bounds the pixels of a request and the decodes in flight
# ---------------------------------------------------------------------------


def _png_claiming(w: int, h: int) -> str:
    """A data URI of a PNG whose header claims w x h pixels (all zeros, a few hundred bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(raw).decode()


class _Flat:
    name = "flat"

    def __init__(self):
        self.calls = 0

    def generate(self, prompt, references=(), seed=0):
        self.calls += 1
        return Image.new("RGB", (8, 8), "teal")


def test_render_service_refuses_too_many_pixels_from_the_headers(monkeypatch):
    from genevolve.generators.render_service import image_to_data_uri
    from genevolve.serving.render import build_render_app
    from genevolve.tools import refstore

    decoded = []
    real = refstore.check_image
    monkeypatch.setattr(refstore, "check_image", lambda raw: decoded.append(len(raw)) or real(raw))
    gen = _Flat()
    client = TestClient(build_render_app(gen))
    r = client.post("/generate", json={"prompt": "a flag", "image_urls": [_png_claiming(4000, 4000)] * 4})
    assert r.status_code == 413 and r.json()["success"] is False
    assert r.json()["error"] == ("the references are too large: 64.0 megapixels in all, at most 16 in one request; "
                                 "send smaller pictures")
    assert decoded == [] and gen.calls == 0  # refused from the headers: nothing was decoded
    tiny = image_to_data_uri(Image.new("RGB", (4, 4), "red"))
    assert client.post("/generate", json={"prompt": "a flag", "image_urls": [tiny] * 4}).status_code == 200


def test_render_service_decodes_a_bounded_number_at_once(monkeypatch):
    from genevolve.serving import render

    inside, go = threading.Event(), threading.Event()
    real = render._parse

    def slow(*args):
        inside.set()
        go.wait(5)
        return real(*args)
    monkeypatch.setattr(render, "_parse", slow)
    client = TestClient(render.build_render_app(_Flat(), max_decodes=1, decode_wait_s=0.2))
    first: list = []
    worker = threading.Thread(target=lambda: first.append(client.post("/generate", json={"prompt": "a flag"})))
    worker.start()
    try:
        assert inside.wait(5)
        busy = client.post("/generate", json={"prompt": "a flag"})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy decoding" in busy.json()["error"]
    finally:
        go.set()
        worker.join(5)
    assert first[0].status_code == 200
    assert client.post("/generate", json={"prompt": "a flag"}).status_code == 200  # the slot was given back


def test_the_render_client_sends_references_that_fit_and_refuses_huge_answers():
    from genevolve.generators import GeneratorError
    from genevolve.generators.render_service import RenderServiceGenerator, decode_image

    sent = []

    def handler(request):
        sent.append(json.loads(request.content)["image_urls"])
        return httpx.Response(200, json={"success": True, "image": _png_claiming(5000, 4000).partition(",")[2]})
    gen = RenderServiceGenerator("http://127.0.0.1:1", transport=httpx.MockTransport(handler), max_retries=0, backoff=0)
    with pytest.raises(GeneratorError, match="'image' is a 5000x4000 picture, over 16 megapixels"):
        gen.generate("a flag", [Image.new("RGB", (2400, 2000), "red")])
    with Image.open(io.BytesIO(base64.b64decode(sent[0][0].partition(",")[2]))) as im:
        assert im.width * im.height <= 4_000_000 and abs(im.width / im.height - 1.2) < 0.01
    with pytest.raises(ValueError, match="a 20x10 picture, over 0.0001 megapixels"):
        decode_image(_png_claiming(20, 10), max_pixels=100)  # refused from the header, before decoding


# ---------------------------------------------------------------------------
# 5. The policy client: --timeout bounds the whole request, and the answer read is capped
# ---------------------------------------------------------------------------

ANSWER = json.dumps({"choices": [{"message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}]}).encode()


@contextlib.contextmanager
def _bad_server(kind: str):
    """A loopback HTTP server that trickles its answer (``head``: from the status line on, ``body``: after the
    headers) one byte every 50 ms, or sends a 100 MB one (``huge``); yields (url, bytes sent so far)."""
    sent = [0]

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            data = b""
            while b"\r\n\r\n" not in data:
                data += self.request.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            while len(body) < length:
                body += self.request.recv(65536)
            size = 100_000_000 if kind == "huge" else len(ANSWER)
            start = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size
            with contextlib.suppress(OSError):
                if kind == "huge":
                    self.request.sendall(start)
                    while sent[0] < size:
                        self.request.sendall(b" " * 65536)
                        sent[0] += 65536
                    return
                if kind == "body":
                    self.request.sendall(start)
                for byte in (start if kind == "head" else b"") + ANSWER:
                    self.request.sendall(bytes([byte]))
                    sent[0] += 1
                    time.sleep(0.05)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", sent
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kind", ["body", "head"])
def test_the_timeout_bounds_a_server_that_trickles_its_answer(kind):
    from genevolve.policies.base import SamplingParams
    from genevolve.policies.openai_compat import OpenAIChatPolicy

    with _bad_server(kind) as (url, sent), OpenAIChatPolicy(url, "m", timeout=1.0, max_retries=0, backoff=0) as pol:
        t0 = time.monotonic()
        out = pol.generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=8))[0]
        took = time.monotonic() - t0
    assert out.finish_reason == "error" and "no complete answer within 1 s" in out.error, out.error
    assert 0.9 < took < 3.0, took  # the whole answer would take over 5 s


def test_a_huge_answer_is_not_read_past_the_cap():
    from genevolve.policies.base import SamplingParams
    from genevolve.policies.openai_compat import OpenAIChatPolicy

    params = SamplingParams(max_new_tokens=8)
    with _bad_server("huge") as (url, sent), OpenAIChatPolicy(url, "m", timeout=30, max_retries=0, backoff=0) as pol:
        out = pol.generate([[{"role": "user", "content": "hi"}]], params)[0]
        time.sleep(0.2)
        assert out.finish_reason == "error" and "the answer is over 1048576 bytes" in out.error, out.error
        assert sent[0] < 20_000_000  # the rest of the 100 MB was never read


# ---------------------------------------------------------------------------
# 6. The gateway: a big /images batch does not hold up a /search
# ---------------------------------------------------------------------------


def test_a_search_is_answered_while_a_big_image_batch_runs(tmp_path, monkeypatch):
    from genevolve.serving import gateway
    from genevolve.tools.embed import HashEmbedder

    for name in ("corpus.jsonl", "refs.jsonl"):
        (tmp_path / name).write_text("", "utf-8")

    def slow_images(images, base, q, num, api_key=None):
        time.sleep(0.05)
        return {"searchParameters": {"q": q, "num": num, "type": "images"}, "images": []}
    monkeypatch.setattr(gateway, "_image_results", slow_images)
    monkeypatch.setattr(gateway, "_text_results", lambda text, q, num: {"searchParameters": {"q": q}, "organic": []})
    done: dict[str, float] = {}
    with serve_app(gateway.build_gateway_app(tmp_path, embedder=HashEmbedder())) as url:
        def batch():
            r = httpx.post(f"{url}/images", json=[{"q": f"flag {i}", "num": 100} for i in range(40)], timeout=30)
            assert r.status_code == 200 and len(r.json()) == 40
            done["batch"] = time.monotonic()
        worker = threading.Thread(target=batch)
        t0 = time.monotonic()
        worker.start()
        time.sleep(0.3)
        r = httpx.post(f"{url}/search", json={"q": "lighthouse"}, timeout=30)
        done["search"] = time.monotonic()
        worker.join(30)
    assert r.status_code == 200 and r.json()["searchParameters"]["q"] == "lighthouse"
    assert done["search"] < done["batch"] and done["search"] - t0 < 1.5, (done, t0)
