"""The protocol subset the official GenEvolve runtime speaks, replayed against our three servers.

``tests/data/official_runtime/requests.json`` holds the request shapes the official runtime sends (its
chat call, its Serper-style text and image searches with the key header, and its image-edit service
call) and what it reads from each answer. Each test sends those requests as they are and reads the
answers the way the runtime does (see docs/serving.md, "The official runtime as a client").
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

RECORDED = json.loads((Path(__file__).parent / "data" / "official_runtime" / "requests.json").read_text())


def test_chat_completions_as_the_official_agent_calls_them(tiny_folder):
    from genevolve.policies.local import LocalPolicy
    from genevolve.serving.chat import build_app
    from genevolve.serving.chat_limits import ServeLimits

    pol = LocalPolicy.load(tiny_folder, device="cpu", dtype="float32", name="tiny-random")
    client = TestClient(build_app(pol, "tiny-random", limits=ServeLimits(aliases=("GenEvolve",))))
    assert "GenEvolve" in [m["id"] for m in client.get("/v1/models").json()["data"]]  # served under the runtime's default name
    body = RECORDED["chat_completions"]
    # Its default max_tokens (4096) does not fit a 4096-token model next to any prompt: refused by name, as vLLM does.
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "maximum context length is 4096 tokens" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={**body, "max_tokens": 32})  # run_agent.py --max-tokens 32
    assert r.status_code == 200
    content = r.json()["choices"][0]["message"]["content"]  # all the runtime reads
    assert isinstance(content, str)


@pytest.fixture(scope="module")
def gateway(world):
    from genevolve.serving.gateway import build_gateway_app

    return TestClient(build_gateway_app(world.root, embedder=world.text_search._store.embedder, api_key="k"))


def test_serper_text_and_image_search_with_the_key_and_keyless_picture_downloads(gateway):
    headers = RECORDED["headers"]["search"] | {"X-API-KEY": "k"}
    organic = gateway.post("/search", json=RECORDED["search"], headers=headers).json()["organic"]
    assert organic and all(o.get("title") and (o.get("link") or o.get("url")) and "snippet" in o for o in organic)
    found = gateway.post("/images", json=RECORDED["images"], headers=headers).json()["images"]
    assert 0 < len(found) <= RECORDED["images"]["num"]
    for item in found:
        url = item.get("imageUrl") or item.get("image_url") or item.get("thumbnailUrl") or item.get("url")
        assert url and item.get("title")
        picture = gateway.get(url)  # a plain GET, as the runtime downloads it: no key header
        assert picture.status_code == 200 and Image.open(io.BytesIO(picture.content)).size[0] > 0
    assert gateway.post("/search", json=RECORDED["search"]).status_code in (401, 403)  # the key is still needed to search


def test_the_image_edit_service_call_as_the_runtime_makes_it(world):
    from genevolve.generators import open_generator
    from genevolve.serving.render import build_render_app

    client = TestClient(build_render_app(open_generator("sandbox", world=world)))
    ref = io.BytesIO()
    world.ref_image(next(iter(world.refs))).convert("RGB").save(ref, format="JPEG")
    body = RECORDED["generate"] | {"image_urls": ["data:image/jpeg;base64," + base64.b64encode(ref.getvalue()).decode()]}
    r = client.post("/generate", json=body)  # every field it sends, the extra sampler settings included
    assert r.status_code == 200, r.text[:300]
    data = r.json()
    assert data["success"] is True
    picture = Image.open(io.BytesIO(base64.b64decode(data.get("image") or data.get("image_base64"))))
    assert picture.size[0] > 0
