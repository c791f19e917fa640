"""The editable reference store: validated uploads, captions, removal, and an index that stays consistent."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from genevolve.tools.embed import HashEmbedder
from genevolve.tools.refstore import MAX_CAPTION, RefStoreError, ReferenceStore, check_image, clean_caption, safe_name
from genevolve.tools.faiss_store import VectorIndex, is_current
from genevolve.tools.local import texts_fingerprint, ref_text


def png(color="red", size=(24, 20), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def store(tmp_path):
    (tmp_path / "refs").mkdir()
    rows = []
    for i, (title, color) in enumerate([("Official flag of Veloria", "teal"), ("Crest of the Broudor Comets", "orange"),
                                        ("Logo of Quill Rockets", "blue")], 1):
        rid = f"r{i:04d}"
        (tmp_path / "refs" / f"{rid}.png").write_bytes(png(color))
        rows.append({"id": rid, "title": title, "file": f"refs/{rid}.png", "entity": f"e{i}", "variant": "official"})
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ReferenceStore(tmp_path, embedder=HashEmbedder(64))


def assert_index_matches_rows(store: ReferenceStore):
    emb = store.embedder
    texts = [ref_text(r) for r in store.rows()]
    assert is_current(store.index_path, emb.name, emb.dim, len(texts), texts_fingerprint(texts))
    index = VectorIndex.load(store.index_path)
    assert sorted(index.ids().tolist()) == list(range(len(texts)))
    np.testing.assert_allclose(index.reconstruct(range(len(texts))), emb.encode(texts), atol=1e-6)


def test_upload_caption_and_remove_keep_rows_and_index_consistent(store):
    store.search("flag", 2)  # builds the index the way the agent's image_search does
    row = store.add(png("green"), "A green test banner for the studio", filename="../../etc/passwd")
    assert row["id"] == "u0001" and row["file"] == "refs/u0001.png" and row["source_name"] == "passwd"
    assert (store.root / "refs" / "u0001.png").exists()
    assert store.search("green test banner", 1)[0][1]["id"] == "u0001"
    assert_index_matches_rows(store)

    store.set_caption("r0002", "Mascot of the Harbor Owls")
    assert store.get("r0002")["title"] == "Mascot of the Harbor Owls"
    assert store.search("Harbor Owls mascot", 1)[0][1]["id"] == "r0002"
    assert_index_matches_rows(store)

    store.remove("r0001")
    assert [r["id"] for r in store.rows()] == ["r0002", "r0003", "u0001"]
    assert not (store.root / "refs" / "r0001.png").exists()
    assert_index_matches_rows(store)
    assert store.search("green test banner", 1)[0][1]["id"] == "u0001"  # rows after the removed one moved up
    assert store.add(png(), "Another one")["id"] == "u0002"


def test_a_stale_index_is_rebuilt_on_change(store):
    store.search("flag", 1)
    (store.root / "index" / "refs.faiss.meta.json").write_text("{}")
    store.set_caption("r0003", "Logo of the Quill Rockets, 2031")
    assert_index_matches_rows(store)


def test_bad_uploads_are_refused_with_clear_messages_and_nothing_written(store, tmp_path):
    before = (store.root / "refs.jsonl").read_text()
    with pytest.raises(RefStoreError, match="not a readable image"):
        store.add(b"%PDF-1.4 not an image at all", "caption")
    with pytest.raises(RefStoreError, match="BMP files are not accepted"):
        store.add(png(fmt="BMP"), "caption")
    with pytest.raises(RefStoreError, match="pixels"):
        store.add(png(size=(5000, 10)), "caption")
    with pytest.raises(RefStoreError, match="empty"):
        store.add(png(), "   ")
    with pytest.raises(RefStoreError, match="empty"):
        store.add(b"", "caption")
    with pytest.raises(RefStoreError, match="no reference"):
        store.remove("r9999")
    assert (store.root / "refs.jsonl").read_text() == before
    assert sorted(p.name for p in (store.root / "refs").iterdir()) == ["r0001.png", "r0002.png", "r0003.png"]


def test_validators():
    assert clean_caption("  two\n lines\x00 ") == "two lines"
    with pytest.raises(RefStoreError, match="characters"):
        clean_caption("x" * (MAX_CAPTION + 1))
    assert safe_name("..\\..\\windows\\evil name.png") == "evil_name.png"
    assert safe_name("/") == "upload"
    assert check_image(png(size=(3, 2))).size == (3, 2)
    rgba = io.BytesIO()
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(rgba, format="PNG")
    assert check_image(rgba.getvalue()).getpixel((0, 0)) == (255, 255, 255)  # transparent pixels on white


def test_rows_pointing_outside_the_store_are_refused(store):
    rows = store.rows()
    rows[0]["file"] = "../outside.png"
    (store.root / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RefStoreError, match="outside the store"):
        store.remove("r0001")
