"""Test helpers: serve an ASGI app on a free loopback port in a thread; fake model servers."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time

import httpx
from fastapi import Request  # module level: FastAPI resolves the endpoint's annotation here


@contextlib.contextmanager
def serve_app(app):
    """Run ``app`` with uvicorn on 127.0.0.1:<free port>; yield its base URL; stop it afterwards."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def free_port_url() -> str:
    """A loopback URL where nothing listens (the port was free a moment ago)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def _image(url: str):
    from PIL import Image

    raw = base64.b64decode(url.split(",", 1)[1])
    with Image.open(io.BytesIO(raw)) as im:
        return im.convert("RGB")


class FakeVLM:
    """An OpenAI-compatible multimodal chat server that grades by pixels.

    KScore requests: V and A from the mean absolute difference of the two images (identical -> 1),
    F = 1, text not applicable unless the request has a quote. Sufficiency requests: 1 when the
    gen_prompt is at least 40 characters, else 0.25. WISE requests: 2/1/1. ``mode`` injects faults:
    "down" (HTTP 503), "not_json" (a body that is not JSON), "prose" (an answer with no JSON),
    "outside" (V = 0.7), "missing_key" (no V), "level_outside" (a sufficiency level of 0.6).
    """

    def __init__(self, mode: str = "ok"):
        self.mode = mode
        self.requests: list[dict] = []

    def answer(self, body: dict) -> str:
        msgs = body["messages"]
        system = msgs[0]["content"] if isinstance(msgs[0]["content"], str) else ""
        parts = msgs[-1]["content"]
        texts = [p["text"] for p in parts if p.get("type") == "text"] if isinstance(parts, list) else [parts]
        images = [_image(p["image_url"]["url"]) for p in parts if p.get("type") == "image_url"] if isinstance(parts, list) else []
        if self.mode == "prose":
            return "The image looks fine to me."
        if "You compare two attempts" in "".join(texts):
            return json.dumps({"search_strategy": "Search the fact first, then the picture by its exact name.",
                               "skill_activation": "Query the skills the request needs.",
                               "reference_selection": "Keep the official picture.",
                               "prompt_construction": "State counts and positions explicitly.",
                               "failure_avoidance": "Never leave a count implicit.",
                               "trigger": "Situation: a group of objects with an exact count.",
                               "source_prompt_summary": "Draw <name> above three stars"})
        if "prompt-reference program" in system:
            prog = json.loads(texts[0].split("Program:\n", 1)[1])
            if self.mode == "level_outside":
                return json.dumps({"missing": [], "level": 0.6})  # not one of the rubric's five levels
            return json.dumps({"missing": [], "level": 1 if len(prog["gen_prompt"]) >= 40 else 0.25})
        if "Consistency" in system or "WiScore" in system:
            return json.dumps({"consistency": 2, "realism": 1, "aesthetic_quality": 1, "rationale": "ok"})
        import numpy as np

        a, b = images[0], images[1].resize(images[0].size)
        diff = float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())
        level = 1 if diff < 1 else 0.5 if diff < 40 else 0
        request = texts[0]
        ans = {"rationale": f"mean abs diff {diff:.1f}", "F": 1, "V": level, "A": level,
               "T": 1 if '"' in request else 0.5, "text_na": '"' not in request}
        if self.mode == "outside":
            ans["V"] = 0.7
        if self.mode == "missing_key":
            ans.pop("V")
        return "```json\n" + json.dumps(ans) + "\n```"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        """An httpx MockTransport handler."""
        body = json.loads(request.content)
        self.requests.append(body)
        if self.mode == "down":
            return httpx.Response(503, text="overloaded")
        if self.mode == "not_json":
            return httpx.Response(200, text="<html>gateway error</html>")
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": self.answer(body)},
                                                      "finish_reason": "stop"}]})

    def app(self):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, PlainTextResponse

        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(req: Request):
            body = await req.json()
            resp = self(httpx.Request("POST", "http://x", content=json.dumps(body).encode()))
            if resp.headers.get("content-type", "").startswith("application/json"):
                return JSONResponse(resp.json(), status_code=resp.status_code)
            return PlainTextResponse(resp.text, status_code=resp.status_code)

        return app


def run_process_group(cmd: list[str], env: dict, timeout: float = 300, cwd=None) -> tuple[int, str]:
    """Run ``cmd`` in its own process group (so a time-out ends torchrun's workers too, not torchrun
    alone); return its exit code and stderr."""
    import os
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, err
