"""Every persisted thing, as a typed and versioned record.

All records carry ``schema_version``; readers reject versions they do not know,
loudly, instead of guessing. Records are stored as JSON Lines; images are never
inlined: they live once in a content-addressed folder (:class:`ImageStore`) and
records name them by hash.

Writes are atomic: a JSONL file is either its old content or its new content,
never half of each (temporary file + ``os.replace``). Appends write one whole
line per ``write`` call and ``fsync``; a reader that meets a torn last line
(a crash mid-append) reports it instead of silently dropping data.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1

SKILLS = (
    "spatial_layout",
    "aesthetic_drawing",
    "text_rendering",
    "creative_drawing",
    "anatomy_body_coherence",
    "attribute_binding",
    "physical_material_consistency",
    "quantity_counting",
)

Track = Literal["knowledge", "quality"]
Termination = Literal["answer", "max_rounds_reached", "no_answer", "error"]


class SchemaError(ValueError):
    """A record on disk does not match the schema this code understands."""


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(
                f"{cls.__name__} has schema_version {v}; this code reads version {SCHEMA_VERSION} only"
            )
        return v


class Request(Record):
    """An image request. ``scene`` is the ground-truth scene (sandbox only).

    Track, category and difficulty are ``None`` for a request nobody classified (free text the
    sandbox cannot read): nothing is invented for it.
    """

    id: str
    text: str
    track: Track | None = "quality"
    category: str | None = "free"
    skills: list[str] = Field(default_factory=list)
    difficulty: int | None = 1
    split: str = "adhoc"
    gt_image: str | None = None  # image hash in the ImageStore
    scene: dict[str, Any] | None = None
    entities: list[str] = Field(default_factory=list)
    parse_error: str | None = None  # why the sandbox world could not read this request


class ToolCall(Record):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ImageRef(Record):
    """An image shown to the agent by ``image_search``, with its per-trajectory id."""

    img_id: str
    title: str = ""
    url: str = ""
    local_path: str = ""
    page_url: str = ""
    source_id: str = ""  # id in the store that produced it (sandbox reference id)


class Observation(Record):
    """What a tool returned, exactly as the policy sees it (without the wrapper tags)."""

    tool: str
    text: str
    images: list[ImageRef] = Field(default_factory=list)
    error: str | None = None


class ProgramRef(Record):
    img_id: str
    note: str = ""


class Program(Record):
    """The prompt-reference program z = (g, R)."""

    gen_prompt: str
    reference_images: list[ProgramRef] = Field(default_factory=list)
    issues: list[str] = Field(default_factory=list)  # what normalisation changed or dropped


class Turn(Record):
    """One assistant turn and the user turn that answered it (if any)."""

    index: int
    raw: str
    think: str | None = None
    tool_call: ToolCall | None = None
    answer: Program | None = None
    observation: Observation | None = None
    feedback: str | None = None  # a non-tool user message after this turn (format error note)
    error: str | None = None  # what went wrong in this turn, if anything
    forced_final: bool = False  # the FINAL STEP message preceded this turn
    prompt_messages: int = 0  # how many messages the policy saw before writing this turn
    finish_reason: str | None = None  # "stop" or "length" for learned policies


class KeptMessage(Record):
    """A message of an imported record that no field holds (an unknown role or note), put back at ``at`` on export."""

    at: int
    message: dict[str, Any]


class Trajectory(Record):
    id: str
    request_id: str
    request_text: str
    policy: str = ""
    seed: int = 0
    system_prompt: str = ""
    guide: str | None = None  # decision guide in the system prompt (teacher context), if any
    turns: list[Turn] = Field(default_factory=list)
    images: list[ImageRef] = Field(default_factory=list)  # every IMG id handed out, in order
    program: Program | None = None
    termination: Termination = "answer"
    errors: list[str] = Field(default_factory=list)
    # Imported records only: the FINAL STEP text when it is not ours, and the messages kept verbatim.
    final_step_message: str | None = None
    kept_messages: list[KeptMessage] = Field(default_factory=list)
    # The exact token stream a local policy saw and wrote (empty for scripted or remote policies):
    # assistant_mask is 1 on tokens the policy sampled, 0 on everything else (prompts, observations);
    # token_logprobs holds the sampling policy's log-probability of each sampled token (0 elsewhere).
    token_ids: list[int] = Field(default_factory=list)
    assistant_mask: list[int] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)

    @property
    def n_tool_calls(self) -> int:
        """Tool calls that were executed (a call ignored after FINAL STEP does not count)."""
        return sum(1 for t in self.turns if t.tool_call is not None and t.observation is not None)

    def image(self, img_id: str) -> ImageRef | None:
        return next((i for i in self.images if i.img_id == img_id), None)


class RenderedImage(Record):
    hash: str
    width: int
    height: int
    generator: str
    prompt: str
    reference_hashes: list[str] = Field(default_factory=list)
    seed: int = 0


class Verdict(Record):
    """Judge output for one trajectory. ``kscore`` is the weighted KScore; ``reward`` mixes in R_text.

    A case that could not be judged (no ground truth, a generator or judge failure) holds ``None``
    scores: it is missing, not 0. A trajectory with no answer scores 0: that is the policy's result.
    """

    trajectory_id: str
    request_id: str
    image: str | None = None
    F: float | None = 0.0
    V: float | None = 0.0
    T: float | None = None  # None when the request asks for no text
    A: float | None = 0.0
    kscore: float | None = 0.0
    r_text: float | None = 0.0
    reward: float | None = 0.0
    alpha: float = 0.5
    text_policy: str = "renormalise"
    rationale: str = ""
    failed: str | None = None  # set when nothing could be judged (no program, generator error)


class RetrievalKey(Record):
    """What an experience is retrieved by (the paper's ``retrieval_key``): ``trigger``, the situation in which
    its lesson applies, in action-space words with no entity names; ``source_prompt_summary``, its source
    request with every name, year and quoted text taken out."""

    trigger: str
    source_prompt_summary: str = ""


class MergedSource(Record):
    """An experience that a consolidation folded into another, as it was then (its provenance)."""

    id: str
    version: int
    source_request_id: str
    source_request: str
    slots: dict[str, str]
    evidence: int = 1
    reward_gap: float = 0.0
    run_id: str = ""
    step: int = 0


class ExperienceVersion(Record):
    """A past state of an experience (kept on every edit and every consolidation)."""

    version: int
    slots: dict[str, str]
    saved: str  # ISO time the version was replaced
    note: str = ""  # the note saved with this version when it was made
    retrieval_key: RetrievalKey | None = None
    evidence: int = 1


class Experience(Record):
    """A visual experience: the best-vs-worst difference of a group, as five imperative, entity-free slots.

    ``evidence`` counts the mined pairs behind it: 1 for a pair's own experience, the sum of the merged ones'
    after a consolidation, whose folded experiences ``merged_from`` keeps (ids, versions, source requests,
    slots). :meth:`sources` is every request it was mined from: leave-own-out retrieval skips them all."""

    id: str
    source_request_id: str
    source_request: str  # the request text (the raw-text key embeds it)
    slots: dict[str, str]  # search_strategy, skill_activation, reference_selection, prompt_construction, failure_avoidance
    retrieval_key: RetrievalKey | None = None  # None: an experience from before retrieval keys (its situation is read
    # from source_request when a situation key is asked for)
    evidence: int = 1
    merged_from: list[MergedSource] = Field(default_factory=list)
    reward_gap: float = 0.0
    run_id: str = ""
    step: int = 0  # the training step that mined it, counted from 1 as in metrics.jsonl (0: not from training)
    best_trajectory: str = ""
    worst_trajectory: str = ""
    summariser: str = ""
    created: str = ""
    version: int = 1
    note: str = ""  # the note saved with the current version (its edit's reason)
    history: list[ExperienceVersion] = Field(default_factory=list)

    def sources(self) -> set[str]:
        """Every request this experience was mined from (its own and those of the experiences merged into it)."""
        return {self.source_request_id} | {m.source_request_id for m in self.merged_from}


class RunInfo(Record):
    id: str
    created: str
    command: str
    policy: str
    k: int
    seed: int
    requests: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)


R = TypeVar("R", bound=Record)


# ---------------------------------------------------------------------------
# JSON Lines
# ---------------------------------------------------------------------------


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()  # read once, at import: os.umask can only be read by setting it


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data``: a crash leaves the old file or the new one, never a mix.

    The file gets the permissions a plain ``open(path, "w")`` would give it: those of the file it
    replaces, else 0o666 less the umask (a temporary file is created 0o600, unreadable to others)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(new: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Swap a finished folder ``new`` into place at ``dest``; the old one is removed only after the swap."""
    import shutil

    new, dest = Path(new), Path(dest)
    if dest.exists():
        old = dest.with_name(dest.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        dest.rename(old)
        new.rename(dest)
        shutil.rmtree(old)
    else:
        new.rename(dest)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def finite(x: float | None) -> float | None:
    """``x`` when it is a finite number, else None: JSON has no NaN or infinity (undefined is null)."""
    return x if x is not None and math.isfinite(x) else None


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Standard JSON only: a NaN or infinity raises (undefined values are written as null by the caller)."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[BaseModel]) -> None:
    """Replace ``path`` with these records, atomically."""
    lines = [r.model_dump_json() + "\n" for r in records]
    atomic_write_text(path, "".join(lines))


def append_jsonl(path: str | os.PathLike, record: BaseModel) -> None:
    """Append one record as a single write of one whole line, then fsync."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    append_bytes(path, (record.model_dump_json() + "\n").encode("utf-8"))


def _cut_torn_tail(fd: int, path: str | os.PathLike) -> None:
    """A file that does not end in a newline ends in a line a crash cut short: move that fragment to
    ``<file>.torn`` and cut the file back to its last whole line, so the next row is not glued to it."""
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return
    start = size
    while start > 0:
        chunk = os.pread(fd, min(65536, start), max(0, start - 65536))
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            start = max(0, start - 65536) + nl + 1
            break
        start = max(0, start - 65536)
    fragment = os.pread(fd, size - start, start)
    with open(f"{os.fspath(path)}.torn", "ab") as fh:
        fh.write(fragment + b"\n")
    os.ftruncate(fd, start)


def append_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Append ``data`` in one write (whole lines stay whole for concurrent readers), then fsync; a torn last
    line left by a crash is first set aside (see :func:`_cut_torn_tail`)."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _cut_torn_tail(fd, path)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def iter_jsonl(path: str | os.PathLike, model: type[R]) -> Iterator[R]:
    """Yield records; a malformed line or an unknown schema raises :class:`SchemaError` naming the line."""
    path = Path(path)
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield model.model_validate_json(line)
            except ValueError as exc:
                raise SchemaError(f"{path}:{lineno}: not a valid {model.__name__} record: {exc}") from exc


def read_jsonl(path: str | os.PathLike, model: type[R]) -> list[R]:
    return list(iter_jsonl(path, model))


# ---------------------------------------------------------------------------
# Content-addressed images
# ---------------------------------------------------------------------------


class ImageStore:
    """Images stored once, by the SHA-256 of their PNG bytes, as ``<root>/<h[:2]>/<h>.png``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @staticmethod
    def encode(image: Any) -> bytes:
        """PNG bytes of a PIL image or a numpy HxWx3 uint8 array."""
        if not hasattr(image, "save"):
            from PIL import Image

            image = Image.fromarray(image)
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=False)
        return buf.getvalue()

    @classmethod
    def digest(cls, image: Any) -> str:
        """The hash ``put`` would store ``image`` under, without storing it."""
        return hashlib.sha256(cls.encode(image)).hexdigest()

    def put_bytes(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        if not path.exists():
            atomic_write_bytes(path, data)
        return digest

    def put(self, image: Any) -> str:
        """Store a PIL image (or a numpy HxWx3 uint8 array); return its hash."""
        return self.put_bytes(self.encode(image))

    def path(self, digest: str) -> Path:
        if len(digest) < 8 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"not an image hash: {digest!r}")
        return self.root / digest[:2] / f"{digest}.png"

    def __contains__(self, digest: str) -> bool:
        try:
            return self.path(digest).exists()
        except ValueError:
            return False

    def get(self, digest: str):
        from PIL import Image

        path = self.path(digest)
        if not path.exists():
            raise KeyError(f"image {digest} is not in {self.root}")
        with Image.open(path) as im:
            return im.convert("RGB")
