"""The Gradio app: :func:`build_app` wires the five views (:mod:`studio.tabs`) to one :class:`~studio.services.Services`.

Per-user state (the open run, the watched distill folder) lives in ``gr.State``.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the studio runs offline

import hmac

import gradio as gr

from .html import CSS
from .services import Services
from .tabs import bench, distill, experiences, references, trajectories


def build_app(services: Services) -> gr.Blocks:
    """The whole studio over one set of services."""
    views = (("Trajectories", trajectories), ("Experiences", experiences), ("References", references), ("Distill", distill),
             ("Bench", bench))
    with gr.Blocks(title="GenEvolve Studio", analytics_enabled=False) as app:
        gr.Markdown(f"# GenEvolve Studio\nWorld `{services.world.root}` · runs `{services.runs_dir}` · "
                    f"your references `{services.world.refs_root}` · device {services.device}")
        with gr.Tabs():
            for title, view in views:
                with gr.Tab(title, id=title.lower()) as tab:
                    refreshes = view.tab(services) or []
                for r in refreshes:  # lists re-read from disk: a run made in a terminal appears without a restart
                    app.load(r.fn, None, r.outputs, show_progress="hidden")
                    if r.on_open:
                        tab.select(r.fn, None, r.outputs, show_progress="hidden")
    return app


LOGIN_HINT = "This studio is password-protected: type any user name (it cannot be blank) and the studio's password."
BLANK_USER = "Type a user name (any name will do) as well as the password."


class BlankUserName:
    """ASGI middleware: a login with a blank user name is answered with a message (400, shown by the login
    page as a failed login under the hint above) instead of the form validator's 422, which the page ignores."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/login"):
            return await self.app(scope, receive, send)
        from starlette.requests import Request
        from starlette.responses import JSONResponse

        body, more = b"", True
        while more:
            chunk = await receive()
            body, more = body + chunk.get("body", b""), chunk.get("more_body", False)

        def replay():
            sent = False

            async def again():
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return again

        form = await Request(scope, replay()).form()
        if not str(form.get("username", "")).strip():
            return await JSONResponse({"detail": BLANK_USER}, status_code=400)(scope, receive, send)
        return await self.app(scope, replay(), send)


def launch(services: Services, host: str = "127.0.0.1", port: int = 7860, password: str | None = None, block: bool = True):
    """Serve the studio; with a password, every visitor must give it (any user name)."""
    from starlette.middleware import Middleware

    app = build_app(services)
    app.queue(default_concurrency_limit=2)
    auth = (lambda _user, pw: hmac.compare_digest(pw.encode(), password.encode())) if password else None
    app.launch(server_name=host, server_port=port, auth=auth, auth_message=LOGIN_HINT if password else None, css=CSS,
               prevent_thread_lock=not block, quiet=True, ssr_mode=False, footer_links=[], max_file_size="32mb",
               allowed_paths=[str(services.world.root), str(services.world.refs_root), str(services.runs_dir)],
               app_kwargs={"middleware": [Middleware(BlankUserName)]})
    return app
