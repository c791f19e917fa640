"""benchmarks/serve_load.py in miniature: every phase against each real server process, a few seconds each."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


def _script():
    spec = importlib.util.spec_from_file_location("serve_load", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind", ["serve", "gateway", "render-service"])
def test_load_disconnect_fuzz_and_sigterm(kind):
    sl = _script()
    r = sl.run_server(kind, clients=4, seconds=2, disconnects=3, long_tokens=3000, fuzz=30, sigterm_warmup=0.5, tokens=4)
    assert "failure" not in r, r.get("log_tail")
    load, drain, fuzz, term = r["load"], r["disconnect"], r["fuzz"], r["sigterm"]
    assert load["completed"] > 0 and not load["errors"], load
    assert not drain["leaked_work"], drain
    assert fuzz["server_errors_5xx"] == 0 and fuzz["dropped"] == 0, fuzz["failures"]
    assert fuzz["alive_after"], fuzz
    assert not term["files_left"] and not r["new_repo_files"], r
    assert term["exited_in_bound"], term
    assert term["exit_code"] == 0, term
