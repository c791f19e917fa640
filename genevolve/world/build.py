"""Build every sandbox asset from a seed: ``genevolve world build``.

Layout of the world folder (default ``assets/world``)::

    world.json        entities, events, seed
    corpus.jsonl      text documents (search)
    refs.jsonl        reference images with captions (image_search); refs/rNNNN.png
    skills/*.md       the eight skill cards (query_knowledge)
    requests.jsonl    Request records (sft / evolve / bench splits) with ground-truth scenes
    images/           content-addressed ground-truth images
    index/            FAISS indexes of MiniLM embeddings for corpus and references
    README.md         the world's rules
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

from PIL import Image
from tqdm import tqdm

from ..records.schema import ImageStore, Request, atomic_write_json, atomic_write_text, replace_dir, write_jsonl
from .entities import build_corpus, build_reference_specs, generate_world
from .requests import QA_CATEGORIES, difficulty, needed_skills, sample_scene, write_request, parse_request
from .scene import emblem_to_reference, render, render_emblem
from .skills import SKILL_CARDS

SPLITS = {"sft": 60, "evolve": 20, "bench": 10}  # requests per category (4 KA + 8 QA categories)
KA_CATEGORIES = ("flag", "crest", "landmark", "logo")


def _jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def sample_requests(w, rng: random.Random, split: str, per_category: int, seen: set[str], id_start: int = 0,
                    store: ImageStore | None = None) -> list[Request]:
    """``per_category`` new requests for each of the twelve categories, none whose text is in ``seen``.

    ``seen`` is updated. With ``store`` the ground-truth image is rendered and stored; without it the
    request has no ``gt_image`` (enough for expert trajectories, which never look at it).
    """
    out: list[Request] = []
    cats = [("knowledge", c) for c in KA_CATEGORIES] + [("quality", c) for c in QA_CATEGORIES]
    for track, cat in cats:
        n = 0
        while n < per_category:
            parsed = sample_scene(w, rng, track, cat)
            text = write_request(w, parsed, rng)
            if text in seen:
                continue
            # The text must read back to the same scene: the judge and the expert both rely on it.
            back = parse_request(text, w)
            if back.scene.to_dict() != parsed.scene.to_dict():
                raise AssertionError(f"request does not read back to its scene: {text}")
            seen.add(text)
            gt = store.put(render(parsed.scene)) if store is not None else None
            skills = needed_skills(parsed.scene)
            out.append(Request(
                id=f"{split}-{id_start + len(out):04d}", text=text, track=track, category=cat, skills=skills,
                difficulty=difficulty(skills, back.hops), split=split, gt_image=gt, scene=parsed.scene.to_dict(),
                entities=[o.entity for o in parsed.scene.objects if o.entity],
            ))
            n += 1
    return out


def build_world(out: str | Path, seed: int = 0, embedder=None, with_index: bool = True,
                log: Callable[[str], None] = print) -> dict:
    """Generate the world into ``out`` (replacing what is there) and return counts."""
    out = Path(out)
    tmp = out.with_name(out.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    w = generate_world(seed)
    atomic_write_json(tmp / "world.json", {"seed": seed, **w.to_dict()})
    log(f"entities: {len(w.entities)} ({', '.join(f'{k}: {len(w.by_kind(k))}' for k in ('nation', 'club', 'landmark', 'product'))}); events: {len(w.events)}")

    docs = build_corpus(w, seed)
    _jsonl(tmp / "corpus.jsonl", docs)
    log(f"corpus: {len(docs)} documents")

    refs = build_reference_specs(w, seed)
    (tmp / "refs").mkdir()
    for r in tqdm(refs, desc="references", leave=False):
        Image.fromarray(emblem_to_reference(render_emblem(r["emblem"]))).save(tmp / r["file"], optimize=False)
    _jsonl(tmp / "refs.jsonl", refs)
    log(f"references: {len(refs)} images ({sum(r['variant'] != 'official' for r in refs)} distractors)")

    (tmp / "skills").mkdir()
    for name, text in SKILL_CARDS.items():
        atomic_write_text(tmp / "skills" / f"{name}.md", text + "\n")

    store = ImageStore(tmp / "images")
    rng = random.Random(seed + 3)
    requests: list[Request] = []
    seen: set[str] = set()
    for split, per_cat in SPLITS.items():
        requests += sample_requests(w, rng, split, per_cat, seen, id_start=len(requests), store=store)
    write_jsonl(tmp / "requests.jsonl", requests)
    log(f"requests: {len(requests)} ({', '.join(f'{s}: {sum(r.split == s for r in requests)}' for s in SPLITS)})")

    from .docs import WORLD_README

    atomic_write_text(tmp / "README.md", WORLD_README)
    if with_index:
        from ..tools.local import build_indexes
        from ..tools.embed import default_embedder

        build_indexes(tmp, embedder or default_embedder())
        log("indexes: corpus.faiss, refs.faiss")

    replace_dir(tmp, out)
    return {"entities": len(w.entities), "events": len(w.events), "documents": len(docs), "references": len(refs),
            "requests": len(requests)}
