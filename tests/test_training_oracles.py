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


# ---------------------------------------------------------------------------------------------------------
# One whole update step recomputed by hand: plain forwards, the published formulas, the gradient on the LoRA
# ---------------------------------------------------------------------------------------------------------
LOSS_KW = dict(use_grpo=True, use_ved=True, lambda_ved=2.0, top_frac=0.25, clip_low=0.2, clip_high=0.28, beta=0.05)


@pytest.fixture(scope="module")
def lora_model():
    """A tiny random Llama with a LoRA whose B matrices are not zero, so that the adapter changes every forward
    (with B = 0, as a fresh LoRA starts, the reference and the student coincide and a KL bug hides)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from genevolve.policies.tiny import build_tiny_model, train_tokenizer
    from genevolve.training.checkpoint import LORA_TARGETS

    tok = train_tokenizer(["Draw three gold stars above a red circle. Search first, then answer."] * 40, vocab_size=300)
    model = get_peft_model(build_tiny_model(tok, seed=0, layers=2, hidden=64),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _rows():
    """Three trajectories of unequal lengths and masks, unequal advantages; the first has a teacher whose system
    block is 2 tokens longer than the student's (n_sys = 3)."""
    import torch

    from genevolve.training.update import Scored

    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(5, 250, (n,), generator=g).tolist() for n in (14, 9, 20)]
    masks = [[0] * 4 + [1] * 10, [0] * 3 + [1] * 6, [0] * 5 + [1] * 7 + [0] * 3 + [1] * 5]
    rows = [Scored(i, m, k, a) for k, (i, m, a) in enumerate(zip(ids, masks, (1.2, -0.7, 0.4)))]
    rows[0].teacher_ids, rows[0].teacher_offset = [7, 8, 9, 10, 11] + ids[0][3:], 2
    return rows


def _plain_logp(model, ids):
    import torch

    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    return torch.cat([torch.zeros(1), lp])


def _by_hand(model, rows, kw):
    """L = mean over the step's assistant tokens of (-min(r A, clip(r) A) + beta k3(ref - logp)) + lambda * mean over
    teacher rows of (mean over the row's top-frac tokens by |log q - log p| of rho k3(l) with gradient rho l grad log p)."""
    import math

    import torch

    n_tokens = sum(sum(r.mask) for r in rows)
    grpo, kl_sum, ved = 0.0, 0.0, 0.0
    for r in rows:
        logp = _plain_logp(model, r.ids)
        with torch.no_grad(), model.disable_adapter():
            ref = _plain_logp(model, r.ids)
        m = torch.tensor(r.mask, dtype=torch.float32)
        ratio = torch.exp(logp - logp.detach())
        pg = -torch.minimum(ratio * r.advantage, ratio.clamp(1 - kw["clip_low"], 1 + kw["clip_high"]) * r.advantage)
        d = ref - logp
        kl = torch.exp(d) - d - 1.0
        grpo = grpo + ((pg + kw["beta"] * kl) * m).sum() / n_tokens
        kl_sum += float((kl * m).sum())
        if r.teacher_ids is not None:
            with torch.no_grad():
                logq = _plain_logp(model, r.teacher_ids)[r.teacher_offset:][: len(r.ids)]  # student position p = teacher p + offset
            ell = (logp.detach() - logq).clamp(-10, 10)
            per = torch.exp(-ell) - 1.0 + ell + ell * (logp - logp.detach())  # rho = 1 (pi_old = the current weights)
            gap = (logq - logp.detach()).abs().masked_fill(m <= 0, float("-inf"))
            k = max(1, math.ceil(kw["top_frac"] * int(m.sum())))
            ved = ved + per[torch.topk(gap, k).indices].mean()
    return grpo + kw["lambda_ved"] * ved, kl_sum / n_tokens


@pytest.mark.parametrize("micro_batch", [1, 2, 3])
def test_one_update_step_equals_the_formulas_computed_by_hand(lora_model, micro_batch):
    """accumulate_gradients against plain forwards and the published formulas, in 1, 2 or 3 micro-batches of unequal
    token counts: the gradient on every LoRA weight and the KL to the reference (adapter off) agree. Catches a
    reference read with the adapter on, a teacher aligned one position off, micro-batches not weighted by their
    share of the step's tokens."""
    import torch

    from genevolve.training.update import LossSettings, accumulate_gradients

    model, rows = lora_model, _rows()
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    loss, kl = _by_hand(model, rows, LOSS_KW)
    loss.backward()
    want = [p.grad.clone() for p in params]
    model.zero_grad()
    stats = accumulate_gradients(model, rows, LossSettings(micro_batch=micro_batch, **LOSS_KW), "cpu", 0,
                                 n_tokens=sum(sum(r.mask) for r in rows), n_teacher=1)
    got = [p.grad.clone() for p in params]
    model.zero_grad()
    assert kl > 1e-3 and stats["kl"] == pytest.approx(kl, rel=1e-4)
    assert max(float(w.abs().max()) for w in want) > 1e-4  # a gradient worth comparing
    for w, g in zip(want, got):
        assert torch.allclose(g, w, rtol=1e-3, atol=1e-6), float((g - w).abs().max())
