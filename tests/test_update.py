"""The token-level update (genevolve/training/update.py) beside plain forwards: every statistic it reports, the
arms that switch a loss off, micro-batching that must not change the step, and the forward that computes the
output layer on the assistant tokens only."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from genevolve.training import update
from genevolve.training.losses import grpo_loss
from genevolve.training.update import LossSettings, accumulate_gradients, row_logprobs, token_logprobs
from test_training_oracles import LOSS_KW as ORACLE_KW, _plain_logp, _rows, lora_model  # noqa: F401  (a module fixture)

LOSS_KW = ORACLE_KW | {"top_frac": 0.5}  # the two teacher rows below then select 5 and 6 tokens


def _two_teachers():
    """_rows() with a teacher on the third row too (its block 3 tokens longer than the student's 5), so that the
    teacher rows select unequal numbers of tokens."""
    rows = _rows()
    rows[2].teacher_ids, rows[2].teacher_offset = [3, 4, 5, 6, 7, 8, 9, 10] + rows[2].ids[5:], 3
    return rows


def _stats_by_hand(model, rows, kw):
    """Each statistic from plain forwards: GRPO's over the step's assistant tokens; VED's a mean over the teacher
    rows of each row's value over its top-frac tokens by |log q - log p|; g2 the squared norm of each term's
    gradient with respect to the sampled tokens' log-probabilities."""
    n_tokens = sum(sum(r.mask) for r in rows)
    teach = [r for r in rows if r.teacher_ids is not None]
    out = dict.fromkeys(("grpo", "kl", "ved", "ved_tokens", "mean_gap", "g2_grpo", "g2_ved"), 0.0)
    for r in rows:
        logp = _plain_logp(model, r.ids).detach().requires_grad_(True)
        with torch.no_grad(), model.disable_adapter():
            ref = _plain_logp(model, r.ids)
        m = torch.tensor(r.mask, dtype=torch.float32)
        d = ref - logp.detach()
        out["grpo"] += float((-r.advantage * m).sum()) / n_tokens  # ratio 1: pi_old is the current weights
        out["kl"] += float(((torch.exp(d) - d - 1.0) * m).sum()) / n_tokens
        pg = (-torch.exp(logp - logp.detach()) * r.advantage + kw["beta"] * (torch.exp(ref - logp) - (ref - logp) - 1))
        out["g2_grpo"] += float((torch.autograd.grad((pg * m).sum() / n_tokens, logp)[0]).pow(2).sum())
        if r.teacher_ids is not None:
            with torch.no_grad():
                logq = _plain_logp(model, r.teacher_ids)[r.teacher_offset:][: len(r.ids)]
            ell = (logp.detach() - logq).clamp(-10, 10)
            gap = (logq - logp.detach()).abs()
            k = max(1, math.ceil(kw["top_frac"] * int(m.sum())))
            top = torch.topk(gap.masked_fill(m <= 0, float("-inf")), k).indices
            per = torch.exp(-ell) - 1.0 + ell + ell * (logp - logp.detach())
            term = per[top].mean() / len(teach)
            out["ved"] += float(term)
            out["ved_tokens"] += k
            out["mean_gap"] += float(gap[top].mean()) / len(teach)
            out["g2_ved"] += float((kw["lambda_ved"] * torch.autograd.grad(term, logp)[0]).pow(2).sum())
    return out


@pytest.mark.parametrize("micro_batch", [1, 2, 3])
@pytest.mark.parametrize("teachers", [1, 2])
def test_every_statistic_equals_its_value_from_plain_forwards(lora_model, micro_batch, teachers):
    model, rows = lora_model, _two_teachers() if teachers == 2 else _rows()
    want = _stats_by_hand(model, rows, LOSS_KW)
    model.zero_grad()
    got = accumulate_gradients(model, rows, LossSettings(micro_batch=micro_batch, **LOSS_KW), "cpu", 0,
                               n_tokens=sum(sum(r.mask) for r in rows), n_teacher=teachers)
    model.zero_grad()
    assert set(got) == set(update.STAT_KEYS)
    for k in ("grpo", "kl", "ved", "mean_gap", "g2_grpo", "g2_ved"):
        assert abs(want[k]) > 1e-6, k  # a value worth comparing
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-7), k
    assert got["ved_tokens"] == want["ved_tokens"] and isinstance(got["ved_tokens"], int)
    assert got["clip_low"] == got["clip_high"] == 0.0  # one optimizer step per step: the ratio is 1
    assert got["teacher_seconds"] > 0 and got["update_seconds"] > 0


def test_micro_batching_does_not_change_the_steps_gradient_with_two_teacher_rows(lora_model):
    model, params = lora_model, [p for p in lora_model.parameters() if p.requires_grad]
    grads = []
    for mb in (1, 2, 3):
        model.zero_grad()
        accumulate_gradients(model, _two_teachers(), LossSettings(micro_batch=mb, **LOSS_KW), "cpu", 0,
                             n_tokens=sum(sum(r.mask) for r in _two_teachers()), n_teacher=2)
        grads.append([p.grad.clone() for p in params])
    model.zero_grad()
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def _grads(model, rows, **kw):
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    stats = accumulate_gradients(model, rows, LossSettings(**(LOSS_KW | kw)), "cpu", 0,
                                 n_tokens=sum(sum(r.mask) for r in rows), n_teacher=sum(r.teacher_ids is not None for r in rows))
    out = [None if p.grad is None else p.grad.clone() for p in params]
    model.zero_grad()
    return out, stats


def test_the_arms_switch_their_loss_off(lora_model):
    model, rows = lora_model, _two_teachers()
    both, s_both = _grads(model, rows)
    grpo, s_grpo = _grads(model, rows, use_ved=False)
    ved, s_ved = _grads(model, rows, use_grpo=False)
    assert s_grpo["ved"] == s_grpo["ved_tokens"] == s_grpo["mean_gap"] == s_grpo["g2_ved"] == 0
    assert s_ved["grpo"] == s_ved["kl"] == s_ved["g2_grpo"] == 0 and s_ved["ved"] == pytest.approx(s_both["ved"])
    assert s_grpo["grpo"] == pytest.approx(s_both["grpo"]) and s_grpo["kl"] == pytest.approx(s_both["kl"])
    for b, g, v in zip(both, grpo, ved):  # L = L_GRPO + lambda * L_VED: the gradients add
        assert torch.allclose(b, g + v, rtol=1e-4, atol=1e-7)
    assert max(float(v.abs().max()) for v in ved) > 1e-5
    none, s_none = _grads(model, rows, use_grpo=False, use_ved=False)
    assert all(g is None for g in none) and s_none["update_seconds"] == 0.0
    lam, _ = _grads(model, rows, use_grpo=False, lambda_ved=1.0)
    for a, b in zip(lam, ved):
        assert torch.allclose(2 * a, b, rtol=1e-4, atol=1e-7)


def test_without_a_teacher_row_ved_adds_nothing_and_beta_zero_reads_no_reference(lora_model, monkeypatch):
    model, rows = lora_model, _rows()
    for r in rows:
        r.teacher_ids = None
    plain, s_plain = _grads(model, rows)
    assert s_plain["ved"] == s_plain["ved_tokens"] == 0
    grpo_only, _ = _grads(model, rows, use_ved=False)
    for a, b in zip(plain, grpo_only):
        assert torch.allclose(a, b)
    calls = []
    real = type(model).disable_adapter

    def counting(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(type(model), "disable_adapter", counting)
    _, s0 = _grads(model, rows, beta=0.0)
    assert calls == [] and s0["kl"] == 0.0
    _grads(model, rows, micro_batch=2)
    assert len(calls) == 2  # one reference forward per micro-batch


def test_a_step_on_a_copy_changes_the_weights_by_the_gradient(lora_model):
    """The loss the update back-propagates is the one the statistics describe: on rows with equal advantages of
    one sign, one SGD step lowers their GRPO surrogate."""
    model = copy.deepcopy(lora_model)
    rows = _rows()
    for r in rows:
        r.advantage, r.teacher_ids = 1.0, None
    before = sum(float(_plain_logp(model, r.ids)[torch.tensor(r.mask).bool()].sum()) for r in rows)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    accumulate_gradients(model, rows, LossSettings(use_ved=False, beta=0.0, micro_batch=2), "cpu", 0,
                         n_tokens=sum(sum(r.mask) for r in rows), n_teacher=0)
    opt.step()
    after = sum(float(_plain_logp(model, r.ids)[torch.tensor(r.mask).bool()].sum()) for r in rows)
    assert after > before  # positive advantages: the sampled tokens become more likely


# --- the forward --------------------------------------------------------------------------------------------


def test_batch_pads_with_the_pad_id_and_masks_the_padding():
    ids, attn = update._batch([[5, 6, 7], [8]], "cpu", 9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and attn.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == attn.dtype == torch.long


def test_the_padder_fills_rows_from_lists_and_tensors():
    pad = update._padder(4, "cpu")
    out = pad([[1, 2], torch.tensor([3.0, 4.0, 5.0])])
    assert out.tolist() == [[1, 2, 0, 0], [3, 4, 5, 0]] and out.dtype == torch.float32
    assert pad([[1]], fill=-1.0).tolist() == [[1, -1, -1, -1]]


def test_shifted_moves_a_mask_right_or_left():
    assert update._shifted([1, 0, 1], 2) == [0, 0, 1, 0, 1]
    assert update._shifted([1, 0, 1], 0) == [1, 0, 1]
    assert update._shifted([1, 0, 1], -1) == [0, 1]


def test_token_logprobs_equal_a_plain_forward_with_and_without_the_needed_positions(lora_model):
    model, rows = lora_model, _rows()
    seqs, masks = [r.ids for r in rows], [r.mask for r in rows]
    plain = [_plain_logp(model, s).detach() for s in seqs]
    with torch.no_grad():
        full = token_logprobs(model, seqs, "cpu", 0)
        part = token_logprobs(model, seqs, "cpu", 3, masks)
        rows_ = row_logprobs(model, seqs, "cpu", 0, masks)
        rows_full = row_logprobs(model, seqs, "cpu", 0)
        one = row_logprobs(model, seqs[:1], "cpu", 0)
        one_part = row_logprobs(model, seqs[:1], "cpu", 0, masks[:1])
    for p, f, q, r, m in zip(plain, full, part, rows_, masks):
        assert f.shape == p.shape and torch.allclose(f, p, atol=1e-5)
        m = torch.tensor(m).bool()
        assert torch.allclose(q[m], p[m], atol=1e-5) and bool((q[~m] == 0).all())
        assert torch.allclose(r, q, atol=1e-5)
    for p, f in zip(plain, rows_full):
        assert torch.allclose(f, p, atol=1e-5)
    assert torch.allclose(one[0], plain[0], atol=1e-5) and full[0][0] == 0
    m0 = torch.tensor(masks[0]).bool()
    assert torch.allclose(one_part[0][m0], plain[0][m0], atol=1e-5) and bool((one_part[0][~m0] == 0).all())


class _Scaled(torch.nn.Module):
    """A model whose logits are its head's output scaled after the head (as some models cap logits)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        out.logits = out.logits * 0.5
        return out

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()


def test_a_model_that_scales_logits_after_its_head_uses_the_full_forward(lora_model):
    base = lora_model.get_base_model()
    assert update._split_head_ok(lora_model, "cpu") is True and lora_model._genevolve_split_head is True
    scaled = _Scaled(base)
    assert update._split_head_ok(scaled, "cpu") is False and scaled._genevolve_split_head is False
    seqs, masks = [r.ids for r in _rows()], [r.mask for r in _rows()]
    with torch.no_grad():
        want = update._full_logprobs(scaled, *update._batch(seqs, "cpu", 0))
        got = token_logprobs(scaled, seqs, "cpu", 0, masks)
    for i, s in enumerate(seqs):
        assert torch.allclose(got[i], want[i, : len(s)], atol=1e-6)
    scaled._genevolve_split_head = True  # the answer is read once, then kept
    assert update._split_head_ok(scaled, "cpu") is True


def test_a_model_without_a_decoder_is_not_split():
    class NoDecoder(torch.nn.Module):
        config = None

    m = NoDecoder()
    assert update._split_head_ok(m, "cpu") is False and m._genevolve_split_head is False


def test_the_decoder_and_head_are_found_inside_a_peft_model(lora_model):
    dec, head = update._decoder_and_head(lora_model)
    base = lora_model.get_base_model()
    assert dec is base.get_decoder() and head is base.get_output_embeddings()
    dec2, head2 = update._decoder_and_head(base)
    assert dec2 is dec and head2 is head


def test_grpo_statistics_use_the_advantage_sign(lora_model):
    """A sanity check on the surrogate the update reports: with pi_old = the current weights, the GRPO loss is
    minus the token-weighted mean advantage."""
    rows = _rows()
    n = sum(sum(r.mask) for r in rows)
    _, s = _grads(lora_model, rows, use_ved=False, beta=0.0)
    assert s["grpo"] == pytest.approx(-sum(r.advantage * sum(r.mask) for r in rows) / n, rel=1e-5)
    loss, gs = grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), None, torch.tensor([1.0]), torch.ones(1, 2))
    assert gs.pg_loss == pytest.approx(-1.0)


def test_the_clock_adds_up_over_micro_batches(lora_model, monkeypatch):
    """Frozen-forward and update seconds are sums over the micro-batches (a clock that ticks 1 s per reading)."""
    ticks = iter(range(10_000))
    monkeypatch.setattr(update.time, "time", lambda: float(next(ticks)))
    rows = _two_teachers()
    _, s = _grads(lora_model, rows, micro_batch=1)
    assert s["teacher_seconds"] == 3.0 and s["update_seconds"] == 3.0


def test_arms_without_a_loss_skip_its_forwards(lora_model, monkeypatch):
    """GRPO without a KL term reads no reference, and an arm without VED reads no teacher: one forward per row."""
    seen = []
    real = update.row_logprobs
    monkeypatch.setattr(update, "row_logprobs", lambda model, seqs, *a, **k: seen.append(len(seqs)) or real(model, seqs, *a, **k))
    _grads(lora_model, _two_teachers(), use_ved=False, beta=0.0)
    assert seen == [3]  # the student's forward only
    seen.clear()
    _grads(lora_model, _two_teachers(), beta=0.0)
    assert seen == [2, 3]  # the two teacher rows, then the student


def test_one_assistant_token_is_the_whole_steps_mean():
    """A step of one assistant token: GRPO's value is minus its advantage (weight 1 / max(n_tokens, 1))."""
    from genevolve.policies.tiny import build_tiny_model, train_tokenizer
    from peft import LoraConfig, get_peft_model
    from genevolve.training.checkpoint import LORA_TARGETS

    tok = train_tokenizer(["a b c d e f g"] * 20, vocab_size=60)
    model = get_peft_model(build_tiny_model(tok, seed=0, layers=1, hidden=32),
                           LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    row = update.Scored([5, 6, 7], [0, 0, 1], 0, 0.75)
    stats = accumulate_gradients(model, [row], LossSettings(use_ved=False, beta=0.0), "cpu", 0, n_tokens=1, n_teacher=0)
    assert stats["grpo"] == pytest.approx(-0.75)


class _Offset(torch.nn.Module):
    """A model whose logits are its head's output plus ``delta`` (head: a zero weight and a bias of ``bias``)."""

    def __init__(self, delta, bias):
        super().__init__()
        from types import SimpleNamespace

        self.delta = delta
        self.head = torch.nn.Linear(4, 10)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.fill_(bias)
        self.config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(vocab_size=10))
        self.dec = lambda input_ids, attention_mask=None: SimpleNamespace(
            last_hidden_state=torch.zeros(*input_ids.shape, 4))

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.head(self.dec(input_ids).last_hidden_state) + self.delta)

    def get_decoder(self):
        return self.dec

    def get_output_embeddings(self):
        return self.head


@pytest.mark.parametrize("delta,bias,ok", [(5e-5, 0.0, True), (5e-3, 100.0, True), (5e-3, 0.0, False), (0.5, 100.0, False)])
def test_the_split_head_check_allows_rounding_of_1e_4_absolute_plus_1e_4_relative(delta, bias, ok):
    assert update._split_head_ok(_Offset(delta, bias), "cpu") is ok
