"""The shipped tiny sandbox policy: small, loadable offline, and it speaks the protocol."""

from __future__ import annotations

import json

import pytest

from genevolve.evaluation.bench import protocol_valid
from genevolve.policies.base import SamplingParams
from genevolve.policies.tiny import TINY_DIR, tiny_exists

pytestmark = pytest.mark.skipif(not tiny_exists(TINY_DIR), reason="tiny policy not built")


def test_checkpoint_is_small_and_documented():
    size = sum(p.stat().st_size for p in TINY_DIR.iterdir() if p.is_file())
    assert size <= 25 * 2**20
    # three stages, all recorded (make tiny-policy): from scratch, then one epoch on a fresh draw,
    # then one more on another draw whose unguided data has blind spots
    stage1 = json.loads((TINY_DIR / "stage1" / "sft_config.json").read_text())
    stage2 = json.loads((TINY_DIR / "stage2" / "sft_config.json").read_text())
    cfg = json.loads((TINY_DIR / "sft_config.json").read_text())
    assert stage1["recipe"] == "tiny" and stage1["extra_requests"] > 0 and stage1["out"] == "runs/tiny-stage1"
    assert stage2["recipe"] == "model" and stage2["model"] == stage1["out"] and stage2["out"] == "runs/tiny-stage2"
    assert cfg["recipe"] == "model" and cfg["model"] == stage2["out"] and cfg["out"] == "assets/policy/tiny"
    assert len({stage1["seed"], stage2["seed"], cfg["seed"]}) == 3  # fresh draws of extra requests and noise
    assert cfg["noise"] == "blind-spots" and stage2["noise"] == "cold-start"
    assert json.loads((TINY_DIR / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_tiny_policy_writes_protocol_valid_trajectories(world, tools):
    from genevolve.policies.resolve import resolve_policy
    from genevolve.agent.rollout import rollout

    pol = resolve_policy("tiny")
    assert 100 < len(pol.tokenizer) <= 8192
    reqs = world.split("bench")[::15]
    trajs = rollout(reqs, pol, tools, k=1, params=SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=384, seed=0), seed=0)
    valid = sum(protocol_valid(t) for t in trajs)
    assert valid >= len(trajs) - 1, [t.errors for t in trajs if not protocol_valid(t)]


def test_a_trajectory_does_not_depend_on_its_batch(world, tools):
    """The same request and seed give the same tokens alone, in a batch of twelve, and next to guided rows."""
    from genevolve.agent.guides import oracle_guide
    from genevolve.policies.resolve import resolve_policy
    from genevolve.agent.rollout import rollout

    pol = resolve_policy("tiny")
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=384)
    reqs = world.split("bench")[::10][:12]
    target = reqs[3]
    alone = rollout([target], pol, tools, k=2, params=params, seed=4)
    batch = rollout(reqs, pol, tools, k=2, params=params, seed=4)
    guided = rollout(reqs, pol, tools, k=2, params=params, seed=4,
                     guides={r.id: oracle_guide(world, r) for r in reqs if r.id != target.id})
    got = [t for t in batch if t.request_id == target.id]
    got_guided = [t for t in guided if t.request_id == target.id]
    assert [t.token_ids for t in got] == [t.token_ids for t in alone]
    assert [t.token_ids for t in got_guided] == [t.token_ids for t in alone]
    assert alone[0].token_ids != alone[1].token_ids  # the two seeds do sample differently
    # Two requests that share a seed do not share their noise: their first sampled tokens are not all alike.
    firsts = {tuple(t.token_ids[i] for i, m in enumerate(t.assistant_mask) if m)[:12] for t in batch[::2]}
    assert len(firsts) > 1
