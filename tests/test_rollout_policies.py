"""Every policy answers ``run_conversations``: turn-by-turn policies (the expert, a remote chat server, any
``complete``-style policy) go through it round by round and give exactly the trajectories, failures and
progress reports of asking ``complete`` one conversation at a time.

``data/turn_by_turn_rollouts.json`` holds digests of trajectories written by calling ``complete``
directly, round by round (each round every unfinished episode once, in order, with its own seed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from genevolve.policies.base import (AsAgentPolicy, Completion, SamplingParams, TokenStream, TurnByTurnPolicy,
                                     run_in_rounds)
from genevolve.policies.openai_compat import OpenAIChatPolicy
from genevolve.agent.rollout import rollout
from genevolve.agent.expert import ExpertNoise, ExpertPolicy

REFERENCE = json.loads((Path(__file__).parent / "data" / "turn_by_turn_rollouts.json").read_text())["cases"]


def digest(traj, world) -> str:
    """sha256 of the trajectory's JSON, with the world folder (in image paths) written as ``<world>``."""
    text = json.dumps(json.loads(traj.model_dump_json()), sort_keys=True).replace(str(world.root), "<world>")
    return hashlib.sha256(text.encode()).hexdigest()


def _hash(messages) -> int:
    return int(hashlib.sha256(json.dumps(messages).encode()).hexdigest(), 16)


class Flaky(TurnByTurnPolicy):
    """The expert, raising on the turns whose conversation hashes to 0 mod 4."""

    def __init__(self, world):
        self.expert = ExpertPolicy(world, ExpertNoise.named("cold-start"))
        self.name = "flaky"
        self.calls: list[list[int]] = []

    def complete(self, messages, seed=0):
        self.calls.append([len(messages), seed])
        h = _hash(messages)
        if h % 4 == 0:
            raise ValueError(f"no turn for {h % 1000}")
        return self.expert.complete(messages, seed=seed)


def run(world, tools, policy, **kw):
    progress: list[list[int]] = []
    trajs = rollout(world.split("bench")[::9][:6], policy, tools, on_turn=lambda a, b: progress.append([a, b]), **kw)
    return trajs, progress


def check(world, case: str, trajs, progress) -> None:
    ref = REFERENCE[case]
    assert progress == ref["progress"]
    got = [{"id": t.id, "termination": t.termination, "turns": len(t.turns),
            "policy_errors": [e for e in t.errors if "policy failed" in e], "sha256": digest(t, world)} for t in trajs]
    assert got == ref["trajectories"]
    assert all(t.token_ids == [] and t.assistant_mask == [] and t.token_logprobs == [] for t in trajs)
    assert all(turn.finish_reason is None for t in trajs for turn in t.turns)


@pytest.mark.parametrize("noise,seed", [("none", 0), ("cold-start", 3), ("blind-spots", 0)])
def test_the_expert_writes_the_recorded_trajectories(world, tools, noise, seed):
    check(world, f"expert_{noise}_s{seed}", *run(world, tools, ExpertPolicy(world, ExpertNoise.named(noise)), k=2, seed=seed))


def test_a_policy_that_raises_fails_only_its_trajectory(world, tools):
    pol = Flaky(world)
    trajs, progress = run(world, tools, pol, k=2, seed=1)
    check(world, "flaky", trajs, progress)
    assert pol.calls == REFERENCE["flaky"]["calls"]
    failed = [t for t in trajs if t.termination == "error"]
    assert failed and all(any("policy failed: ValueError: no turn for" in e for e in t.errors) for t in failed)


def test_a_remote_chat_policy_is_asked_with_the_rollouts_params(world, tools):
    """Wrapped without sampling settings (as ``resolve_policy`` does): each request carries the rollout's
    params and the trajectory's seed; a server failure ends that trajectory with the server's reason."""
    expert = ExpertPolicy(world, ExpertNoise.named("cold-start"))
    payloads = []

    def handler(req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content)
        payloads.append({k: v for k, v in body.items() if k != "messages"} | {"n_messages": len(body["messages"])})
        h = _hash(body["messages"])
        if h % 5 == 0:
            return httpx.Response(500, text="busy")
        text = expert.complete(body["messages"], seed=body.get("seed", 0))
        return httpx.Response(200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                      "finish_reason": "length" if h % 3 == 0 else "stop"}]})

    chat = OpenAIChatPolicy("http://127.0.0.1:9/v1", "student", transport=httpx.MockTransport(handler), backoff=0,
                            max_retries=1)
    params = SamplingParams(temperature=0.3, top_p=0.9, max_new_tokens=99)
    check(world, "openai", *run(world, tools, AsAgentPolicy(chat), k=2, seed=2, params=params))
    assert payloads == REFERENCE["openai"]["payloads"]


def test_resolve_wraps_a_server_url_once():
    from genevolve.policies.resolve import resolve_policy

    pol = resolve_policy("http://127.0.0.1:9/v1", model="m")
    assert isinstance(pol, AsAgentPolicy) and isinstance(pol.policy, OpenAIChatPolicy)
    assert pol.name == "openai:m@http://127.0.0.1:9/v1" and not pol.needs_exclusive_device
    assert callable(pol.generate) and callable(pol.run_conversations)


def test_rounds_ask_every_open_conversation_once_per_round_in_order():
    """Conversation i wants ``turns[i]`` turns; conversation 1 fails on its second turn."""
    turns, written, asked, rounds = [3, 2, 1], [0, 0, 0], [], []
    failed = set()

    def next_messages(i):
        return None if i in failed or written[i] >= turns[i] else [{"role": "user", "content": f"c{i}"}]

    def write(messages, seed):
        asked.append((messages[0]["content"], seed))
        if seed == 11 and written[1] == 1:
            raise KeyError("gone")
        return f"turn of seed {seed}"

    def on_turn(i, comp: Completion):
        if comp.finish_reason == "error":
            assert comp.error == "KeyError: 'gone'" and comp.text == ""
            failed.add(i)
        else:
            assert comp.finish_reason is None and comp.text == f"turn of seed {10 + i}"
            written[i] += 1

    streams = run_in_rounds(write, 3, next_messages, on_turn, [10, 11, 12], on_progress=lambda: rounds.append(list(written)))
    assert asked == [("c0", 10), ("c1", 11), ("c2", 12), ("c0", 10), ("c1", 11), ("c0", 10)]
    assert rounds == [[1, 1, 1], [2, 1, 1], [3, 1, 1]] and failed == {1}
    assert streams == [TokenStream(), TokenStream(), TokenStream()]


def test_every_policy_kind_is_a_rollout_policy(world):
    from genevolve.policies.local import LocalPolicy
    from genevolve.serving.scaleout import RemoteStudent

    for pol in (ExpertPolicy(world), AsAgentPolicy(OpenAIChatPolicy("http://127.0.0.1:9/v1", "m")),
                RemoteStudent("http://127.0.0.1:9/v1", "m")):
        assert isinstance(pol, TurnByTurnPolicy) and not pol.needs_exclusive_device
        assert isinstance(pol.name, str) and callable(pol.run_conversations)
    assert LocalPolicy.needs_exclusive_device and callable(LocalPolicy.run_conversations)
