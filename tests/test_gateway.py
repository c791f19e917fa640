"""The search gateway (Serper formats over our stores), `genevolve index`, and an agent run through it."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from genevolve.tools.corpus import index_folder
from genevolve.tools.embed import HashEmbedder
from genevolve.serving.gateway import build_gateway_app
from genevolve.tools.serper import SerperImageSearch, SerperTextSearch

from _loopback import serve_app


@pytest.fixture(scope="module")
def user_store(tmp_path_factory):
    src = tmp_path_factory.mktemp("notes")
    (src / "lighthouse.md").write_text("# The Korsa lighthouse\n\nThe Korsa lighthouse is painted in teal and orange bands."
                                       "\n\nIt stands on the northern cape.", "utf-8")
    (src / "sub").mkdir()
    (src / "sub" / "bridge.txt").write_text("The Vell bridge has seven arches of pale stone.", "utf-8")
    Image.new("RGB", (20, 30), (0, 128, 128)).save(src / "korsa_lighthouse.png")
    (src / "korsa_lighthouse.txt").write_text("Official photo of the Korsa lighthouse", "utf-8")
    Image.new("RGB", (10, 10), "grey").save(src / "sub" / "vell-bridge.jpg")
    (src / "broken.png").write_bytes(b"not a png")
    out = tmp_path_factory.mktemp("store")
    logs = []
    counts = index_folder(src, out, embedder=HashEmbedder(), log=logs.append)
    return out, counts, logs


def test_index_a_folder(user_store, tmp_path):
    store, counts, logs = user_store
    assert counts["documents"] == 2 and counts["images"] == 2 and counts["passages"] >= 2
    assert counts["skipped"] == ["broken.png: not a readable image (UnidentifiedImageError)"]
    assert any("skipped broken.png" in line for line in logs)
    assert (store / "index" / "corpus.faiss").exists() and (store / "index" / "refs.faiss").exists()
    refs = (store / "refs.jsonl").read_text()
    assert "Official photo of the Korsa lighthouse" in refs and "vell bridge" in refs
    assert "korsa_lighthouse.txt" not in (store / "corpus.jsonl").read_text()  # a caption, not a document
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt/.md documents and no pictures"):
        index_folder(tmp_path / "empty", tmp_path / "o", embedder=HashEmbedder(), log=lambda s: None)
    with pytest.raises(FileNotFoundError, match="no folder to index at .*nope"):
        index_folder(tmp_path / "nope", tmp_path / "o", embedder=HashEmbedder())


def test_serper_formats_batch_and_key(user_store):
    store, _, _ = user_store
    client = TestClient(build_gateway_app(store, embedder=HashEmbedder(), api_key="k"))
    assert client.post("/search", json={"q": "lighthouse"}).status_code == 403
    h = {"X-API-KEY": "k"}
    r = client.post("/search", json={"q": "Korsa lighthouse colours", "num": 2}, headers=h).json()
    assert r["searchParameters"]["q"] == "Korsa lighthouse colours" and len(r["organic"]) == 2
    assert r["organic"][0]["title"] == "The Korsa lighthouse" and r["organic"][0]["position"] == 1
    assert "teal and orange" in r["organic"][0]["snippet"]
    batch = client.post("/search", json=[{"q": "bridge arches"}, {"q": "lighthouse", "num": 1}], headers=h).json()
    assert isinstance(batch, list) and len(batch) == 2 and len(batch[1]["organic"]) == 1
    imgs = client.post("/images", json={"q": "Korsa lighthouse photo", "num": 1}, headers=h).json()["images"]
    assert imgs[0]["title"] == "Official photo of the Korsa lighthouse" and (imgs[0]["imageWidth"], imgs[0]["imageHeight"]) == (20, 30)
    f = client.get(imgs[0]["imageUrl"].replace("http://testserver", ""))
    assert f.status_code == 200 and f.content[:4] == b"\x89PNG"
    assert client.get("/files/../../etc/passwd", headers=h).status_code == 404
    assert client.get("/files/ref-nope", headers=h).status_code == 404
    assert client.post("/search", json={"num": 3}, headers=h).status_code == 400
    assert client.post("/search", content=b"{not json", headers=h).status_code == 400
    with pytest.raises(FileNotFoundError, match="corpus.jsonl is missing"):
        build_gateway_app(store / "refs")


def test_agent_runs_offline_through_the_gateway(world, tmp_path):
    """The sandbox world behind the gateway, searched by the Serper clients: same facts, same pictures."""
    from genevolve.agent.loop import Tools, run_to_end
    from genevolve.agent.expert import ExpertNoise, ExpertPolicy

    app = build_gateway_app(world.root, embedder=world.text_search._store.embedder)
    with serve_app(app) as url:
        text = SerperTextSearch(base_url=url, backoff=0)
        images = SerperImageSearch(base_url=url, download_dir=tmp_path / "dl", backoff=0)
        out = text.search(["Aurora Cup 2031 winner"], 3)
        assert out.startswith("--- search result for [Aurora Cup 2031 winner] ---") and "1. title:" in out
        hits = images.image_search("official flag", 2)
        assert len(hits) == 2 and all(httpx.URL(h.url).host == "127.0.0.1" for h in hits)
        assert Image.open(hits[0].local_path).size == world.ref_image(next(iter(world.refs))).size
        req = world.split("bench")[0]
        tools = Tools(text, images, world.knowledge, show_urls=True)
        traj = run_to_end(req, ExpertPolicy(world, ExpertNoise()), tools, seed=0)
        assert traj.termination == "answer" and traj.n_tool_calls >= 1


# --- the front door: every field checked, limits before work, the key on every route -------------------------

BAD_BODIES = [
    (b'{"q": "flag", "num": Infinity}', "not a number"), (b'{"q": "flag", "num": NaN}', "not a number"),
    (b'{"q": "flag", "num": 1e400}', "out of range"), (b'{"q": "flag", "num": -3}', "'num' must be a whole number"),
    (b'{"q": "flag", "num": 0}', "from 1 to 100"), (b'{"q": "flag", "num": 10000000000}', "from 1 to 100"),
    (b'{"q": "flag", "num": 2.5}', "'num'"), (b'{"q": "flag", "num": "5"}', "'num'"), (b'{"q": "flag", "num": true}', "'num'"),
    (b'{"q": 7}', "'q' must be a non-empty string"), (b'{"q": ["a"]}', "'q'"), (b'{"q": "   "}', "'q'"),
    (b'{"q": "\\ud800 flag"}', "lone surrogate"), (b'{"q": "a\\u0000b"}', "control character (U+0000)"),
    (b'{"q": "a\\u009bb"}', "control character"), (b'{"q": "%s"}' % (b"x" * 2001), "at most 2000"),
    (b'{"q": "\xff\xfe"}', "not valid JSON"), (b"", "empty"), (b"[" * 50000, "nested too deeply"), (b"[]", "batch is empty"),
    (b'"flag"', "JSON object"), (b"null", "JSON object"), (b'[{"q": "a"}, {"q": 1}]', "query 1: 'q'"),
    (("1" * 5000).encode(), "not valid JSON"),
]


@pytest.fixture(scope="module")
def gateway(user_store):
    store, _, _ = user_store
    return TestClient(build_gateway_app(store, embedder=HashEmbedder()))


@pytest.mark.parametrize("route", ["/search", "/images"])
def test_every_field_is_checked_with_a_message(gateway, route):
    for body, words in BAD_BODIES:
        r = gateway.post(route, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and words in r.json()["message"], (body[:40], r.status_code, r.text[:200])
    ok = gateway.post(route, json={"q": "Korsa 灯台 lighthouse 🗼 Ω", "num": 1})  # clean Unicode is welcome
    assert ok.status_code == 200 and ok.json()["searchParameters"]["q"] == "Korsa 灯台 lighthouse 🗼 Ω"


def test_the_batch_limit_comes_before_any_search(user_store, monkeypatch):
    store, _, _ = user_store
    calls = []
    embedder = HashEmbedder()
    monkeypatch.setattr(embedder, "encode", lambda texts, _enc=embedder.encode: calls.append(texts) or _enc(texts))
    client = TestClient(build_gateway_app(store, embedder=embedder, max_batch=64))
    r = client.post("/search", json=[{"q": "lighthouse"}] * 65)
    assert r.status_code == 400 and "at most 64" in r.json()["message"]
    r = client.post("/search", json=[{"q": "lighthouse"}, {"q": "bridge", "num": "many"}])  # the second is bad
    assert r.status_code == 400 and "query 1" in r.json()["message"]
    assert not calls  # neither request searched anything
    assert len(client.post("/search", json=[{"q": "lighthouse", "num": 1}] * 64).json()) == 64


def test_a_big_body_gets_413_not_a_reset_connection(user_store):
    store, _, _ = user_store
    with serve_app(build_gateway_app(store, embedder=HashEmbedder(), api_key="k")) as url:
        big = b'{"q": "' + b"x" * (3 * 1024 * 1024) + b'"}'
        r = httpx.post(f"{url}/search", content=big, headers={"X-API-KEY": "k", "content-type": "application/json"})
        assert r.status_code == 413 and "over 2097152 bytes" in r.json()["message"]
        chunks = (b"[" + b" " * 65536 for _ in range(48))  # no Content-Length: counted as it arrives
        r = httpx.post(f"{url}/search", content=chunks, headers={"X-API-KEY": "k"})
        assert r.status_code == 413
        r = httpx.post(f"{url}/search", content=big)  # without the key: refused, still answered
        assert r.status_code == 403
        assert httpx.post(f"{url}/search", json={"q": "lighthouse"}, headers={"X-API-KEY": "k"}).status_code == 200


def test_no_docs_pages_that_load_a_cdn(gateway):
    assert gateway.get("/docs").status_code == 404 and gateway.get("/redoc").status_code == 404
    assert gateway.get("/docs").json() == {"message": "Not Found", "statusCode": 404}  # Serper's error shape
    assert gateway.get("/openapi.json").status_code == 200


def test_the_key_guards_every_route_and_image_urls_are_signed(user_store, tmp_path):
    store, _, _ = user_store
    client = TestClient(build_gateway_app(store, embedder=HashEmbedder(), api_key="k"))
    h = {"X-API-KEY": "k"}
    for path in ("/health", "/openapi.json", "/files/ref-nope"):
        assert client.get(path).status_code == 403 and client.get(path, headers=h).status_code in (200, 404)
    assert client.post("/images", json={"q": "x"}, headers={"X-API-KEY": "K"}).status_code == 403
    imgs = client.post("/images", json={"q": "lighthouse bridge", "num": 2}, headers=h).json()["images"]
    a, b = (httpx.URL(i["imageUrl"]) for i in imgs)
    assert a.params["sig"] and client.get(f"{a.path}?sig={a.params['sig']}").status_code == 200  # no header needed
    assert client.get(a.path).status_code == 403
    assert client.get(f"{b.path}?sig={a.params['sig']}").status_code == 403  # one picture's signature opens only it
    tampered = a.params["sig"][:-1] + ("0" if a.params["sig"][-1] != "0" else "1")
    assert client.get(f"{a.path}?sig={tampered}").status_code == 403
    with serve_app(build_gateway_app(store, embedder=HashEmbedder(), api_key="k")) as url:
        hits = SerperImageSearch(base_url=url, api_key="k", download_dir=tmp_path, backoff=0).image_search("lighthouse", 1)
        assert len(hits) == 1 and Image.open(hits[0].local_path).size == (20, 30)


def test_pictures_are_labelled_with_their_true_media_type(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (8, 8), "red").save(src / "looks_like.jpg", format="PNG")  # PNG bytes, JPEG name
    Image.new("RGB", (8, 8), "blue").save(src / "real.jpg", format="JPEG")
    index_folder(src, tmp_path / "store", embedder=HashEmbedder(), log=lambda s: None)
    client = TestClient(build_gateway_app(tmp_path / "store", embedder=HashEmbedder()))
    types = {}
    for img in client.post("/images", json={"q": "picture", "num": 2}).json()["images"]:
        f = client.get(httpx.URL(img["imageUrl"]).path)
        types[f.content[:2]] = f.headers["content-type"]
        assert f.headers["x-content-type-options"] == "nosniff"
    assert types == {b"\x89P": "image/png", b"\xff\xd8": "image/jpeg"}


def test_fuzzed_bodies_never_get_a_500(gateway):
    """Malformed bodies of every shape: each gets an answer (200, 400 or 413), never a server error."""
    import json

    from hypothesis import HealthCheck, given, settings, strategies as st

    text = st.text(st.characters(categories=["Cs", "Cc", "Ll", "Lo", "Nd", "Zs", "So"]), max_size=12)
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | text
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=8)
    query = st.fixed_dictionaries({"q": text | values}, optional={"num": st.integers(-5, 200) | values})
    bodies = (values | query | st.lists(query, max_size=4)).map(lambda v: json.dumps(v).encode()) | st.binary(max_size=64)

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, route=st.sampled_from(["/search", "/images"]))
    def check(body, route):
        r = gateway.post(route, content=body, headers={"content-type": "application/json"})
        assert r.status_code in (200, 400, 413), (body, r.status_code, r.text[:200])
        assert isinstance(r.json(), list if r.status_code == 200 and body.lstrip().startswith(b"[") else dict)

    check()
