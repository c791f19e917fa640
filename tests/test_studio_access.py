"""Who may use the studio: no password-less studio on a network address, and failed logins throttled."""

from __future__ import annotations

import asyncio
import importlib.metadata
import socket

import httpx
import pytest
from typer.testing import CliRunner

from genevolve.cli import app as cli


class FakeEntryPoint:
    def __init__(self, calls):
        self.calls = calls

    def load(self):
        return lambda **kw: self.calls.append(kw)


@pytest.fixture
def started(monkeypatch):
    """The studio's entry point replaced by a recorder: what `genevolve studio` would start, without starting it."""
    calls, real = [], importlib.metadata.entry_points

    def entry_points(**kw):  # other groups untouched: a module imported meanwhile may keep this function
        return [FakeEntryPoint(calls)] if kw.get("group") == "genevolve.apps" else real(**kw)
    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.delenv("GENEVOLVE_STUDIO_PASSWORD", raising=False)
    return calls


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "studio.example.org", ""])
def test_a_network_address_without_a_password_refuses_to_start(started, host):
    r = CliRunner().invoke(cli, ["studio", "--host", host])
    assert r.exit_code == 2 and not started
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: the studio on {host} would be open to other machines")
    assert "$GENEVOLVE_STUDIO_PASSWORD" in lines[0] and "--insecure-no-password" in lines[0]


def test_a_password_the_insecure_flag_or_loopback_lets_it_start(started, monkeypatch):
    r = CliRunner().invoke(cli, ["studio", "--host", "0.0.0.0", "--insecure-no-password"])
    assert r.exit_code == 0 and started[-1]["insecure_no_password"] is True and started[-1]["password"] is None
    assert "warning: binding 0.0.0.0 without a password" in r.stderr
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert CliRunner().invoke(cli, ["studio", "--host", host]).exit_code == 0 and started[-1]["host"] == host
    monkeypatch.setenv("GENEVOLVE_STUDIO_PASSWORD", "s3cret")
    r = CliRunner().invoke(cli, ["studio", "--host", "0.0.0.0"])
    assert r.exit_code == 0 and started[-1]["password"] == "s3cret" and r.stderr == ""


def test_launch_itself_refuses_a_network_address_without_a_password():
    from studio.__main__ import serve
    from studio.app import check_exposure, launch

    for call in (lambda: serve(host="0.0.0.0"), lambda: launch(None, host="0.0.0.0")):
        with pytest.raises(ValueError, match="open to other machines without a password"):
            call()  # refused before anything loads (no services were given)
    check_exposure("0.0.0.0", "pw")
    check_exposure("0.0.0.0", None, insecure_no_password=True)


def _login_app():
    """A stand-in for Gradio's /login: 200 for the password "right", else 400."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def login(request: Request):
        form = await request.form()
        ok = form.get("password") == "right"
        return JSONResponse({"success": True} if ok else {"detail": "Incorrect credentials."}, status_code=200 if ok else 400)
    return Starlette(routes=[Route("/login", login, methods=["POST"])])


def test_the_throttle_counts_failures_per_address_and_forgets_them(monkeypatch):
    from studio.app import TOO_MANY, LoginThrottle

    now = [1000.0]
    throttled = LoginThrottle(_login_app(), max_failures=5, window_s=60, lockout_s=30, clock=lambda: now[0])

    async def post(password, client="10.0.0.1"):
        transport = httpx.ASGITransport(app=throttled, client=(client, 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://studio") as c:
            return await c.post("/login", data={"username": "me", "password": password})

    async def scenario():
        assert [(await post("wrong")).status_code for _ in range(5)] == [400] * 5
        r = await post("right")  # the right password, too late: not even tried
        assert r.status_code == 429 and r.headers["retry-after"] == "30" and r.json()["detail"] == TOO_MANY.format(30)
        assert (await post("right", client="10.0.0.2")).status_code == 200  # another address is not affected
        now[0] += 31
        assert (await post("right")).status_code == 200  # the lock-out is over
        for _ in range(4):
            assert (await post("wrong")).status_code == 400
            now[0] += 20  # four failures spread over 80 s never fill a 60 s window
        assert (await post("wrong")).status_code == 400 and (await post("right")).status_code == 200
        assert not throttled.locked and not throttled.pending

    asyncio.run(scenario())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_launched_studio_throttles_failed_logins_and_keeps_the_blank_name_message(tmp_path, world):
    from studio.app import BLANK_USER, launch
    from studio.services import Services

    services = Services.create(world_dir=world.root, runs_dir=tmp_path / "runs", data_dir=tmp_path / "data",
                               embedder=world.text_search._store.embedder)
    port = _free_port()
    app = launch(services, port=port, password="s3cret", block=False)
    url = f"http://127.0.0.1:{port}/login"
    try:
        r = httpx.post(url, files={"username": (None, ""), "password": (None, "s3cret")})
        assert r.status_code == 400 and r.json()["detail"] == BLANK_USER  # not counted as a guess
        for _ in range(5):
            r = httpx.post(url, files={"username": (None, "me"), "password": (None, "guess")})
            assert r.status_code == 400 and r.json()["detail"] == "Incorrect credentials."
        r = httpx.post(url, files={"username": (None, "me"), "password": (None, "s3cret")})
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0 and "Too many failed logins" in r.json()["detail"]
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other:  # another address
            r = other.post(url, files={"username": (None, "me"), "password": (None, "s3cret")})
            assert r.status_code == 200 and r.json() == {"success": True}
    finally:
        app.close()
