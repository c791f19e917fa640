"""Malformed request bodies for each server (random bytes, wrong types, huge numbers, surrogates, deep
nesting), used by ``serve_load.py``'s fuzz phase."""

from __future__ import annotations

import json
import random


def fuzz_bodies(kind: str, n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` malformed bodies, as (description, raw bytes)."""
    rng = random.Random(seed)
    if kind == "serve":
        fields = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0.5,
                  "top_p": 0.9, "n": 1, "stop": "x", "seed": 1, "logprobs": False, "top_logprobs": 0,
                  "stream": False, "model": "tiny", "stop_token_ids": [1]}
    elif kind == "gateway":
        fields = {"q": "lighthouse", "num": 3}
    else:
        fields = {"prompt": "a lighthouse", "seed": 1, "width": 128, "height": 128, "image_urls": []}
    weird = [None, True, False, 0, -1, 1.5, 10**30, -10**30, 2**63, 2**64, 1e308, "", "x" * 5000, "\ud800",
             "a\ud800b", "\x00", "\x7f", "\u0085", [], [None], [{}], {}, {"a": 1}, "5", "NaN", [[[[["deep"]]]]],
             [{"role": "user", "content": 5}], [{"role": "robot", "content": "hi"}], [{"role": "user"}],
             [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
             ["data:image/png;base64,AAAA"], ["http://example.com/x.png"], ["data:image/png;base64,!!!"]]
    out: list[tuple[str, bytes]] = []
    for i in range(n):
        k = i % 10
        if k == 0:
            out.append(("random bytes", rng.randbytes(rng.randint(0, 400))))
        elif k == 1:
            out.append(("not an object", json.dumps(rng.choice([[], 1, "s", None, True, [1, 2], 1e300])).encode()))
        elif k in (2, 3, 4, 5):
            body = dict(fields)
            key = rng.choice(list(fields))
            body[key] = rng.choice(weird)
            raw = json.dumps(body, ensure_ascii=True).encode()  # lone surrogates travel as \ud800 escapes
            out.append((f"{key}={json.dumps(body[key])[:60]}", raw))
        elif k == 6:
            body = dict(fields)
            for key in rng.sample(list(fields), rng.randint(1, len(fields))):
                body[key] = rng.choice(weird)
            out.append(("several fields wrong", json.dumps(body).encode()))
        elif k == 7:
            raw = json.dumps(fields).encode()
            cut = rng.randint(0, len(raw))
            out.append(("truncated / bad utf-8", raw[:cut] + rng.choice([b"\xff\xfe", b"\xed\xa0\x80", b"", b"\xc3"])))
        elif k == 8:
            depth = rng.choice([100, 1000, 5000])
            key = rng.choice(list(fields))
            out.append((f"{key} nested {depth} deep", (json.dumps(fields)[:-1] + f', "{key}": ' + "[" * depth + "]" * depth + "}").encode()))
        else:
            key = rng.choice(list(fields))
            tok = rng.choice(["NaN", "Infinity", "-Infinity", "1e999999", "9" * 5000, "-0", "1" + "0" * 400])
            out.append((f"{key}={tok[:20]}", (json.dumps(fields)[:-1] + f', "{key}": {tok}' + "}").encode()))
    return out


def fuzz_path(kind: str, i: int) -> str:
    if kind == "serve":
        return "/v1/chat/completions"
    if kind == "gateway":
        return "/images" if i % 2 else "/search"
    return "/generate"
