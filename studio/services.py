"""What the studio works with, created once and shared by every session: the world, the run folders,
the embedder, the experience banks, the reference store, loaded policies and the distill job.

Actions that touch models or disk live here (rolling out, benching, trying a guide); the views turn
their results into UI values with the pure functions of :mod:`studio.html` and the view modules.
Nothing here imports gradio.

The shipped world is only read: reference uploads and edits go to an editable copy of its reference
store in the data folder (``--data-dir``, ``$GENEVOLVE_DATA``), which the agent's image_search then searches.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from genevolve.records.schema import ImageStore, Request, RunInfo, Trajectory, Verdict

from . import StudioError
from .jobs import DistillJobs

EXPERT, EXPERT_NOISY, RAW, TINY = "expert", "expert (cold-start)", "raw", "tiny"
ADAPTER_PREFIX = "tiny + "
STUDIO_BANK = "studio-bank"


def device_label() -> str:
    import os

    import torch

    if torch.cuda.is_available():
        return f"CUDA GPU ({torch.cuda.get_device_name(0)})"
    return f"CPU ({torch.get_num_threads()} threads of {os.cpu_count()} cores)"


def spread(items: list, n: int | None) -> list:
    """``n`` items spread evenly over the list, in order (a split is sorted by track: its first N would hold one track)."""
    if not n or int(n) >= len(items):
        return list(items)
    n = int(n)
    return [items[i * len(items) // n] for i in range(n)]


@dataclass
class Services:
    world: Any
    runs_dir: Path
    embedder: Any
    refs: Any
    jobs: DistillJobs
    device: str
    data_dir: Path | None = None
    demo: Any = None  # studio.demo.Demo, or None when the first screen's demo is turned off
    _banks: dict[str, Any] = field(default_factory=dict)
    _policies: dict[str, Any] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    @classmethod
    def create(cls, world_dir: str | Path | None = None, runs_dir: str | Path | None = None, embedder=None,
               data_dir: str | Path | None = None, demo: bool = False) -> "Services":
        """The studio's services. ``runs_dir`` defaults to the runs folder the commands write to (``$GENEVOLVE_RUNS``,
        else runs/ in the data folder); with ``demo`` the first screen's demo is made there on first start."""
        from genevolve.tools.embed import default_embedder
        from genevolve.records.paths import data_dir as default_data_dir
        from genevolve.records.paths import runs_dir as default_runs_dir
        from genevolve.records.paths import user_references
        from genevolve.tools.refstore import ReferenceStore
        from genevolve.world import World

        embedder = embedder or default_embedder()
        data = default_data_dir(data_dir).resolve()
        world = World(world_dir, embedder=embedder)
        world.refs_root = user_references(world.root, data)
        runs = default_runs_dir(runs_dir).resolve()
        runs.mkdir(parents=True, exist_ok=True)
        made = None
        if demo:
            from .demo import Demo

            made = Demo(runs, world.root)
            made.ensure()
        return cls(world=world, runs_dir=runs, embedder=embedder, refs=ReferenceStore(world.refs_root, embedder),
                   jobs=DistillJobs(runs, world.root), device=device_label(), data_dir=data, demo=made)

    # -- requests ----------------------------------------------------------------
    def request_choices(self, split: str = "bench") -> list[str]:
        return [f"{r.id} · {r.text}" for r in self.world.split(split)]

    @staticmethod
    def request_note(request: Request) -> str:
        """What to say about a request before its results: empty for one the sandbox can judge."""
        from genevolve.world.requests import outside_world_note

        return "" if request.scene is not None else outside_world_note(request.parse_error)

    def resolve_request(self, value: str) -> Request:
        """A request from a dropdown entry ("bench-0960 · text"), an id, or free text."""
        value = (value or "").strip()
        if not value:
            raise StudioError("pick a bench request or type one")
        m = re.match(r"^((?:sft|evolve|bench)-\d+) · ", value)
        try:
            return self.world.request(m.group(1) if m else value)
        except KeyError as exc:
            raise StudioError(exc.args[0]) from None

    # -- policies ----------------------------------------------------------------
    def policy_choices(self) -> list[str]:
        adapters = sorted(self.runs_dir.glob("**/checkpoint/adapter/adapter_config.json"))
        return [EXPERT_NOISY, EXPERT, RAW, TINY] + [ADAPTER_PREFIX + str(p.parent.relative_to(self.runs_dir)) for p in adapters]

    def policy(self, name: str):
        """A policy by its studio name (None for raw); local models load once and are shared."""
        from genevolve.agent.expert import ExpertNoise, ExpertPolicy

        name = (name or "").strip()
        if name == EXPERT:
            return ExpertPolicy(self.world, ExpertNoise(), name="expert")
        if name == EXPERT_NOISY:
            return ExpertPolicy(self.world, ExpertNoise.cold_start(), name="expert[cold-start]")
        if name == RAW:
            return None
        with self._lock:
            if name not in self._policies:
                from genevolve.policies.resolve import resolve_policy

                try:
                    if name.startswith(ADAPTER_PREFIX):
                        adapter = self.runs_dir / name[len(ADAPTER_PREFIX):]
                        pol = resolve_policy(TINY, adapter=str(adapter))
                        pol.name = name
                    else:
                        pol = resolve_policy(name)
                except (ValueError, FileNotFoundError, OSError) as exc:
                    raise StudioError(f"cannot load policy {name!r}: {exc}") from None
                self._policies[name] = pol
            return self._policies[name]

    def _trajectories(self, requests: list[Request], pol, k: int, seed: int, guides: dict[str, str] | None = None,
                      on_turn: Callable[[int, int], None] | None = None) -> list[Trajectory]:
        from genevolve.agent.loop import Tools
        from genevolve.evaluation.bench import trajectories
        from genevolve.policies.base import SamplingParams

        params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=384)
        with self._lock if pol is not None and pol.needs_exclusive_device else contextlib.nullcontext():
            return trajectories(requests, pol, Tools.for_world(self.world), k, seed, params, guides, on_turn)

    def _evaluate(self, requests: list[Request], pol, seeds: list[int], writer, samples: int = 1,
                  progress: Callable[[str], None] | None = None, on_turn: Callable[[int, int], None] | None = None):
        """:func:`genevolve.evaluation.bench.evaluate` on the sandbox, every case written to ``writer``'s run folder."""
        from genevolve.agent.loop import Tools
        from genevolve.evaluation.bench import SandboxScorer, evaluate
        from genevolve.policies.base import SamplingParams

        params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=384)
        with self._lock if pol is not None and pol.needs_exclusive_device else contextlib.nullcontext():
            return evaluate(requests, pol, Tools.for_world(self.world), SandboxScorer(self.world), writer.images, seeds,
                            samples=samples, params=params, on_case=lambda c: writer.add(c.trajectory, c.rendered, c.verdict),
                            progress=progress,
                            on_turn=on_turn and (lambda _s, done, total: on_turn(done, total)))

    # -- rollouts ----------------------------------------------------------------
    def run_rollouts(self, request: Request, policy_name: str, k: int, seed: int,
                     progress: Callable[[int, int], None] | None = None) -> Path:
        """K trajectories for one request, rendered and judged, written as a run folder (as `genevolve rollout`)."""
        from genevolve.records.runs import RunWriter, new_run_id, now_iso

        if not 1 <= int(k) <= 16:
            raise StudioError("K is between 1 and 16")
        pol = self.policy(policy_name)
        run_id = new_run_id("studio-rollout")
        writer = RunWriter(self.runs_dir / run_id, RunInfo(id=run_id, created=now_iso(), command="rollout",
                                                            policy=pol.name if pol else RAW, k=int(k), seed=int(seed),
                                                            requests=[request.id], config={"studio": True}))
        writer.add_request(request, self.world.gt_image(request) if request.scene else None)
        ev = self._evaluate([request], pol, [int(seed)], writer, samples=int(k), on_turn=progress)
        writer.finish(ev.per_seed[int(seed)])
        return writer.dir

    def list_runs(self, command: str | None = None) -> list[str]:
        """Run folders under the runs folder (newest first), as paths relative to it."""
        out = []
        for p in self.runs_dir.glob("**/run.json"):
            if command is not None:
                try:
                    if RunInfo.model_validate_json(p.read_text("utf-8")).command != command:
                        continue
                except (OSError, ValueError):
                    continue
            out.append(p.parent)
        return [str(p.relative_to(self.runs_dir)) for p in sorted(out, key=lambda p: p.stat().st_mtime, reverse=True)]

    def list_runs_training(self) -> list[str]:
        """Distill runs: folders with metrics or a studio job, and ablation folders around them, newest first."""
        found = {p.parent for pat in ("**/metrics.jsonl", "**/studio_job.json", "**/.lock") for p in self.runs_dir.glob(pat)}
        found |= {p.parent for p in found if p.parent != self.runs_dir and not (p.parent / "metrics.jsonl").exists()}
        return [str(p.relative_to(self.runs_dir)) for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def running_run(self) -> str | None:
        """The run a viewer opening the Distill view should see: the studio's own job while it runs, else the
        newest folder a trainer (a terminal run) holds the lock of; None when nothing trains."""
        from genevolve.records.live import is_running

        job = self.jobs.status()
        if job["state"] in ("running", "stopping") and job.get("out"):
            out = Path(job["out"])
            return str(out.relative_to(self.runs_dir)) if out.is_relative_to(self.runs_dir) else None
        for name in self.list_runs_training():
            path = self.runs_dir / name
            if is_running(path) or any(is_running(p.parent) for p in path.glob("*/.lock")):
                return name
        return None

    def list_bench(self) -> list[str]:
        """Bench results: bench run folders and `genevolve bench` JSON files in the runs folder."""
        out = self.list_runs("bench")
        for p in sorted(self.runs_dir.glob("*.json")):
            try:
                if "by" in json.loads(p.read_text("utf-8")):
                    out.append(p.name)
            except (OSError, ValueError):
                continue
        return out

    def run_path(self, name: str) -> Path:
        """A run folder inside the runs folder; anything that escapes it is refused."""
        if not name:
            raise StudioError("pick a run")
        p = (self.runs_dir / name).resolve()
        if p != self.runs_dir and self.runs_dir not in p.parents:
            raise StudioError(f"{name!r} is not inside {self.runs_dir}")
        return p

    # -- experience banks --------------------------------------------------------
    def bank_choices(self) -> list[str]:
        found = {str(p.parent.relative_to(self.runs_dir)) for p in self.runs_dir.glob("**/experiences.jsonl")}
        return [STUDIO_BANK] + sorted(found - {STUDIO_BANK})

    def bank(self, name: str):
        from genevolve.experience.bank import ExperienceBank

        path = self.run_path(name or STUDIO_BANK)
        with self._lock:
            key = str(path)
            bank, seen = self._banks.get(key, (None, None))
            if bank is None or not path.exists() or _file_sig(bank.jsonl) != seen:  # changed on disk (a trainer?): re-read
                bank = ExperienceBank(path, embedder=self.embedder)
            self._banks[key] = (bank, _file_sig(bank.jsonl))
            return bank

    def retrieval_of(self, bank, exp_id: str, splits: tuple[str, ...] = ("evolve", "bench"), limit: int = 20
                     ) -> list[tuple[float, Request, str]]:
        """The sandbox requests nearest to this experience, by similarity, each with what it gets: this experience
        (it is their nearest and passes the gate), another one that is nearer, or nothing (below the gate)."""
        exp = bank.get(exp_id)
        reqs = [r for s in splits for r in self.world.split(s)]
        rows = []
        for r, ranked in zip(reqs, bank.ranked([r.text for r in reqs])):
            sim = next((s for s, e in ranked if e.id == exp.id), None)
            if sim is None:
                continue
            top_s, top = ranked[0]
            if top.id != exp.id:
                why = f"another experience is nearer: {top.id} ({top_s:.3f})"
            elif sim < bank.gate:
                why = f"nothing: below the gate {bank.gate:.2f}"
            else:
                why = "this experience" + (" (mined from it)" if r.id in exp.sources() else "")
            rows.append((sim, r, why))
        rows.sort(key=lambda x: -x[0])
        return rows[:limit]

    def retrieving_requests(self, bank, exp_id: str, splits: tuple[str, ...] = ("evolve", "bench"), limit: int = 20
                            ) -> list[tuple[float, Request]]:
        """Sandbox requests that retrieve this experience (it is their nearest and passes the gate), by similarity."""
        return [(s, r) for s, r, why in self.retrieval_of(bank, exp_id, splits, limit=10_000)
                if why.startswith("this experience")][:limit]

    def try_guide(self, bank, exp_id: str, policy_name: str, seed: int) -> tuple[Request, list[Trajectory], dict[str, Verdict], ImageStore]:
        """The student and the teacher (the student with this experience as its guide) on the experience's source request."""
        from genevolve.evaluation.bench import SandboxScorer
        from genevolve.experience.bank import guide_text

        exp = bank.get(exp_id)
        if policy_name == RAW:
            raise StudioError("the raw generator has no system prompt to put a guide in: pick expert or a learned policy")
        try:
            req = self.world.request(exp.source_request_id)
        except KeyError:
            req = self.world.request(exp.source_request)
        if req.scene is None:
            raise StudioError(self.request_note(req))
        pol = self.policy(policy_name)
        student = self._trajectories([req], pol, 1, int(seed))[0]
        teacher = self._trajectories([req], pol, 1, int(seed), guides={req.id: guide_text(exp)})[0]
        student.id, teacher.id = "student", "teacher"
        store = ImageStore(self.runs_dir / ".studio" / "images")
        scorer = SandboxScorer(self.world)
        verdicts = {t.id: scorer.score(req, t, store, seed=t.seed)[1] for t in (student, teacher)}
        if req.gt_image and req.gt_image not in store:
            store.put(self.world.gt_image(req))
        return req, [student, teacher], verdicts, store

    # -- references --------------------------------------------------------------
    def references_changed(self) -> None:
        """After an edit: the agent's image_search and the scorer's reference rows re-read the store."""
        self.world.image_search.reload()
        self.world.__dict__.pop("refs", None)  # World.refs is a cached_property

    # -- bench -------------------------------------------------------------------
    def run_bench(self, policy_name: str, split: str, limit: int | None, seeds: list[int],
                  progress: Callable[[str], None] | None = None) -> Path:
        """A policy over a sandbox split (one trajectory per request and seed), written as a run folder."""
        from genevolve.records.runs import RunWriter, new_run_id, now_iso

        if not seeds:
            raise StudioError("give at least one seed")
        try:
            reqs = self.world.split(split)
        except KeyError as exc:
            raise StudioError(exc.args[0]) from None
        reqs = spread(reqs, limit)
        pol = self.policy(policy_name)
        name = pol.name if pol else RAW
        run_id = new_run_id("bench-" + re.sub(r"[^A-Za-z0-9]+", "-", policy_name).strip("-"))
        writer = RunWriter(self.runs_dir / run_id, RunInfo(id=run_id, created=now_iso(), command="bench", policy=name, k=1,
                                                            seed=seeds[0], requests=[r.id for r in reqs],
                                                            config={"split": split, "seeds": seeds, "studio": True}))
        for r in reqs:
            writer.add_request(r, self.world.gt_image(r) if r.scene else None)
        ev = self._evaluate(reqs, pol, seeds, writer, progress=progress)
        writer.finish({"policy": name, "split": split, "seeds": seeds, "n_requests": len(reqs), "by": ev.by})
        return writer.dir

    def run_bench_official(self, data: str, policy_name: str, generator: str, judge_url: str, judge_model: str,
                           api_key: str | None, limit: int | None, seeds: list[int], allow_missing: bool = False,
                           progress: Callable[[str], None] | None = None) -> Path:
        """A policy over the bench rows of a local GenEvolve-Bench folder, rendered by ``generator`` and scored by
        the VLM judge at ``judge_url`` (as `genevolve bench --data`), written as a run folder. Cases whose render,
        judgement or ground truth is missing are left out of the means and counted in the summary."""
        import tempfile

        from genevolve.agent.loop import Tools
        from genevolve.generators import open_generator
        from genevolve.judges.vlm import ProgramJudge, VLMJudge
        from genevolve.evaluation.official import DataError, load_requests, run_bench
        from genevolve.policies.base import SamplingParams
        from genevolve.records.runs import RunWriter, new_run_id, now_iso
        from genevolve.evaluation.scoring import ModelScorer

        if not seeds:
            raise StudioError("give at least one seed")
        root = Path((data or "").strip()).expanduser()
        if not root.is_dir():
            raise StudioError(f"the data folder {root} does not exist: give a local copy of GenEvolve-Data-Bench "
                              "(the folder that holds bench/), or clear the field to use a sandbox split")
        judge_url, judge_model = (judge_url or "").strip(), (judge_model or "").strip()
        if not judge_url or not judge_model:
            raise StudioError("a bench folder is scored by a VLM judge: give its OpenAI-compatible URL (…/v1) and model name")
        try:
            judge = VLMJudge(judge_url, judge_model, api_key=api_key or None, cache_dir=self.runs_dir / "judge-cache")
            program_judge = ProgramJudge(judge_url, judge_model, api_key=api_key or None, limiter=judge.limiter,
                                         cache_dir=self.runs_dir / "judge-cache")
        except ValueError as exc:  # no API key for a remote judge
            raise StudioError(str(exc)) from None
        _check_reachable(judge_url)
        try:
            gen = open_generator((generator or "sandbox").strip(), world=self.world)
        except (ValueError, FileNotFoundError, OSError) as exc:
            raise StudioError(f"cannot open the generator {generator!r}: {exc}") from None
        pol = self.policy(policy_name)
        name = pol.name if pol else RAW
        with tempfile.TemporaryDirectory() as tmp:
            gt = ImageStore(tmp)
            try:
                loaded = load_requests(root, gt, allow_missing=allow_missing, limit=int(limit) if limit else None)
            except DataError as exc:
                hint = "" if allow_missing else " (tick 'keep cases whose picture is missing' to bench the rest)"
                raise StudioError(f"{exc}{hint}") from None
            run_id = new_run_id("bench-" + re.sub(r"[^A-Za-z0-9]+", "-", f"{root.name}-{policy_name}").strip("-"))
            writer = RunWriter(self.runs_dir / run_id, RunInfo(
                id=run_id, created=now_iso(), command="bench", policy=name, k=1, seed=seeds[0],
                requests=[r.id for r in loaded.requests],
                config={"data": str(root), "generator": gen.name, "judge": judge.name, "seeds": seeds, "studio": True}))
            for r in loaded.requests:  # the ground truths go into the run folder, for paging two runs
                writer.add_request(r)
                if r.gt_image:
                    writer.images.put_bytes(gt.path(r.gt_image).read_bytes())
        scorer = ModelScorer(gen, judge, program_judge, gt_store=writer.images)
        params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=384)
        with self._lock if pol is not None and pol.needs_exclusive_device else contextlib.nullcontext():
            res = run_bench(loaded.requests, pol, Tools.for_world(self.world), scorer, writer.images, seeds, params,
                            progress=progress)
        for case in res["cases"]:
            writer.add(case["trajectory"], case["rendered"], case["verdict"])
        writer.finish({"policy": name, "data": str(root), "generator": gen.name, "judge": judge.name,
                       "text_policy": judge.text_policy, "missing_pictures": loaded.missing, **res["summary"]})
        return writer.dir


def _file_sig(path: Path) -> tuple | None:
    try:
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None


def _check_reachable(url: str, timeout: float = 5.0) -> None:
    """Fail at once, with a message, when nothing answers at ``url`` (rather than after every case's retries)."""
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/models", timeout=timeout)  # any HTTP answer will do: the server is up
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise StudioError(f"the judge at {url} does not answer ({type(exc).__name__}: {exc}): start it or fix the URL") from None
