"""Tool backends: formatter golden strings, embedders, the FAISS store, local stores, skill cards, Serper."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from genevolve.tools.embed import HashEmbedder, MiniLMEmbedder
from genevolve.records.schema import SKILLS, ImageRef
from genevolve.tools.base import ImageHit, format_image_results, format_text_results
from genevolve.tools.faiss_store import VectorIndex, is_current, read_meta
from genevolve.tools.knowledge import SkillCards
from genevolve.tools.local import LocalImageSearch, LocalTextSearch, build_indexes, snippet
from genevolve.tools.serper import SerperImageSearch, SerperTextSearch

# ---------------------------------------------------------------------------
# formatters
# ---------------------------------------------------------------------------


def test_format_text_results_golden():
    items = [
        {"title": " Veloria flag ", "link": "https://a.example/flag", "snippet": " Three stripes. "},
        {"title": "No url", "snippet": "only a snippet"},
        {"title": "No snippet", "url": "https://b.example"},
        {"title": "cut by top_k", "link": "https://c.example", "snippet": "x"},
    ]
    assert format_text_results("veloria flag", items, top_k=3) == (
        "--- search result for [veloria flag] ---\n"
        "1. title: Veloria flag\n"
        "  url: https://a.example/flag\n"
        "  snippet: Three stripes.\n"
        "2. title: No url\n"
        "  snippet: only a snippet\n"
        "3. title: No snippet\n"
        "  url: https://b.example\n"
        "--- end of search result ---"
    )


def test_format_text_results_empty():
    assert format_text_results("q", [], 5) == "--- search result for [q] ---\n--- end of search result ---"


def test_format_image_results_golden():
    refs = [
        ImageRef(img_id="IMG_001", title="Veloria flag", url="sandbox://refs/r0001.png",
                 local_path="/store/refs/r0001.png", page_url="https://p.example"),
        {"img_id": "IMG_002", "url": "https://x.example/b.jpg", "local_path": "/tmp/b.jpg"},
    ]
    assert format_image_results("veloria flag", refs) == (
        "--- image search result for [veloria flag] ---\n"
        "IMG_001: title: Veloria flag\n"
        "  url: sandbox://refs/r0001.png\n"
        "  local_path: /store/refs/r0001.png\n"
        "  page_url: https://p.example\n"
        "IMG_002: title: image\n"
        "  url: https://x.example/b.jpg\n"
        "  local_path: /tmp/b.jpg\n"
        "--- end of image search result ---"
    )
    assert format_image_results("veloria flag", refs, show_paths=False) == (
        "--- image search result for [veloria flag] ---\n"
        "IMG_001: title: Veloria flag\n"
        "  url: sandbox://refs/r0001.png\n"
        "  page_url: https://p.example\n"
        "IMG_002: title: image\n"
        "  url: https://x.example/b.jpg\n"
        "--- end of image search result ---"
    )


def test_snippet_cuts_at_word_boundary():
    text = "word " * 100
    s = snippet(text)
    assert len(s) <= 300 and s.endswith("word") and not s.endswith(" ")
    assert snippet("short text") == "short text"
    assert len(snippet("x" * 1000)) == 300


# ---------------------------------------------------------------------------
# embedders
# ---------------------------------------------------------------------------


def test_hash_embedder_properties():
    emb = HashEmbedder(128)
    assert emb.name == "hash-128" and emb.dim == 128
    texts = ["the flag of Veloria", "Veloria flag with three stripes", "a bowl of hot soup", ""]
    a, b = emb.encode(texts), HashEmbedder(128).encode(texts)
    assert a.dtype == np.float32 and a.shape == (4, 128)
    np.testing.assert_array_equal(a, b)  # deterministic across instances (and processes: blake2b)
    np.testing.assert_allclose(np.linalg.norm(a[:3], axis=1), 1.0, atol=1e-5)
    assert not np.isnan(a).any()  # the empty text is a zero row, not NaN
    assert a[0] @ a[1] > a[0] @ a[2]


def test_minilm_embedder_real_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    emb = MiniLMEmbedder()
    assert emb._model is None  # nothing loads before the first encode
    v = emb.encode(["flag of a nation", "national flag with stripes", "a bowl of soup"])
    assert v.shape == (3, 384) and v.dtype == np.float32 and emb.dim == 384
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2]


# ---------------------------------------------------------------------------
# VectorIndex
# ---------------------------------------------------------------------------


def test_vector_index_round_trip(tmp_path: Path):
    vecs = HashEmbedder(64).encode(["red apple", "green pear", "blue sky", "yellow banana"])
    index = VectorIndex(64, embedder="hash-64")
    index.add([10, 11, 12, 13], vecs)
    assert len(index) == 4
    scores, ids = index.search(vecs[2:3], 2)
    assert ids[0, 0] == 12 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)

    assert index.remove([12, 99]) == 1
    assert len(index) == 3
    _, ids = index.search(vecs[2:3], 5)
    assert 12 not in ids[0] and list(ids[0, 3:]) == [-1, -1]

    index.add([10], vecs[3:4])  # re-adding an id replaces it
    assert len(index) == 3
    _, ids = index.search(vecs[3:4], 2)
    assert set(ids[0]) == {10, 13}

    path = tmp_path / "sub" / "x.faiss"
    index.save(path)
    assert read_meta(path).items() >= {"embedder": "hash-64", "dim": 64, "count": 3}.items()  # and the file's size and SHA-256
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    loaded = VectorIndex.load(path)
    assert len(loaded) == 3 and loaded.embedder == "hash-64" and sorted(loaded.ids()) == [10, 11, 13]
    np.testing.assert_array_equal(loaded.search(vecs, 3)[1], index.search(vecs, 3)[1])


def test_vector_index_stale_detection(tmp_path: Path):
    path = tmp_path / "x.faiss"
    assert not is_current(path, "hash-8", 8, 0)
    index = VectorIndex(8, embedder="hash-8")
    index.add([0, 1], np.eye(2, 8, dtype=np.float32))
    index.save(path)
    assert is_current(path, "hash-8", 8, 2)
    assert not is_current(path, "all-MiniLM-L6-v2", 8, 2)
    assert not is_current(path, "hash-8", 8, 3)
    with pytest.raises(ValueError, match=r"expected vectors of shape \(N, 8\), got \(1, 4\)"):
        index.add([5], np.ones((1, 4), np.float32))


# ---------------------------------------------------------------------------
# local stores
# ---------------------------------------------------------------------------

DOCS = [
    {"id": "d0001", "title": "Flag of Veloria", "url": "sandbox://doc/d0001",
     "text": "The flag of Veloria has three horizontal stripes: teal, white and orange, with a gold star."},
    {"id": "d0002", "title": "Aurora Cup 2031", "url": "sandbox://doc/d0002",
     "text": "The 2031 Aurora Cup football tournament was won by Veloria after extra time."},
    {"id": "d0003", "title": "Mount Kessar", "url": "sandbox://doc/d0003",
     "text": "Mount Kessar is a snowy twin-peaked mountain overlooking the harbour city of Ostrel."},
]
REFS = [
    {"id": "r0001", "title": "Flag of Veloria", "entity": "veloria", "variant": "true", "color": (0, 128, 128)},
    {"id": "r0002", "title": "Mascot of Ostrel Rovers, a red fox", "entity": "ostrel_rovers", "variant": "true",
     "color": (200, 60, 0)},
    {"id": "r0003", "title": "Twin peaks of Mount Kessar", "entity": "kessar", "variant": "true",
     "color": (240, 240, 255)},
]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    (root / "refs").mkdir(parents=True)
    _write_jsonl(root / "corpus.jsonl", DOCS)
    refs = []
    for r in REFS:
        Image.new("RGB", (16, 16), r["color"]).save(root / "refs" / f"{r['id']}.png")
        refs.append({k: v for k, v in r.items() if k != "color"} | {"file": f"refs/{r['id']}.png"})
    _write_jsonl(root / "refs.jsonl", refs)
    return root


def test_local_text_search(store: Path):
    search = LocalTextSearch(store, embedder=HashEmbedder())
    out = search.search(["Aurora Cup winner", "  ", "flag of Veloria"], top_k=2)
    blocks = out.split("\n--- search result for ")
    assert len(blocks) == 2
    assert blocks[0].startswith("--- search result for [Aurora Cup winner] ---\n1. title: Aurora Cup 2031\n")
    assert "  url: sandbox://doc/d0002\n  snippet: The 2031 Aurora Cup" in blocks[0]
    assert blocks[1].startswith("[flag of Veloria] ---\n1. title: Flag of Veloria\n")
    assert out.count("--- end of search result ---") == 2
    assert "3. title" not in out
    assert search.search([]) == "[search] empty queries"
    assert search.search(["", " "]) == "[search] no results"
    score, row = search.search_records("snowy mountain Kessar", 1)[0]
    assert row["id"] == "d0003" and 0 < score <= 1.0001
    assert (store / "index" / "corpus.faiss").exists()
    assert read_meta(store / "index" / "corpus.faiss")["embedder"] == "hash-256"


def test_local_image_search(store: Path):
    images = LocalImageSearch(store, embedder=HashEmbedder())
    hits = images.image_search("red fox mascot", top_k=2)
    assert len(hits) == 2 and isinstance(hits[0], ImageHit)
    top = hits[0]
    assert top.source_id == "r0002" and top.title == "Mascot of Ostrel Rovers, a red fox"
    assert top.url == "sandbox://refs/r0002.png"
    assert Path(top.local_path).is_absolute() and Path(top.local_path).is_file()
    assert images.search_records("flag of Veloria", 1)[0][1]["entity"] == "veloria"


def test_local_search_rebuilds_when_corpus_grows(store: Path):
    emb = HashEmbedder()
    build_indexes(store, emb)
    assert read_meta(store / "index" / "corpus.faiss")["count"] == 3
    assert read_meta(store / "index" / "refs.faiss")["count"] == 3
    new_doc = {"id": "d0004", "title": "Glass lanterns of Ostrel", "url": "sandbox://doc/d0004",
               "text": "Ostrel is famous for blue glass lanterns hung over every street."}
    _write_jsonl(store / "corpus.jsonl", DOCS + [new_doc])
    search = LocalTextSearch(store, embedder=emb)
    assert search.search_records("blue glass lanterns", 1)[0][1]["id"] == "d0004"
    assert read_meta(store / "index" / "corpus.faiss")["count"] == 4

    # A same-size edit is caught too (the sidecar fingerprints the embedded texts).
    edited = [dict(DOCS[0], title="Anthem of Veloria", text="A slow anthem sung in spring.")] + DOCS[1:] + [new_doc]
    _write_jsonl(store / "corpus.jsonl", edited)
    search.reload()
    assert search.search_records("slow anthem sung in spring", 1)[0][1]["title"] == "Anthem of Veloria"


def test_local_store_errors(tmp_path: Path, store: Path):
    with pytest.raises(FileNotFoundError, match="nope"):
        LocalTextSearch(tmp_path / "nope", embedder=HashEmbedder()).search(["x"])
    (store / "refs.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="refs.jsonl"):
        LocalImageSearch(store, embedder=HashEmbedder()).image_search("x")
    with (store / "corpus.jsonl").open("a") as fh:
        fh.write("{not json\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl:4"):
        LocalTextSearch(store, embedder=HashEmbedder()).search(["x"])


# ---------------------------------------------------------------------------
# skill cards
# ---------------------------------------------------------------------------


def test_skill_cards(tmp_path: Path):
    (tmp_path / "spatial_layout.md").write_text("Use positional words.\n", encoding="utf-8")
    cards = SkillCards(tmp_path)
    assert cards.query("spatial_layout") == "## Skill Guidance\n\n=== Skill: spatial_layout ===\nUse positional words."
    assert cards.query("juggling") == "Unknown skill 'juggling'. Available skills: " + ", ".join(SKILLS)
    missing = cards.query("text_rendering")
    assert "text_rendering.md" in missing and "Skill Guidance" not in missing
    assert cards.names() == ["spatial_layout"]


# ---------------------------------------------------------------------------
# Serper clients
# ---------------------------------------------------------------------------

ORGANIC = {"organic": [
    {"title": "Veloria - Wiki", "link": "https://wiki.example/Veloria", "snippet": "Veloria is a nation."},
    {"title": "Aurora Cup", "link": "https://wiki.example/Aurora", "snippet": "Won by Veloria."},
]}


def _png_bytes(color=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_serper_text_request_and_format():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=ORGANIC)

    client = SerperTextSearch(base_url="https://serper.test/", api_key="k123", backoff=0,
                              transport=httpx.MockTransport(handler))
    out = client.search(["veloria"], top_k=1)
    assert out == (
        "--- search result for [veloria] ---\n"
        "1. title: Veloria - Wiki\n"
        "  url: https://wiki.example/Veloria\n"
        "  snippet: Veloria is a nation.\n"
        "--- end of search result ---"
    )
    (req,) = seen
    assert req.method == "POST" and str(req.url) == "https://serper.test/search"
    assert req.headers["X-API-KEY"] == "k123"
    assert json.loads(req.content) == {"q": "veloria", "num": 1}
    assert client.search([]) == "[search] empty queries"


def test_serper_text_retries_then_succeeds_and_429_retried():
    calls = []
    codes = [503, 429]

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        if codes:
            return httpx.Response(codes.pop(0), text="busy")
        return httpx.Response(200, json=ORGANIC)

    client = SerperTextSearch(base_url="https://serper.test", api_key="k", max_retries=3, backoff=0,
                              transport=httpx.MockTransport(handler))
    out = client.search(["veloria"], top_k=5)
    assert len(calls) == 4 and "2. title: Aurora Cup" in out


def test_serper_text_exhaustion_becomes_error_block():
    calls = {"bad": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        q = json.loads(request.content)["q"]
        if q == "bad":
            calls["bad"] += 1
            return httpx.Response(500, text="boom")
        return httpx.Response(200, json=ORGANIC)

    client = SerperTextSearch(base_url="https://serper.test", api_key="k", max_retries=2, backoff=0,
                              transport=httpx.MockTransport(handler))
    out = client.search(["bad", "good"], top_k=1)
    assert calls["bad"] == 3
    first, second = out.split("\n", 1)
    assert first == "--- search error for [bad]: HTTP 500 after 3 attempts ---"
    assert second.startswith("--- search result for [good] ---\n1. title: Veloria - Wiki")


def test_serper_client_error_not_retried():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(403, text="bad key")

    client = SerperTextSearch(base_url="https://serper.test", api_key="k", backoff=0,
                              transport=httpx.MockTransport(handler))
    assert client.search(["q"]) == "--- search error for [q]: HTTP 403: bad key ---"
    assert len(calls) == 1


def test_serper_key_rules(monkeypatch):
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    monkeypatch.delenv("SERPER_BASE_URL", raising=False)
    with pytest.raises(RuntimeError, match="SERPER_API_KEY"):
        SerperTextSearch()
    with pytest.raises(RuntimeError, match="SERPER_API_KEY"):
        SerperImageSearch(base_url="https://gateway.example")

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"organic": []})

    for base in ("http://127.0.0.1:8765", "http://localhost:8765", "http://[::1]:8765"):
        client = SerperTextSearch(base_url=base, backoff=0, transport=httpx.MockTransport(handler))
        assert client.search(["q"]) == "--- search result for [q] ---\n--- end of search result ---"
    assert all("X-API-KEY" not in r.headers for r in seen)

    monkeypatch.setenv("SERPER_API_KEY", "from-env")
    monkeypatch.setenv("SERPER_BASE_URL", "https://env.example")
    client = SerperTextSearch(transport=httpx.MockTransport(handler))
    client.search(["q"])
    assert seen[-1].headers["X-API-KEY"] == "from-env" and seen[-1].url.host == "env.example"


def test_serper_image_search_downloads(tmp_path: Path):
    png = _png_bytes()
    data_uri = "data:image/png;base64," + base64.b64encode(_png_bytes((200, 0, 0))).decode()
    posts, gets = [], []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            posts.append(request)
            return httpx.Response(200, json={"images": [
                {"title": "Veloria flag", "imageUrl": "https://img.example/flag.png", "link": "https://p.example/1"},
                {"title": "broken", "imageUrl": "https://img.example/not-an-image.jpg"},
                {"title": "inline", "image_url": data_uri, "source": "https://p.example/3"},
                {"title": "missing", "thumbnailUrl": "https://img.example/gone.png"},
                {"title": "malformed", "url": "http://[::1"},
                {"title": "no url at all"},
            ]})
        gets.append(request)
        assert "X-API-KEY" not in request.headers  # the key never leaks to image hosts
        if request.url.path == "/flag.png":
            return httpx.Response(200, content=png)
        if request.url.path == "/gone.png":
            return httpx.Response(404)
        return httpx.Response(200, content=b"<html>not an image</html>")

    client = SerperImageSearch(base_url="https://serper.test", api_key="k", download_dir=tmp_path / "dl",
                               backoff=0, transport=httpx.MockTransport(handler))
    hits = client.image_search("veloria flag", top_k=10)
    assert client.last_error is None
    assert json.loads(posts[0].content) == {"q": "veloria flag", "num": 10}
    assert str(posts[0].url) == "https://serper.test/images" and posts[0].headers["X-API-KEY"] == "k"
    assert [h.title for h in hits] == ["Veloria flag", "inline"]
    assert hits[0].url == "https://img.example/flag.png" and hits[0].page_url == "https://p.example/1"
    assert hits[1].page_url == "https://p.example/3"
    assert Path(hits[0].local_path).read_bytes() == png and hits[0].local_path.endswith(".png")
    assert Path(hits[1].local_path).is_file()
    assert {u for u, _ in client.dropped} == {
        "https://img.example/not-an-image.jpg", "https://img.example/gone.png", "http://[::1"}
    assert not list((tmp_path / "dl").glob("*.part")) and len(list((tmp_path / "dl").iterdir())) == 2

    n_gets = len(gets)
    again = client.image_search("veloria flag", top_k=1)
    assert again[0].local_path == hits[0].local_path and len(gets) == n_gets  # reused, not re-downloaded


def test_serper_image_search_failure_recorded(tmp_path: Path):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(502)

    client = SerperImageSearch(base_url="https://serper.test", api_key="k", download_dir=tmp_path,
                               max_retries=2, backoff=0, transport=httpx.MockTransport(handler))
    assert client.image_search("anything") == []
    assert len(calls) == 3 and client.last_error == "HTTP 502 after 3 attempts"


def test_a_shipped_store_is_never_written_when_its_index_is_rebuilt(tmp_path, monkeypatch):
    """Searching the shipped world with another embedder rebuilds the index into the data folder, not into assets/."""
    from genevolve.records.paths import index_cache
    from genevolve.world import DEFAULT_WORLD

    monkeypatch.setenv("GENEVOLVE_DATA", str(tmp_path / "data"))
    before = {p: p.stat().st_mtime_ns for p in (DEFAULT_WORLD / "index").iterdir()}
    search = LocalTextSearch(DEFAULT_WORLD, embedder=HashEmbedder(32))
    assert search.search_records("flag of Veloria", 1)
    assert {p: p.stat().st_mtime_ns for p in (DEFAULT_WORLD / "index").iterdir()} == before
    cached = index_cache(DEFAULT_WORLD / "index" / "corpus.faiss")
    assert cached.exists() and read_meta(cached)["embedder"] == "hash-32"
