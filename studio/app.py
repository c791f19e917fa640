"""The Gradio app: :func:`build_app` wires the five views (:mod:`studio.tabs`) to one :class:`~studio.services.Services`.

Per-user state (the open run, the watched distill folder) lives in ``gr.State``.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the studio runs offline

import contextlib
import hmac
import json
import math
import time
from collections import deque

import gradio as gr

from genevolve.serving.guard import is_loopback

from .html import CSS
from .services import Services
from .tabs import Link, bench, distill, experiences, references, start, trajectories

VIEWS = (("Start", start), ("Trajectories", trajectories), ("Experiences", experiences), ("References", references),
         ("Distill", distill), ("Bench", bench))

# Keyboard: ←/→ page a run's requests, j/k walk its trajectories (not while typing); the URL follows the view.
KEYS_JS = """
<script>
window.geMarkTrajectory = function (id) {
  const cols = [...document.querySelectorAll('#traj-columns .ge-col')];
  cols.forEach(c => c.classList.toggle('ge-focus', !!id && c.dataset.traj === id));
  const hit = cols.find(c => c.dataset.traj === id);
  if (hit) hit.scrollIntoView({block: 'nearest', inline: 'nearest'});
};
// j/k: the next or previous trajectory after the one the address names (the first when it names none).
window.geWalk = function (key) {
  const cols = [...document.querySelectorAll('#traj-columns .ge-col')];
  if (!cols.length) return;
  const u = new URL(window.location);
  const at = cols.findIndex(c => c.dataset.traj === u.searchParams.get('traj'));
  const next = at < 0 ? cols[0] : cols[Math.min(Math.max(at + (key === 'j' ? 1 : -1), 0), cols.length - 1)];
  u.searchParams.set('traj', next.dataset.traj);
  history.replaceState(null, '', u);
  window.geMarkTrajectory(next.dataset.traj);
};
// Keys wait for the page they were pressed for: while a request is still being drawn, ←/→ and j/k are queued and
// played in order once it is (two quick → move two requests, and a j after a → walks the new request).
window.geNavQueue = [];
window.geNavBusy = 0;
window.geNavNext = function () {
  while (window.geNavQueue.length) {
    const key = window.geNavQueue.shift();
    if (key === 'j' || key === 'k') { window.geWalk(key); continue; }
    const btn = document.querySelector(key === 'ArrowLeft' ? '#traj-prev' : '#traj-next');
    if (btn) { window.geNavBusy = Date.now(); btn.click(); return; }
  }
  window.geNavBusy = 0;
};
// Lists refresh on focus: back in this window (from a terminal that made a run), the open view re-reads its lists.
window.geRelistAt = 0;
window.geRelist = function () {
  if (document.hidden || Date.now() - window.geRelistAt < 3000) return;
  const on = [...document.querySelectorAll('button[role=tab]')].find(b => b.getAttribute('aria-selected') === 'true');
  const btn = on && document.getElementById('relist-' + on.textContent.trim().toLowerCase());
  if (btn) { window.geRelistAt = Date.now(); btn.click(); }
};
window.addEventListener('focus', window.geRelist);
document.addEventListener('visibilitychange', window.geRelist);
document.addEventListener('keydown', function (e) {
  if (e.ctrlKey || e.metaKey || e.altKey || e.target.closest('input, textarea, select, [contenteditable="true"]')) return;
  const shown = sel => { const el = document.querySelector(sel); return el && el.offsetParent !== null ? el : null; };
  if (!shown('#traj-columns') || !['ArrowLeft', 'ArrowRight', 'j', 'k'].includes(e.key)) return;
  if (e.key.startsWith('Arrow') && !shown(e.key === 'ArrowLeft' ? '#traj-prev' : '#traj-next')) return;
  e.preventDefault();
  window.geNavQueue.push(e.key);
  if (!window.geNavBusy || Date.now() - window.geNavBusy > 15000) window.geNavNext();  // (a lost answer frees it)
});
</script>
"""

TAB_URL = """() => {
  if (!window.geLoaded) return;  // the page is still opening what its address names: keep that address
  const u = new URL(window.location);
  const v = '%s';
  if (u.searchParams.get('view') !== v) {
    for (const k of [...u.searchParams.keys()]) u.searchParams.delete(k);
    u.searchParams.set('view', v);
    history.replaceState(null, '', u);
  }
}"""


# On page load: the view the address names. While the page mounts (longer on a busy machine), Tabs may fall back to
# its first view (Start) more than once, so the choice is made again until the user picks a tab themselves.
SELECT_VIEW = """() => {
  const titles = %s;
  const v = new URL(window.location).searchParams.get('view');
  if (!titles[v] || v === 'start') return;
  let chose = false;
  document.addEventListener('click', e => { if (e.isTrusted && e.target.closest('button[role=tab]')) chose = true; }, true);
  const started = Date.now();
  const pick = () => {
    if (chose || window.geLoaded || Date.now() - started > 20000) return clearInterval(timer);
    const tabs = [...document.querySelectorAll('button[role=tab]')];
    const on = tabs.find(b => b.getAttribute('aria-selected') === 'true');
    const btn = tabs.find(b => b.textContent.trim() === titles[v]);
    if (btn && btn !== on) btn.click();
  };
  const timer = setInterval(pick, 250);
  pick();
}"""


def build_app(services: Services) -> gr.Blocks:
    """The whole studio over one set of services. The page address opens a view and what it names (see each view's
    :class:`~studio.tabs.Link`); the studio opens on Start."""
    links: list[Link] = []
    with gr.Blocks(title="GenEvolve Studio", analytics_enabled=False) as app:
        gr.Markdown(f"# GenEvolve Studio\nWorld `{services.world.root}` · runs `{services.runs_dir}` · "
                    f"your references `{services.world.refs_root}` · device {services.device}")
        with gr.Tabs(selected="start") as tabs:
            for title, view in VIEWS:
                with gr.Tab(title, id=title.lower()) as tab:
                    made = view.tab(services) or []
                    # clicked by the page when its window comes back into focus (FOCUS_JS): lists re-read
                    relist = gr.Button("re-read lists", visible="hidden", elem_id=f"relist-{title.lower()}")
                tab.select(None, None, None, js=TAB_URL % title.lower())
                for r in made:
                    if isinstance(r, Link):
                        links.append(r)
                        continue
                    # lists re-read from disk: a run made in a terminal appears without a restart
                    app.load(r.fn, r.inputs, r.outputs, show_progress="hidden")
                    if r.on_open:
                        tab.select(r.fn, r.inputs, r.outputs, show_progress="hidden")
                        relist.click(r.fn, r.inputs, r.outputs, show_progress="hidden")

        def open_address(request: gr.Request):
            params = dict(request.query_params) if request is not None else {}
            view = params.get("view")
            out = {tabs: gr.Tabs(selected=view) if view in titles else gr.skip()}
            for link in links:
                if link.view == params.get("view"):
                    out.update(link.fn(params) or {})
            return out

        # The view is selected in the page (a click on its tab), not through the Tabs component: an output of the
        # load event, Tabs would fall back to Start on every page load, even over a tab the user has just opened.
        titles = {title.lower(): title for title, _ in VIEWS}
        event = app.load(None, None, None, js=SELECT_VIEW % json.dumps(titles))
        outputs = [tabs] + [o for link in links for o in link.outputs]
        event = event.then(open_address, None, list(dict.fromkeys(outputs)), show_progress="hidden")
        for link in links:
            if link.then:
                event = event.then(**link.then)
        # The page has opened what its address names: from here on only the user moves between views.
        event.then(None, None, None, js="() => { window.geLoaded = true; document.body.dataset.studioReady = '1'; }")
    return app


LOGIN_HINT = "This studio is password-protected: type any user name (it cannot be blank) and the studio's password."
BLANK_USER = "Type a user name (any name will do) as well as the password."
LOGIN_MAX_BYTES = 16 * 1024  # a login form is a user name and a password: a few hundred bytes


def _is_login(scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/login")


def _detail(status: int, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"detail": message}, status_code=status)


class BlankUserName:
    """ASGI middleware for logins: a body over ``max_bytes`` gets 413 before it is read whole (by Content-Length,
    else by counting), and a blank user name is answered with a message (400, shown by the login page as a
    failed login under the hint above) instead of the form validator's 422, which the page ignores."""

    def __init__(self, app, max_bytes: int = LOGIN_MAX_BYTES):
        from genevolve.serving.guard import BodyLimit

        self.app = app
        self.capped = BodyLimit(self._check, max_bytes, _detail)

    async def __call__(self, scope, receive, send):
        if not _is_login(scope):
            return await self.app(scope, receive, send)
        return await self.capped(scope, receive, send)

    async def _check(self, scope, receive, send):
        """Behind the cap, where the body arrives whole in one message."""
        from starlette.requests import Request

        from genevolve.serving.guard import replay_body

        body = (await receive()).get("body", b"")
        try:
            form = await Request(scope, replay_body(receive, body)).form()
        except Exception:  # a malformed form: starlette raises, and out here that would be a 500
            return await _detail(400, "The login form could not be read.")(scope, receive, send)
        if not str(form.get("username", "")).strip():
            return await _detail(400, BLANK_USER)(scope, receive, send)
        return await self.app(scope, replay_body(receive, body), send)


TOO_MANY = "Too many failed logins from your address: wait {} s, then try again."


class LoginThrottle:
    """ASGI middleware: after ``max_failures`` failed logins from one client address within ``window_s`` seconds,
    that address is answered 429 (with Retry-After) for ``lockout_s`` seconds without its password being tried.
    Logins in flight count against the limit, so parallel guesses gain nothing; a success clears the count."""

    def __init__(self, app, max_failures: int = 5, window_s: float = 60.0, lockout_s: float = 60.0, clock=time.monotonic):
        self.app, self.max_failures, self.window_s, self.lockout_s, self.clock = app, max_failures, window_s, lockout_s, clock
        self.failures: dict[str, deque] = {}
        self.pending: dict[str, int] = {}
        self.locked: dict[str, float] = {}

    def _forget_old(self, now: float) -> None:
        for who, times in list(self.failures.items()):
            while times and times[0] <= now - self.window_s:
                times.popleft()
            if not times and not self.pending.get(who):
                del self.failures[who]
        self.locked = {who: until for who, until in self.locked.items() if until > now}

    async def __call__(self, scope, receive, send):
        if not _is_login(scope):
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        who, now = (scope.get("client") or ("unknown",))[0], self.clock()
        self._forget_old(now)
        times = self.failures.setdefault(who, deque())
        wait = math.ceil(self.locked[who] - now) if who in self.locked else 0
        if not wait and len(times) + self.pending.get(who, 0) >= self.max_failures:
            wait = 1  # the rest of its allowance is being tried right now
        if wait:
            return await JSONResponse({"detail": TOO_MANY.format(wait)}, status_code=429,
                                      headers={"Retry-After": str(wait)})(scope, receive, send)
        status = 0

        async def watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.pending[who] = self.pending.get(who, 0) + 1
        try:
            await self.app(scope, receive, watch)
        finally:
            self.pending[who] -= 1
            if not self.pending[who]:
                del self.pending[who]
        if status in (400, 401, 403):
            times.append(self.clock())
            if len(times) >= self.max_failures:
                self.locked[who] = self.clock() + self.lockout_s
                times.clear()
        elif 200 <= status < 300:
            times.clear()


def check_exposure(host: str, password: str | None, insecure_no_password: bool = False) -> None:
    """Refuse to serve a non-loopback address without a password unless explicitly told to."""
    if not password and not is_loopback(host) and not insecure_no_password:
        raise ValueError(f"the studio on {host} would be open to other machines without a password: "
                         "give one, bind 127.0.0.1, or pass insecure_no_password=True")


def check_proxies(ips: str | None) -> str:
    """``ips`` (comma-separated proxy addresses or networks) checked and tidied; "" for none. uvicorn's ``*``
    is refused: believing every connection's header would let any client choose the address counted."""
    import ipaddress

    items = [x.strip() for x in (ips or "").split(",") if x.strip()]
    if "*" in items:
        raise ValueError("--forwarded-allow-ips: '*' would believe X-Forwarded-For from anyone, so any client could "
                         "pick the address its failed logins are counted under; name the proxy's address")
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"--forwarded-allow-ips: {item!r} is not an IP address or network (give the "
                             "proxy's address, e.g. 127.0.0.1 or 10.0.0.0/8, comma-separated)") from None
    return ",".join(items)


@contextlib.contextmanager
def trusted_proxies(ips: str | None):
    """While the server starts, make uvicorn believe X-Forwarded-For only from ``ips`` (none by default).

    Gradio builds uvicorn's config without this setting, so uvicorn reads ``$FORWARDED_ALLOW_IPS``, whose
    default trusts loopback: then anyone connecting from this machine (or through a proxy on it that does
    not rewrite the header) picks the client address the login throttle counts, and is never throttled."""
    before = os.environ.get("FORWARDED_ALLOW_IPS")
    os.environ["FORWARDED_ALLOW_IPS"] = check_proxies(ips)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FORWARDED_ALLOW_IPS", None)
        else:
            os.environ["FORWARDED_ALLOW_IPS"] = before


def launch(services: Services, host: str = "127.0.0.1", port: int = 7860, password: str | None = None, block: bool = True,
           insecure_no_password: bool = False, forwarded_allow_ips: str | None = None):
    """Serve the studio; with a password, every visitor must give it (any user name), and repeated failed
    logins from one address are throttled. A non-loopback ``host`` needs a password or ``insecure_no_password``.
    The address counted is the connection's, or the X-Forwarded-For one when the connection comes from a proxy
    named in ``forwarded_allow_ips``."""
    from starlette.middleware import Middleware

    check_exposure(host, password, insecure_no_password)
    check_proxies(forwarded_allow_ips)
    app = build_app(services)
    app.queue(default_concurrency_limit=2)
    auth = (lambda _user, pw: hmac.compare_digest(pw.encode(), password.encode())) if password else None
    with trusted_proxies(forwarded_allow_ips):
        app.launch(server_name=host, server_port=port, auth=auth, auth_message=LOGIN_HINT if password else None, css=CSS,
                   head=KEYS_JS,
                   prevent_thread_lock=not block, quiet=True, ssr_mode=False, footer_links=[], max_file_size="32mb",
                   allowed_paths=[str(services.world.root), str(services.world.refs_root), str(services.runs_dir),
                                  str(start.DOCS)],
                   app_kwargs={"middleware": [Middleware(BlankUserName), Middleware(LoginThrottle)]})
    return app
