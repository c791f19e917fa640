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
    with pytest.raises(FileNotFoundError):
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
    assert client.get("/files/../../etc/passwd").status_code == 404
    assert client.get("/files/ref-nope").status_code == 404
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
