"""Requests join a running batch at the next decoding step (continuous batching in ``genevolve serve``).

Driven through :class:`ChatEngine` with a tiny random Llama (about a millisecond a token). A job's
listener runs on the worker thread between two tokens, so a hook there submits or cancels another job
at an exact step of a running generation. The random model never writes its end-of-turn token greedily,
so a greedy choice runs to its budget.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest

from genevolve.policies.base import SamplingParams
from genevolve.policies.continuous import ContinuousBatch
from genevolve.policies.local import LocalPolicy
from genevolve.serving.chat_engine import ChatEngine, Job


@pytest.fixture(scope="module")
def local(tiny_folder) -> LocalPolicy:
    return LocalPolicy.load(tiny_folder, device="cpu", dtype="float32", name="tiny-random")


def make_job(content: str, budget: int, temperature: float = 1.0, seed: int = 1, at_token=None) -> Job:
    """A streamed job; ``at_token(count)`` runs on the worker thread after each of its tokens."""
    job = Job([{"role": "user", "content": content}],
              SamplingParams(temperature=temperature, top_p=0.95, max_new_tokens=budget, seed=seed), stream=True)
    if at_token is not None:
        job.listener = lambda ev: at_token(len(job.choices[0].ids)) if ev[0] == "delta" else None
    return job


def when(count: int, action):
    """An ``at_token`` hook that runs ``action`` once, at the job's ``count``-th token."""
    return lambda n: action() if n == count else None


def first_token_seen_at(job: Job, other: Job, engine: ChatEngine | None = None) -> dict:
    """Records how many tokens ``other`` had, and whether it was done, when ``job`` wrote its first token
    (and, given ``engine``, the jobs in flight once ``job`` was done)."""
    seen: dict = {}

    def listen(ev):
        seen.setdefault("other", (len(other.choices[0].ids), other.done.is_set()))
        if ev[0] == "done" and engine is not None:
            seen["in_flight_after"] = engine.in_flight
    job.listener = listen
    return seen


def run(engine: ChatEngine, *jobs: Job, timeout: float = 20) -> None:
    """Submit the first job (hooks submit the others) and wait for them all."""
    engine.submit(jobs[0])
    deadline = time.monotonic() + timeout
    for j in jobs:
        assert j.done.wait(max(0.0, deadline - time.monotonic())), "a job did not finish"


def solo(local, content: str, budget: int, temperature: float = 1.0, seed: int = 1) -> list[int]:
    job = make_job(content, budget, temperature, seed)
    run(ChatEngine(local), job)
    return job.choices[0].ids


def test_a_compatible_job_joins_at_the_next_step_and_answers_as_alone(local):
    alone = solo(local, "draw a red fox", 8, seed=5)
    engine = ChatEngine(local, max_batch=4)
    short = make_job("draw a red fox", 8, seed=5)
    long = make_job("go on", 300, temperature=1.0, seed=2, at_token=when(5, lambda: engine.submit(short)))
    seen = first_token_seen_at(short, long)
    run(engine, long, short)
    assert seen["other"] == (5, False)  # prefilled and sampled right after the step that submitted it
    assert len(long.choices[0].ids) > 5 + len(short.choices[0].ids)  # so it ended long after the short one
    assert short.choices[0].ids == alone and short.choices[0].finish_reason == "length"
    assert long.choices[0].ids == solo(local, "go on", 300, seed=2)  # nor did the joiner change the long one
    assert engine.batches == [2] and engine.in_flight == 0


def test_a_job_with_other_sampling_waits_for_the_batch_to_end(local):
    engine = ChatEngine(local, max_batch=4)
    other = make_job("draw a red fox", 4, temperature=0.5)
    long = make_job("go on", 60, temperature=0.0, at_token=when(5, lambda: engine.submit(other)))
    seen = first_token_seen_at(other, long)
    run(engine, long, other)
    assert seen["other"] == (60, True)
    assert engine.batches == [1, 1]


def test_each_joined_job_keeps_its_own_token_budget(local):
    engine = ChatEngine(local, max_batch=4)
    larger = make_job("draw two cats", 90, temperature=0.0)
    smaller = make_job("draw a flag", 3, temperature=0.0)
    long = make_job("go on", 40, temperature=0.0,
                    at_token=when(5, lambda: (engine.submit(larger), engine.submit(smaller))))
    run(engine, long, larger, smaller)
    for job, budget in ((long, 40), (larger, 90), (smaller, 3)):
        assert len(job.choices[0].ids) == budget and job.choices[0].finish_reason == "length"
    assert larger.choices[0].ids == solo(local, "draw two cats", 90, temperature=0.0)
    assert engine.batches == [3]


def test_cancelling_a_joined_job_frees_its_row_for_a_waiting_one(local):
    engine = ChatEngine(local, max_batch=2)  # the long job and one more
    waiting = make_job("draw a crest", 4, temperature=0.0)
    joined = make_job("draw a flag", 200, temperature=0.0, at_token=when(3, lambda: joined.cancel()))
    long = make_job("go on", 120, temperature=0.0,
                    at_token=when(5, lambda: (engine.submit(joined), engine.submit(waiting))))
    seen = first_token_seen_at(waiting, long, engine)
    run(engine, long, joined, waiting)
    assert joined.choices[0].finish_reason == "cancelled" and len(joined.choices[0].ids) == 3
    count, long_done = seen["other"]
    assert count == 5 + 3 and not long_done  # took the row at the step after the cancellation ended the other
    assert len(waiting.choices[0].ids) == 4 and seen["in_flight_after"] == 1  # the long job alone is left
    assert engine.batches == [3] and engine.in_flight == 0


def test_a_batch_that_admits_no_one_computes_what_it_did_without_admit(local):
    convs = [[{"role": "user", "content": c}] for c in ("draw a fox", "go on", "two cats")]
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=20, seed=3)
    asked: list[int] = []

    def streams(**extra):
        done = [False] * len(convs)
        out = ContinuousBatch(local, len(convs), lambda i: None if done[i] else convs[i],
                              lambda i, c: done.__setitem__(i, True), params, **extra).run()
        return [(s.ids, s.logprobs) for s in out]

    assert streams(admit=lambda free: asked.append(free) or []) == streams()
    assert asked and all(f > 0 for f in asked)


def test_an_adapter_load_gets_the_model_while_compatible_jobs_keep_coming(local):
    engine = ChatEngine(local, max_batch=4)
    order: list[str] = []
    late = make_job("draw a flag", 4, temperature=0.0)

    def load_adapter():  # waits for the model as /v1/load_lora_adapter does; the batch must drain first
        def hold():
            with engine.exclusive():
                order.append("exclusive")
        thread = threading.Thread(target=hold)
        thread.start()
        while not engine._exclusive:
            time.sleep(0.001)
        engine.submit(late)  # compatible, but arrives while the loader waits: it does not join

    long = make_job("go on", 50, temperature=0.0, at_token=when(5, load_adapter))
    late.listener = lambda ev: order.append("late") if ev[0] == "done" else None
    run(engine, long, late)
    assert order == ["exclusive", "late"] and engine.batches == [1, 1]


def _benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_join.py"
    spec = importlib.util.spec_from_file_location("serve_join", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_benchmark_runs_end_to_end_over_http(tiny_folder):
    res = _benchmark().run(policy=str(tiny_folder), long_tokens=200)
    assert res["long"]["completion_tokens"] == 200 and res["batches"] == [1, 3]  # the warm-up, then one batch
    assert all(s["completion_tokens"] == 4 and s["long_tokens_streamed_at_answer"] < 200 for s in res["short"])


@pytest.mark.slow
def test_short_requests_answer_within_2_s_beside_a_700_token_generation_of_the_tiny_policy():
    res = _benchmark().run(policy="tiny", long_tokens=700)
    assert res["long"]["completion_tokens"] == 700
    assert res["all_within_target"], res["short"]
