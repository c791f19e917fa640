"""The offline sandbox world: fictional knowledge, stores, skill cards, a literal generator and a pixel judge.

The rules are written out in ``assets/world/README.md`` (from :mod:`genevolve.world.docs`) and in
the docstrings of :mod:`.generator` (how prompts fail), :mod:`.judge` (how images are scored),
:mod:`.requests` (which skills a request needs) and :mod:`.entities` (what the world knows).

:class:`World` opens a built world folder and hands out its requests, tools, generator and judge.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

from ..records.schema import ImageStore, Request, read_jsonl

DEFAULT_WORLD = Path(__file__).resolve().parents[2] / "assets" / "world"


def default_world_dir() -> Path:
    return Path(os.environ.get("GENEVOLVE_WORLD", DEFAULT_WORLD))


class World:
    """A built sandbox world folder. Everything loads lazily on first use."""

    def __init__(self, root: str | os.PathLike | None = None, embedder=None, refs_root: str | os.PathLike | None = None):
        self.root = Path(root) if root else default_world_dir()
        if not (self.root / "world.json").exists():
            raise FileNotFoundError(
                f"no sandbox world at {self.root} (world.json missing); build it with `genevolve world build`"
            )
        self._embedder = embedder
        # The reference store the agent searches: the world's own, or an editable copy in a user's data folder.
        self.refs_root = Path(refs_root) if refs_root else self.root

    # -- knowledge --------------------------------------------------------
    @cached_property
    def data(self):
        from .entities import WorldData

        return WorldData.from_dict(json.loads((self.root / "world.json").read_text("utf-8")))

    @cached_property
    def requests(self) -> list[Request]:
        return read_jsonl(self.root / "requests.jsonl", Request)

    @cached_property
    def _by_id(self) -> dict[str, Request]:
        return {r.id: r for r in self.requests}

    def split(self, name: str) -> list[Request]:
        out = [r for r in self.requests if r.split == name]
        if not out:
            raise KeyError(f"no requests in split {name!r}; splits: {sorted({r.split for r in self.requests})}")
        return out

    def request(self, id_or_text: str) -> Request:
        """A sandbox request by id or by exact text, or a new ad-hoc request read from free text.

        Free text the world cannot read still becomes a request, with no scene and nothing invented
        (no track, category or difficulty); judging it records why instead of scoring it. Nothing is
        written: a free-text request names its ground truth by hash, rendered from its scene on demand.
        """
        if id_or_text in self._by_id:
            return self._by_id[id_or_text]
        for r in self.requests:
            if r.text == id_or_text:
                return r
        import re

        if re.fullmatch(r"(sft|evolve|bench)-\d+", id_or_text.strip()):
            split = self.split(id_or_text.split("-")[0])
            raise KeyError(f"no sandbox request with id {id_or_text!r} (the {split[0].split} split runs from "
                           f"{split[0].id} to {split[-1].id})")
        from .requests import ParseError, difficulty, needed_skills, parse_request
        from .scene import render

        rid = "adhoc-" + hashlib.sha1(id_or_text.encode("utf-8")).hexdigest()[:10]
        try:
            parsed = parse_request(id_or_text, self.data)
        except ParseError as exc:
            return Request(id=rid, text=id_or_text, split="adhoc", track=None, category=None, difficulty=None,
                           parse_error=str(exc))
        gt = ImageStore.digest(render(parsed.scene))
        track = "knowledge" if parsed.mentions else "quality"
        skills = needed_skills(parsed.scene)
        return Request(id=rid, text=id_or_text, track=track, category="adhoc", skills=skills,
                       difficulty=difficulty(skills, parsed.hops), split="adhoc",
                       gt_image=gt, scene=parsed.scene.to_dict(),
                       entities=[o.entity for o in parsed.scene.objects if o.entity])

    def parse(self, text: str):
        from .requests import parse_request

        return parse_request(text, self.data)

    # -- stores and tools -----------------------------------------------------
    @cached_property
    def images(self) -> ImageStore:
        return ImageStore(self.root / "images")

    @cached_property
    def refs(self) -> dict[str, dict[str, Any]]:
        rows = [json.loads(line) for line in (self.refs_root / "refs.jsonl").read_text("utf-8").splitlines() if line.strip()]
        return {r["id"]: r for r in rows}

    def ref_image(self, ref_id: str):
        from PIL import Image

        with Image.open(self.refs_root / self.refs[ref_id]["file"]) as im:
            return im.convert("RGB")

    @cached_property
    def text_search(self):
        from ..tools.local import LocalTextSearch

        return LocalTextSearch(self.root, self._embedder)

    @cached_property
    def image_search(self):
        from ..tools.local import LocalImageSearch

        return LocalImageSearch(self.refs_root, self._embedder)

    @cached_property
    def knowledge(self):
        from ..tools.knowledge import SkillCards

        return SkillCards(self.root / "skills")

    @cached_property
    def generator(self):
        from .generator import SandboxGenerator

        return SandboxGenerator()

    @cached_property
    def judge(self):
        from .judge import SandboxJudge

        return SandboxJudge()

    def gt_image(self, request: Request):
        """The ground-truth image of a request (rendered from its scene when not stored)."""
        from PIL import Image

        from .scene import Scene, render

        if request.gt_image and request.gt_image in self.images:
            return self.images.get(request.gt_image)
        if request.scene is None:
            raise ValueError(f"request {request.id} has no ground truth: {request.parse_error or 'it has no scene'}")
        return Image.fromarray(render(Scene.from_dict(request.scene)))
