"""The server's generation queue: admitted requests, one worker thread, and each choice's text as it grows.

Every chat request becomes a :class:`Job` with ``n`` :class:`Choice` objects. :class:`ChatEngine` admits at
most ``max_queue`` jobs at once (running or waiting; beyond that the app answers 429) and one worker
thread runs them. With a local model (a policy that has ``extend_stream``, i.e.
:class:`~genevolve.policies.local.LocalPolicy`) the waiting jobs that share an adapter, a temperature
and a top-p run together in one :class:`~genevolve.policies.continuous.ContinuousBatch`, up to
``max_batch`` choices. A job that arrives while a batch runs joins it at the next decoding step when it
shares the batch's adapter, temperature and top-p and its choices fit in the rows left: a short request
is not held behind a long generation. A job that cannot join waits for the batch to end, and no job
behind it joins either, so the batch drains and it runs next; joins also stop while an adapter load or
unload waits for the model (:meth:`ChatEngine.exclusive`). Each sampled token is seen as it is written
(``on_token``): that is where stop strings, ``stop_token_ids``, each request's own token budget and
cancellation end a choice, and where streamed text is handed out. A job leaves the queue's count as soon
as its last choice ends, not when its batch does. Any other policy is called through ``generate``, one
job at a time, and stops are applied to its finished text.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from ..policies.base import Completion, SamplingParams
from .chat_request import RequestRefused

Listener = Callable[[tuple], None]
CONTEXT_IDS = 4  # ids of decoded text kept as context for decoding the next ones
NO_BATCH_BUDGET = sys.maxsize  # a batch's turn budget: each choice ends at its own job's (Choice.add)


@dataclass
class Job:
    """One chat request: its messages, sampling, stops, and (filled in by the worker) its choices."""

    messages: list[dict[str, Any]]
    params: SamplingParams  # max_new_tokens: this request's own budget
    n: int = 1
    adapter: str | None = None
    stops: list[str] = field(default_factory=list)
    stop_token_ids: set[int] = field(default_factory=set)
    top_logprobs: int = 0
    listener: Listener | None = None  # called from the worker thread: ("delta", i, text, logprobs), ("done",)
    stream: bool = False
    prompt_tokens: int = 0
    error: str | None = None
    choices: list["Choice"] = field(default_factory=list)

    def __post_init__(self):
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.choices = [Choice(self, i) for i in range(self.n)]

    def seeds(self) -> list[int | None]:
        s = self.params.seed
        return [None if s is None else s + i for i in range(self.n)]  # n choices of one seed must differ

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: tuple) -> None:
        if self.listener is not None:
            try:
                self.listener(event)
            except RuntimeError:  # the client's event loop is gone: nobody is listening any more
                self.cancel()

    def finish(self, error: str | None = None) -> None:
        if self.done.is_set():
            return
        self.error = self.error or error
        for c in self.choices:
            if c.finish_reason is None:
                c.finish_reason = "error" if error else "cancelled"
        self.done.set()
        self.emit(("done",))


@dataclass
class Choice:
    """One sampled reply: its token ids, log-probabilities, text, and how it ended."""

    job: Job
    index: int
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    _pending: list[int] = field(default_factory=list)  # ids whose text is not yet whole characters
    _done_ids: list[int] = field(default_factory=list)  # the last ids already in the text (decoding context)
    _sent_chars: int = 0
    _sent_tokens: int = 0
    ended_on_id: bool = False  # the last id is a stop token (not part of the content)

    def add(self, token: int, logprob: float, top: list[tuple[int, float]], decode: Callable[[list[int]], str],
            end_ids: set[int]) -> bool:
        """Take one sampled token; True when the choice has ended (stop id, stop string, budget, cancel)."""
        job = self.job
        if job.cancelled.is_set():
            self.finish_reason = self.finish_reason or "cancelled"
            return True
        self.ids.append(token)
        self.logprobs.append(logprob)
        self.top.append(top)
        if token in end_ids or token in job.stop_token_ids:
            self.finish_reason, self.ended_on_id = "stop", True
            return self._end(decode)
        self._pending.append(token)
        piece = self._decode_pending(decode)
        # A token that ends inside a UTF-8 character waits for the next one (at most 4: a character's bytes).
        if not piece.endswith("\ufffd") or len(self._pending) >= 4:
            before = len(self.text)
            self.text += piece
            self._done_ids = (self._done_ids + self._pending)[-CONTEXT_IDS:]
            self._pending = []
            if self._cut_at_stop(before):
                return self._flush(final=True)
        if len(self.ids) >= job.params.max_new_tokens:
            self.finish_reason = "length"
            return self._end(decode)
        self._flush(final=False)
        return False

    def _decode_pending(self, decode: Callable[[list[int]], str]) -> str:
        """The text the pending ids add, decoded after the last few ids (tokenizers such as SentencePiece
        write a token differently at the start of a text)."""
        if not self._done_ids:
            return decode(self._pending)
        return decode(self._done_ids + self._pending)[len(decode(self._done_ids)):]

    def _end(self, decode: Callable[[list[int]], str]) -> bool:
        if self._pending:  # a reply cut inside a character keeps what its bytes decode to
            self.text += self._decode_pending(decode)
            self._pending = []
        return self._flush(final=True)

    def _cut_at_stop(self, before: int) -> bool:
        longest = max((len(s) for s in self.job.stops), default=0)
        start = max(0, before - longest + 1)
        hits = [p for s in self.job.stops if (p := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.finish_reason = "stop"
        return True

    def _flush(self, final: bool) -> bool:
        """Stream the text no stop string can still take back (all of it at the end)."""
        if self.job.stream:
            hold = 0 if final else max((len(s) for s in self.job.stops), default=1) - 1
            upto = max(self._sent_chars, len(self.text) - hold)
            n_ids = len(self.content_ids())
            tokens = list(range(self._sent_tokens, n_ids))
            if upto > self._sent_chars or tokens:
                self.job.emit(("delta", self.index, self.text[self._sent_chars: upto], tokens))
                self._sent_chars, self._sent_tokens = upto, n_ids
        return final

    def content_ids(self) -> list[int]:
        """The sampled ids without a final stop token."""
        return self.ids[:-1] if self.ended_on_id else self.ids


def finish_from_completion(choice: Choice, comp: Completion, decode_token: Callable[[int], str] | None) -> None:
    """Apply a request's stops to a policy's finished completion (the path without per-token control)."""
    ids, lps, text, reason = list(comp.token_ids), list(comp.logprobs or []), comp.text, comp.finish_reason
    job = choice.job
    cut = next((k for k, t in enumerate(ids) if t in job.stop_token_ids), None)
    if cut is not None:
        ids, lps, reason = ids[: cut + 1], lps[: cut + 1], "stop"
        text = "".join(decode_token(t) for t in ids[:cut]) if decode_token else text
        choice.ended_on_id = True
    hits = [p for s in job.stops if (p := text.find(s)) >= 0]
    if hits:
        text, reason = text[: min(hits)], "stop"
    choice.ids, choice.logprobs, choice.text = ids, lps, text
    choice.top = [[] for _ in ids]
    choice.finish_reason = reason or "stop"
    choice._flush(final=True)


class ChatEngine:
    """Admits jobs (at most ``max_queue`` at once) and runs them on one worker thread (see the module docstring)."""

    def __init__(self, policy, max_queue: int = 64, max_batch: int = 16):
        self.policy, self.max_queue, self.max_batch = policy, max_queue, max_batch
        self.lock = threading.Lock()  # the model: a batch, an adapter switch, a load or unload
        self._cond = threading.Condition()
        self._waiting: list[Job] = []
        self._running: list[Job] = []  # jobs of the running batch not yet finished
        self._admitted = 0
        self._closed = False
        self._exclusive = 0  # callers waiting in exclusive(): batches take no newcomers, the worker waits
        self._thread: threading.Thread | None = None
        self.batches: list[int] = []  # jobs per batch run, those that joined it included (for tests and logs)
        self.continuous = hasattr(policy, "extend_stream") and hasattr(policy, "model")

    # -- admission ---------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise RequestRefused(503, "the server is shutting down", "server_error")
            if self._admitted >= self.max_queue:
                raise RequestRefused(429, f"the server is busy: {self._admitted} requests are queued or running "
                                          f"(at most {self.max_queue}); retry later", "rate_limit_error",
                                     headers={"Retry-After": "1"})
            self._admitted += 1
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="genevolve-serve", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._admitted

    def cancel_all(self) -> None:
        """Cancel every admitted job: running ones end at their next token, waiting ones never run."""
        with self._cond:
            for job in self._waiting + self._running:
                job.cancel()
            self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the model between batches (an adapter load or unload). The running batch takes no newcomer
        meanwhile and the worker starts no new one, so the caller gets the model even under steady traffic."""
        with self._cond:
            self._exclusive += 1
        try:
            with self.lock:
                yield
        finally:
            with self._cond:
                self._exclusive -= 1
                self._cond.notify_all()

    def drop_adapter(self, name: str) -> None:
        """Fail the waiting jobs that asked for adapter ``name`` (being unloaded; call under :attr:`lock`)."""
        with self._cond:
            gone = [j for j in self._waiting if j.adapter == name]
            self._waiting = [j for j in self._waiting if j.adapter != name]
            self._admitted -= len(gone)
        for job in gone:
            job.finish(f"the adapter {name!r} was unloaded before this request ran")

    def stop(self, timeout: float = 10.0) -> bool:
        """Refuse new jobs, cancel every admitted one, wait up to ``timeout`` s; True when the worker ended."""
        with self._cond:
            self._closed = True
        self.cancel_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    # -- the worker --------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        """Finish the waiting jobs whose clients left (called under the condition's lock)."""
        dead = [j for j in self._waiting if j.cancelled.is_set()]
        if dead:
            self._waiting = [j for j in self._waiting if not j.cancelled.is_set()]
            self._admitted -= len(dead)
            for j in dead:
                j.finish()

    def _work_ahead(self) -> bool:
        """Block until a job waits (True) or the engine is closed with nothing waiting (False)."""
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._waiting and not self._exclusive:
                    return True
                if self._closed and not self._waiting:
                    return False
                self._cond.wait()

    def _take(self) -> list[Job]:
        """The next batch: the oldest live job and the waiting jobs that can share its run."""
        with self._cond:
            self._drop_cancelled()
            if not self._waiting:
                return []
            if not self.continuous:
                batch, self._waiting = self._waiting[:1], self._waiting[1:]
            else:
                key = _group_key(self._waiting[0])
                batch, rest, rows = [], [], 0
                for j in self._waiting:
                    if _group_key(j) == key and (not batch or rows + j.n <= self.max_batch):
                        batch.append(j)
                        rows += j.n
                    else:
                        rest.append(j)
                self._waiting = rest
            self._running = list(batch)
            self.batches.append(len(batch))
            return batch

    def _join(self, jobs: list[Job], free: int) -> list[Job]:
        """The waiting jobs that join the running batch ``jobs`` now, added to it: in arrival order, each
        sharing the batch's adapter and sampling and fitting in the ``free`` rows left, up to the first job
        that cannot join (it waits for the batch to end, which later arrivals then do not prolong)."""
        with self._cond:
            self._drop_cancelled()
            new: list[Job] = []
            while (self._waiting and not self._exclusive and _group_key(self._waiting[0]) == _group_key(jobs[0])
                   and self._waiting[0].n <= free):
                job = self._waiting.pop(0)
                free -= job.n
                new.append(job)
            jobs += new
            self._running += new
            self.batches[-1] += len(new)
            return new

    def _settle(self, job: Job, error: str | None = None) -> None:
        """A running job has ended: answer its client and free its place in the queue (once)."""
        if job.done.is_set():
            return
        with self._cond:  # first: a client told its job is done sees it gone from the count
            self._running = [j for j in self._running if j is not job]
            self._admitted -= 1
        job.finish(error)

    def _loop(self) -> None:
        while self._work_ahead():
            with self.lock:  # the batch forms once the model is free: what queued meanwhile runs together
                jobs = self._take()
                if not jobs:
                    continue
                error = None
                try:
                    self._select_adapter(jobs[0].adapter)
                    (self._run_continuous if self.continuous else self._run_plain)(jobs)
                except Exception as exc:  # reported to each client; the server keeps serving
                    error = f"{type(exc).__name__}: {exc}"
                finally:
                    for j in jobs:  # joiners included
                        self._settle(j, error)

    def _select_adapter(self, adapter: str | None) -> None:
        if adapter is not None:
            self.policy.set_adapter(adapter)
        elif hasattr(self.policy, "disable_adapter") and getattr(self.policy, "adapters", True):
            self.policy.disable_adapter()

    def _run_plain(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            comps = self.policy.generate([job.messages] * job.n, job.params)
            decode = getattr(self.policy, "decode_token", None)
            for choice, comp in zip(job.choices, comps):
                if comp.finish_reason == "error":
                    job.finish(comp.error or "generation failed")
                    break
                finish_from_completion(choice, comp, decode)
            self._settle(job)

    def _run_continuous(self, jobs: list[Job]) -> None:
        from ..policies.continuous import ContinuousBatch

        rows = [c for j in jobs for c in j.choices]  # conversation i of the batch is choice rows[i]
        seeds = [s for j in jobs for s in j.seeds()]
        handed = [False] * len(rows)
        tok = self.policy.tokenizer
        decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
        end_ids = set(self.policy.stop_ids)

        def settle_if_done(job: Job) -> None:
            if all(c.finish_reason is not None for c in job.choices):
                self._settle(job)

        def next_messages(i: int):
            choice, first = rows[i], not handed[i]
            handed[i] = True
            if first and not choice.job.cancelled.is_set():
                return choice.job.messages
            if first:  # cancelled before it had a row
                choice.finish_reason = "cancelled"
                settle_if_done(choice.job)
            return None

        def on_token(i: int, t: int, lp: float, logits) -> bool:
            choice = rows[i]
            return choice.add(t, lp, _top(logits, choice.job.top_logprobs), decode, end_ids)

        def on_turn(i: int, comp: Completion) -> None:
            choice = rows[i]
            if choice.finish_reason is None:
                choice.finish_reason = comp.finish_reason or "stop"
                choice._flush(final=True)
            settle_if_done(choice.job)

        def admit(free: int) -> list[int | None]:
            new = self._join(jobs, free)
            for job in new:
                rows.extend(job.choices)
                handed.extend([False] * job.n)
            return [s for job in new for s in job.seeds()]

        # Each choice ends at its own job's budget (Choice.add), so a job that joins later may have a
        # larger one than the jobs the batch started with: the batch itself sets none.
        params = replace(jobs[0].params, max_new_tokens=NO_BATCH_BUDGET, seed=None)
        ContinuousBatch(self.policy, len(rows), next_messages, on_turn, params, max_batch=self.max_batch,
                        join_fraction=0.0, seeds=seeds, on_token=on_token, admit=admit).run()


def _group_key(job: Job) -> tuple:
    return job.adapter, job.params.temperature, job.params.top_p


def _top(logits, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    import torch

    vals, idx = torch.log_softmax(logits.float(), dim=-1).topk(k)
    return list(zip(idx.tolist(), vals.tolist()))
