"""Training computed by hand beside the trainer: what the update sees, position by position, for cases the
end-to-end tests leave degenerate (a non-default base prompt, unequal judged rewards, an unjudged case)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from genevolve.agent.guides import SLOTS
from genevolve.agent.teacher import system_block
from genevolve.experience.bank import ExperienceBank, guide_text
from genevolve.training import steps

BASE = "You are a careful image agent. Plan, search, then write one prompt-reference program."  # not the default


@pytest.fixture(scope="module")
def tok(tiny_folder):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_folder)
    assert len(t) > 100  # a tokenizer that loaded (an empty one would make every comparison trivial)
    return t


def _trajectory(tok, tid: str, base: str, user: str, answer: str):
    """A trajectory's stream as the engine writes it: its own base prompt's system block, a user turn, an answer."""
    head = system_block(tok, None, base) + tok(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n",
                                                add_special_tokens=False)["input_ids"]
    tail = tok(answer, add_special_tokens=False)["input_ids"]
    return SimpleNamespace(id=tid, token_ids=head + tail, assistant_mask=[0] * len(head) + [1] * len(tail),
                           system_prompt=base)


def _run(tok, bank, use_ved=True):
    return SimpleNamespace(cfg=SimpleNamespace(use_ved=use_ved), pol=SimpleNamespace(tokenizer=tok), bank=bank,
                           procs=SimpleNamespace(world=1, rank=0))


def test_the_teacher_reads_the_trajectorys_own_base_prompt_with_the_guide(tok, tmp_path):
    """The teacher's stream is a plain encoding of (the trajectory's own base prompt + the guide) followed by the
    student's tokens after its system block. Built on the default base prompt instead, the stream no longer
    matches and the row silently loses its teacher."""
    bank = ExperienceBank(tmp_path / "bank", gate=-1.0)
    exp = bank.add("evolve-0001", "Draw three red circles", {s: "Count the objects and name the count." for s in SLOTS})
    trs = [_trajectory(tok, f"t{k}", BASE, "Draw three red circles", f"answer {k}: three red circles") for k in range(2)]
    groups = [[(trs[0], SimpleNamespace(reward=0.9)), (trs[1], SimpleNamespace(reward=0.2))]]
    batch = [SimpleNamespace(text="Draw three red circles")]
    targets = steps.update_targets(_run(tok, bank), batch, groups)
    assert targets.teacher_errors == [] and targets.hits == 2
    want_block = system_block(tok, guide_text(exp), BASE)
    n_sys = len(system_block(tok, None, BASE))
    for s, tr in zip(targets.scored, trs):
        assert s.teacher_ids == want_block + tr.token_ids[n_sys:]
        assert s.teacher_offset == len(want_block) - n_sys
        assert all(s.teacher_ids[i + s.teacher_offset] == tr.token_ids[i] for i in range(n_sys, len(tr.token_ids)))
    assert BASE in tok.decode(targets.scored[0].teacher_ids) and guide_text(exp).split("\n")[0] in tok.decode(
        targets.scored[0].teacher_ids)


def test_advantages_follow_judged_rewards_and_an_unjudged_case_gets_its_groups_mean(tok, tmp_path):
    """Unequal, non-zero rewards and one unjudged case: the unjudged case's advantage is exactly 0 (its group's mean
    stands in for its reward), never the advantage of a reward of 0."""
    from genevolve.training.losses import group_advantages
    import torch

    trs = [_trajectory(tok, f"t{k}", BASE, "Draw a red circle", f"answer {k}") for k in range(3)]
    groups = [[(trs[0], SimpleNamespace(reward=0.8)), (trs[1], SimpleNamespace(reward=0.2)),
               (trs[2], SimpleNamespace(reward=None))]]
    adv = steps.advantages(groups)
    by_hand = group_advantages(torch.tensor([[0.8, 0.2, 0.5]]))
    assert torch.allclose(adv, by_hand) and abs(float(adv[0, 2])) < 1e-6
    assert float(adv[0, 0]) > 0 > float(adv[0, 1])
    targets = steps.update_targets(_run(tok, ExperienceBank(tmp_path / "empty"), use_ved=False),
                                   [SimpleNamespace(text="Draw a red circle")], groups)
    assert [s.advantage for s in targets.scored] == pytest.approx([float(a) for a in adv[0]])
