"""Load and faults on the three servers, each started as a real process on a free loopback port.

For ``genevolve serve --policy tiny``, ``genevolve gateway`` (the shipped sandbox world's store) and
``genevolve render-service`` (the sandbox generator) the script measures, one server after the other:

1. load: ``--clients`` concurrent clients (default 50) for ``--seconds`` (default 60): requests done,
   p50 / p99 latency, errors by status (a 429 from a full queue is counted as refused, not as an
   error), and the server's RSS before and after. ``serve`` gets short completions (max_tokens 16),
   one request in three streamed;
2. disconnect: ``--disconnects`` requests (serve: streams with a long max_tokens) closed after their
   first chunk (or, for the short requests of the other servers, a few ms after they were sent);
   then probes until one is served in normal time (at most twice the median before plus 50 ms), and a
   one-second look at the server's CPU time: a generation still running would keep a core busy
   (none of the servers exposes a queue depth, /health only says ``ok``);
3. fuzz: ``--fuzz`` malformed bodies (random bytes, wrong JSON types, huge numbers, lone surrogates,
   bad UTF-8, deep nesting, NaN) to the server's main route: 500s (target 0), then /health must
   still answer;
4. SIGTERM while clients are active: exit code (target 0), seconds to exit (target: within the
   server's shutdown bound), requests the server accepted but never answered (a reset or closed
   connection; target 0; a refused connection after the listener closed is expected), and no file
   left behind (the servers run in an empty temporary folder
   that must stay empty, and the repository's untracked files must not change).

    .venv/bin/python benchmarks/serve_load.py                # about 5 minutes
    .venv/bin/python benchmarks/serve_load.py --seconds 10 --servers serve

Prints a table per server and saves everything, with machine info and load average, to
benchmarks/results/serve_load.json. Every server process is killed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serve_load.json"
SERVERS = ("serve", "gateway", "render-service")
SHUTDOWN_BOUND = {"serve": 10.0, "gateway": 10.0, "render-service": 10.0}  # serve: --shutdown-timeout default
QUERIES = ["lighthouse", "bridge arches", "Korsa lighthouse colours", "moonlit deer", "purple tower",
           "a red boat by the harbour", "mirror arch", "old market square"]


sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_fuzz import fuzz_bodies, fuzz_path  # noqa: E402  (the fuzz phase's bodies, beside this script)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _untracked() -> set[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    return {line[3:] for line in out.splitlines() if line.startswith("??")}


class Server:
    """One server process in its own session, run from an empty temporary folder."""

    def __init__(self, kind: str, startup_timeout: float = 120):
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tempfile.TemporaryDirectory(prefix=f"serve-load-{kind}-")
        self.workdir = Path(self.tmp.name) / "cwd"
        self.workdir.mkdir()
        self.log = open(Path(self.tmp.name) / "server.log", "w+b")
        cmd = [sys.executable, "-m", "genevolve.cli", kind, "--port", str(self.port)]
        if kind == "serve":
            cmd += ["--policy", "tiny"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.cmd = cmd
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited with {self.proc.returncode} at start: {self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() - t0 > startup_timeout:
                raise RuntimeError(f"{kind} did not answer /health within {startup_timeout} s: {self.log_tail()}")
            time.sleep(0.2)
        self.startup_s = time.monotonic() - t0

    def log_tail(self, n: int = 2000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-n:]

    def rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def leftover_files(self) -> list[str]:
        return sorted(str(p.relative_to(self.workdir)) for p in self.workdir.rglob("*"))

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.log.close()
        self.tmp.cleanup()


# ---------------------------------------------------------------- requests


ERROR_SAMPLES: list[dict] = []  # the first transport errors of a phase, with their requests
SHORT_TOKENS = 16  # max_tokens of the load and probe requests to serve (run_server's ``tokens``)


def good_request(kind: str, i: int, max_tokens: int | None = None, stream: bool | None = None) -> tuple[str, dict, bool]:
    """(path, body, stream) of the i-th well-formed request."""
    if kind == "serve":
        max_tokens = max_tokens or SHORT_TOKENS
        stream = (i % 3 == 0) if stream is None else stream
        body = {"messages": [{"role": "user", "content": f"Describe picture {i % 7}."}], "max_tokens": max_tokens,
                "temperature": 0.7, "seed": i, "stream": stream}
        return "/v1/chat/completions", body, stream
    if kind == "gateway":
        path = "/images" if i % 3 == 0 else "/search"
        return path, {"q": QUERIES[i % len(QUERIES)], "num": 5}, False
    return "/generate", {"prompt": f"{QUERIES[i % len(QUERIES)]}, picture {i}", "seed": i}, False


async def send(client: httpx.AsyncClient, kind: str, i: int, **kw) -> tuple[int | str, float]:
    """One request; (status or transport error name, seconds). A stream is read to its end."""
    path, body, stream = good_request(kind, i, **kw)
    t0 = time.perf_counter()
    try:
        if stream:
            async with client.stream("POST", path, json=body) as resp:
                async for _ in resp.aiter_raw():
                    pass
                status = resp.status_code
        else:
            status = (await client.post(path, json=body)).status_code
    except httpx.HTTPError as exc:
        status = type(exc).__name__
        if len(ERROR_SAMPLES) < 20 and status != "ConnectError":
            ERROR_SAMPLES.append({"path": path, "body": body, "error": repr(exc), "cause": repr(exc.__cause__ or exc.__context__),
                                  "after_s": round(time.perf_counter() - t0, 3), "at": time.strftime("%H:%M:%S")})
    return status, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def summarize(records: list[tuple[int | str, float]], seconds: float) -> dict:
    ok = [t for s, t in records if s == 200]
    errors: dict[str, int] = {}
    for s, _ in records:
        if s not in (200, 429):
            errors[str(s)] = errors.get(str(s), 0) + 1
    return {"completed": len(ok), "requests": len(records), "refused_429": sum(s == 429 for s, _ in records),
            "errors": errors, "error_count": sum(errors.values()), "seconds": round(seconds, 2),
            "throughput_rps": round(len(ok) / seconds, 2) if seconds else None,
            "p50_ms": round(pct(ok, 50) * 1000, 1) if ok else None,
            "p99_ms": round(pct(ok, 99) * 1000, 1) if ok else None}


async def load(url: str, kind: str, clients: int, seconds: float, stop: asyncio.Event | None = None) -> dict:
    records: list[tuple[int | str, float]] = []
    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    ERROR_SAMPLES.clear()
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker():
            while time.monotonic() < deadline and not (stop and stop.is_set()):
                records.append(await send(client, kind, next(counter)))
                if stop is not None and records[-1][0] == "ConnectError":
                    return  # shutting down: the listener is closed, no point in knocking again

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return {**summarize(records, time.monotonic() - t0), "error_samples": list(ERROR_SAMPLES)}


def phase_load(srv: Server, clients: int, seconds: float) -> dict:
    t0 = time.perf_counter()
    first = _probe_latencies_sync(srv, 1)  # the first request loads what the server loads lazily (an embedder)
    cold_ms = round((time.perf_counter() - t0) * 1000, 1) if first else None
    rss0 = srv.rss_mb()
    out = asyncio.run(load(srv.url, srv.kind, clients, seconds))
    out["first_request_ms"] = cold_ms
    out.update(clients=clients, rss_mb_before=rss0 and round(rss0, 1), rss_mb_after=(srv.rss_mb() or 0) and round(srv.rss_mb(), 1))
    return out


# ---------------------------------------------------------------- disconnects


async def _probe_latencies(url: str, kind: str, n: int) -> list[float]:
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for i in range(n):
            status, t = await send(client, kind, 10**6 + i, stream=False) if kind == "serve" else await send(client, kind, 10**6)
            if status == 200:
                out.append(t)
    return out


async def _disconnect(url: str, kind: str, n: int, long_tokens: int) -> dict:
    first_chunk = 0
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        async def one(i: int):
            nonlocal first_chunk
            path, body, _ = good_request(kind, 2 * 10**6 + i, max_tokens=long_tokens, stream=True)
            if kind == "serve":
                async with client.stream("POST", path, json=body) as resp:
                    async for _ in resp.aiter_raw():
                        first_chunk += 1
                        break  # leaving the block closes the connection mid-generation
            else:
                with contextlib.suppress(asyncio.TimeoutError, httpx.HTTPError):
                    await asyncio.wait_for(client.post(path, json=body), timeout=0.005 * (1 + i))

        await asyncio.gather(*(one(i) for i in range(n)))
    return {"first_chunks": first_chunk}


def phase_disconnect(srv: Server, n: int, long_tokens: int) -> dict:
    base = _probe_latencies_sync(srv, 5)
    normal = max(statistics.median(base) * 2, max(base)) + 0.05
    started = asyncio.run(_disconnect(srv.url, srv.kind, n, long_tokens))
    t_closed = time.monotonic()
    probes = []
    drain_s = None
    while time.monotonic() - t_closed < 60:
        lat = _probe_latencies_sync(srv, 1)
        probes.append(round(lat[0] * 1000, 1) if lat else None)
        if lat and lat[0] <= normal:
            drain_s = time.monotonic() - t_closed
            break
    cpu0, w0 = srv.cpu_s(), time.monotonic()
    time.sleep(1.0)
    idle_cpu = (srv.cpu_s() - cpu0) / (time.monotonic() - w0)
    after = _probe_latencies_sync(srv, 3)
    leaked = drain_s is None or idle_cpu > 0.3
    return {"requests": n, "long_max_tokens": long_tokens if srv.kind == "serve" else None, **started,
            "baseline_probe_ms": round(statistics.median(base) * 1000, 1), "normal_bound_ms": round(normal * 1000, 1),
            "drain_s": drain_s and round(drain_s, 3), "probes_ms": probes[:20],
            "idle_cpu_share_after": round(idle_cpu, 3), "probe_after_ms": round(statistics.median(after) * 1000, 1) if after else None,
            "leaked_work": leaked}


def _probe_latencies_sync(srv: Server, n: int) -> list[float]:
    return asyncio.run(_probe_latencies(srv.url, srv.kind, n))


# ---------------------------------------------------------------- fuzz


def phase_fuzz(srv: Server, n: int) -> dict:
    statuses: dict[str, int] = {}
    fives: list[dict] = []
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        for i, (what, raw) in enumerate(fuzz_bodies(srv.kind, n)):
            path = fuzz_path(srv.kind, i)
            try:
                r = client.post(path, content=raw, headers={"content-type": "application/json"})
                status = str(r.status_code)
                if r.status_code >= 500:
                    fives.append({"path": path, "what": what, "body": raw[:2000].decode("latin-1"), "status": r.status_code,
                                  "answer": r.text[:500]})
            except httpx.HTTPError as exc:
                status = type(exc).__name__
                fives.append({"path": path, "what": what, "body": raw[:2000].decode("latin-1"), "status": status})
            statuses[status] = statuses.get(status, 0) + 1
        try:
            health = client.get("/health", timeout=10).status_code
        except httpx.HTTPError as exc:
            health = type(exc).__name__
    return {"requests": n, "statuses": dict(sorted(statuses.items())),
            "server_errors_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
            "dropped": sum(v for k, v in statuses.items() if not k.isdigit()),
            "failures": fives[:20], "health_after": health, "alive_after": srv.proc.poll() is None and health == 200}


# ---------------------------------------------------------------- SIGTERM


async def _sigterm(srv: Server, clients: int, warmup: float) -> dict:
    stop = asyncio.Event()
    task = asyncio.create_task(load(srv.url, srv.kind, clients, 120, stop))
    await asyncio.sleep(warmup)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    bound = SHUTDOWN_BOUND[srv.kind]
    while srv.proc.poll() is None and time.monotonic() - t0 < bound + 20:
        await asyncio.sleep(0.02)
    exit_s = time.monotonic() - t0
    code = srv.proc.poll()
    stop.set()
    try:
        during = await asyncio.wait_for(task, timeout=70)
    except asyncio.TimeoutError:
        during = None
    # a request the server accepted but never answered (reset, closed mid-way) differs from one refused
    # at the door once the listener closed (ConnectError): the first kind is lost work
    unanswered = {k: v for k, v in ((during or {}).get("errors") or {}).items() if k not in ("ConnectError", "ConnectTimeout")}
    return {"exit_code": code, "exit_s": round(exit_s, 3), "bound_s": bound, "unanswered": unanswered,
            "exited_in_bound": code is not None and exit_s <= bound, "clients": clients, "load_during": during}


def phase_sigterm(srv: Server, clients: int, warmup: float) -> dict:
    out = asyncio.run(_sigterm(srv, clients, warmup))
    out["files_left"] = srv.leftover_files()
    if out["exit_code"] != 0:
        out["log_tail"] = srv.log_tail()
    return out


# ---------------------------------------------------------------- driver


def run_server(kind: str, clients: int = 50, seconds: float = 60, disconnects: int = 10, long_tokens: int = 3000,
               fuzz: int = 300, sigterm_warmup: float = 2.0, tokens: int = 16) -> dict:
    """Every phase against one fresh ``kind`` server; the process is killed at the end in any case."""
    global SHORT_TOKENS
    SHORT_TOKENS = tokens
    result: dict = {"server": kind, "short_max_tokens": tokens if kind == "serve" else None}
    before = _untracked()
    srv = Server(kind)
    try:
        result.update(command=" ".join(srv.cmd[1:]), startup_s=round(srv.startup_s, 2))
        result["load"] = phase_load(srv, clients, seconds)
        result["disconnect"] = phase_disconnect(srv, disconnects, long_tokens)
        result["fuzz"] = phase_fuzz(srv, fuzz)
        result["sigterm"] = phase_sigterm(srv, clients, sigterm_warmup)
    except Exception as exc:  # keep what was measured; say what broke
        result["failure"] = f"{type(exc).__name__}: {exc}"
        result["log_tail"] = srv.log_tail()
    finally:
        srv.kill()
    result["new_repo_files"] = sorted(_untracked() - before)
    return result


def targets(r: dict) -> list[str]:
    """The targets a server result misses, in words."""
    bad = []
    if "failure" in r:
        bad.append(r["failure"])
    ld, dc, fz, st = (r.get(k) or {} for k in ("load", "disconnect", "fuzz", "sigterm"))
    if ld.get("errors"):
        bad.append(f"load errors {ld['errors']}")
    if dc.get("leaked_work"):
        bad.append(f"leaked work after disconnects (drain {dc.get('drain_s')} s, idle cpu {dc.get('idle_cpu_share_after')})")
    if fz.get("server_errors_5xx") or fz.get("dropped"):
        bad.append(f"fuzz: {fz['server_errors_5xx']} 5xx, {fz['dropped']} dropped")
    if fz and not fz.get("alive_after"):
        bad.append("no /health after fuzz")
    if st and st.get("exit_code") != 0:
        bad.append(f"SIGTERM exit code {st.get('exit_code')}")
    if st.get("unanswered"):
        bad.append(f"SIGTERM: accepted requests left unanswered {st['unanswered']}")
    if st and not st.get("exited_in_bound"):
        bad.append(f"SIGTERM exit took {st.get('exit_s')} s (bound {st.get('bound_s')} s)")
    if st.get("files_left") or r.get("new_repo_files"):
        bad.append(f"files left: {st.get('files_left')} {r.get('new_repo_files')}")
    return bad


def table(r: dict) -> str:
    ld, dc, fz, st = (r.get(k) or {} for k in ("load", "disconnect", "fuzz", "sigterm"))
    rows = [
        ("startup", f"{r.get('startup_s')} s"),
        ("concurrency", f"{ld.get('clients')} clients x {ld.get('seconds')} s"),
        ("completed", f"{ld.get('completed')} ({ld.get('throughput_rps')} req/s)"),
        ("latency p50 / p99", f"{ld.get('p50_ms')} / {ld.get('p99_ms')} ms"),
        ("errors", f"{ld.get('error_count')} {ld.get('errors') or ''}"),
        ("refused (429)", ld.get("refused_429")),
        ("RSS before / after", f"{ld.get('rss_mb_before')} / {ld.get('rss_mb_after')} MB"),
        ("disconnect drain", f"{dc.get('drain_s')} s (probe {dc.get('baseline_probe_ms')} -> {dc.get('probe_after_ms')} ms, "
                             f"idle cpu {dc.get('idle_cpu_share_after')})"),
        ("leaked work", dc.get("leaked_work")),
        ("fuzz 5xx / dropped", f"{fz.get('server_errors_5xx')} / {fz.get('dropped')} of {fz.get('requests')} {fz.get('statuses')}"),
        ("alive after fuzz", fz.get("alive_after")),
        ("SIGTERM exit / time", f"{st.get('exit_code')} / {st.get('exit_s')} s (bound {st.get('bound_s')} s)"),
        ("SIGTERM in flight", f"{(st.get('load_during') or {}).get('completed')} answered, unanswered {st.get('unanswered')}"),
        ("files left", f"{st.get('files_left')} {r.get('new_repo_files')}"),
        ("targets missed", "; ".join(targets(r)) or "none"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"== {r['server']} =="] + [f"  {k:<{width}}  {v}" for k, v in rows])


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        info["mem_total_gb"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    with contextlib.suppress(Exception):
        import uvicorn
        info.update(httpx=httpx.__version__, uvicorn=uvicorn.__version__)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60, help="load phase length per server")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--disconnects", type=int, default=10)
    ap.add_argument("--long-tokens", type=int, default=3000, help="max_tokens of the streams closed early (serve)")
    ap.add_argument("--fuzz", type=int, default=300)
    ap.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    out = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "load_average_before": os.getloadavg(),
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "servers": {}}
    for kind in args.servers:
        r = run_server(kind, args.clients, args.seconds, args.disconnects, args.long_tokens, args.fuzz)
        r["targets_missed"] = targets(r)
        out["servers"][kind] = r
        print(table(r), flush=True)
    out["load_average_after"] = os.getloadavg()
    out["total_s"] = round(time.monotonic() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"total {out['total_s']} s; saved {args.out}")
    return 1 if any(r["targets_missed"] for r in out["servers"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
