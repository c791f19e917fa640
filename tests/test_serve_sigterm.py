"""``genevolve serve`` as a real process: SIGTERM stops it within the shutdown bound, with exit code 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_cancels_in_flight_work_and_exits_0(tiny_folder):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "genevolve.cli", "serve", "--policy", str(tiny_folder), "--port", str(port),
           "--alias", "student", "--shutdown-timeout", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        names = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        assert names[1:] == ["student"]
        body = {"model": "student", "messages": [{"role": "user", "content": "go on"}], "temperature": 0,
                "max_tokens": 4000, "stream": True}  # the random model never stops by itself: minutes of work
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]  # the stream ends when the server cancels it, properly
        assert rest[-1] == "data: [DONE]"
        last = json.loads([line for line in rest if line.startswith("data: {")][-1][6:])
        assert last["choices"][0]["finish_reason"] == "cancelled"
        code = proc.wait(timeout=15)
        elapsed = time.monotonic() - start
        assert code == 0, proc.communicate()[1]
        assert elapsed < 10, f"shutdown took {elapsed:.1f} s"
        try:
            httpx.get(f"{url}/health", timeout=1)
            raise AssertionError("the server still answers after SIGTERM")
        except httpx.TransportError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
