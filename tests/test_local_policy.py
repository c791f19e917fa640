"""The local transformers policy and the batched rollout engine, on a tiny random model (no download)."""

from __future__ import annotations

import pytest
import torch

from genevolve.agent.loop import Tools
from genevolve.policies.base import SamplingParams
from genevolve.policies.local import LocalPolicy, encode_conversation
from genevolve.policies.tiny import build_tiny_model, train_tokenizer
from genevolve.agent.protocol import SYSTEM_PROMPT
from genevolve.records.schema import Request
from genevolve.agent.rollout import rollout
from genevolve.tools.base import ImageHit

TEXTS = [SYSTEM_PROMPT, "Draw three gold stars above a red circle.", "<think>I search.</think><tool_call>{\"name\": \"search\"}</tool_call>",
         "--- search result for [x] ---\n1. title: y\n  snippet: z\n--- end of search result ---"] * 20


@pytest.fixture(scope="module")
def policy():
    tok = train_tokenizer(TEXTS, vocab_size=400)
    model = build_tiny_model(tok, seed=0, layers=2, hidden=64)
    model.eval()
    return LocalPolicy(model, tok, name="tiny-random")


def conv(text="Draw three gold stars.", extra=()):
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}, *extra]


GREEDY = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=12)


def test_batched_generation_matches_one_at_a_time(policy):
    convs = [conv("Draw a red circle."), conv("Draw three gold stars above a very long list of things to draw."), conv("x")]
    together = policy.generate(convs, GREEDY)
    alone = [policy.generate([c], GREEDY)[0] for c in convs]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert all(len(c.token_ids) == len(c.logprobs) for c in together)


def test_logprobs_are_the_models_own(policy):
    c = conv()
    out = policy.generate([c], SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3))[0]
    prompt = policy.tokenizer(policy._render(c), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(policy.model(input_ids=ids).logits[0].float(), -1)
    want = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(want, abs=1e-4)


@pytest.fixture(scope="module")
def stopping_policy(policy):
    """The same tiny model with its stop token's logit raised by 4, so that a sampled turn ends with a stop token
    after a few tokens (the random model alone almost never samples it)."""
    model = build_tiny_model(policy.tokenizer, seed=0, layers=2, hidden=64).eval()
    stop = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def raise_stop(module, args, logits):
        logits[..., stop] += 4.0
        return logits

    model.lm_head.register_forward_hook(raise_stop)
    return LocalPolicy(model, policy.tokenizer, name="tiny-stopping")


OBS = {"role": "user", "content": "<tool_response>\nsome result\n</tool_response>"}


def two_turns(pol, params):
    """A conversation continued turn by turn on one stream: (stream, [turn 1, turn 2])."""
    turns = []

    def next_messages(i):
        if len(turns) == 2:
            return None
        return conv() + ([{"role": "assistant", "content": turns[0].text}, OBS] if turns else [])

    (st,) = pol.run_conversations(1, next_messages, lambda i, c: turns.append(c), params)
    assert st.resets == 0
    # The stream's mask is 1 exactly on the sampled tokens.
    sampled = [t for t, m in zip(st.ids, st.mask) if m]
    assert sampled == turns[0].token_ids + turns[1].token_ids
    assert len(st.ids) == len(st.mask) == len(st.logprobs)
    return st, turns


def test_streams_reuse_the_cache_across_turns(stopping_policy):
    """Continuing a conversation turn by turn gives the same tokens as re-encoding the whole of it.

    That holds when the re-rendered history is token-identical to the stream: the first turn ended with a stop
    token and its sampled tokens are the ones the tokenizer would choose for its text (a random model often
    samples a split that encodes differently, or half a character). The first seed whose first turn is like that
    is used (59 is, for this model); the noise is then the same (one seed, one first user message, the same
    positions), so a fresh stream over the history samples the same second turn."""
    prompt = policy_encode(stopping_policy, conv())
    for seed in (59, *range(100)):
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=48, seed=seed)
        first = stopping_policy.generate([conv()], params)[0]
        history = conv() + [{"role": "assistant", "content": first.text}, OBS]
        canonical = policy_encode(stopping_policy, history)[: len(prompt) + len(first.token_ids)] == prompt + first.token_ids
        if first.finish_reason == "stop" and len(first.token_ids) >= 4 and canonical:
            break
    else:
        pytest.fail("no seed gives a first turn that ends with a stop token and re-encodes to itself")
    st, turns = two_turns(stopping_policy, params)
    assert turns[0].token_ids == first.token_ids
    assert st.ids[: len(st.ids) - len(turns[1].token_ids)] == policy_encode(stopping_policy, history)
    fresh = stopping_policy.generate([history], params)[0]
    assert turns[1].token_ids == fresh.token_ids and len(fresh.token_ids) >= 2
    assert turns[1].logprobs == pytest.approx(fresh.logprobs, abs=1e-4)


def test_a_turn_cut_by_the_token_budget_is_followed_by_the_templates_text(policy):
    """A turn that ran out of tokens has no stop token in the stream: the stream goes on with the template's text
    after the turn (its stop token, the observation), encoded, behind the sampled tokens as they were."""
    st, turns = two_turns(policy, GREEDY)
    assert turns[0].finish_reason == "length" and len(turns[0].token_ids) == GREEDY.max_new_tokens
    prompt = policy_encode(policy, conv())
    text = policy._render(conv() + [{"role": "assistant", "content": turns[0].text}, OBS])
    rest = policy.tokenizer(text[len(policy._render(conv()) + turns[0].text):], add_special_tokens=False)["input_ids"]
    assert rest[0] == policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert st.ids == prompt + turns[0].token_ids + rest + turns[1].token_ids


def policy_encode(pol, messages):
    """The token ids of a conversation rendered with the generation prompt, encoded in one piece."""
    return pol.tokenizer(pol._render(messages), add_special_tokens=False)["input_ids"]


def test_the_cache_goes_to_the_model_without_a_deprecation_warning(policy):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = policy.generate([conv(), conv("x")], GREEDY)
    assert all(c.token_ids for c in out)


def test_encode_conversation_masks_only_assistant_turns(policy):
    msgs = conv(extra=[{"role": "assistant", "content": "<think>a</think><answer>{}</answer>"},
                       {"role": "user", "content": "<tool_response>\nobs\n</tool_response>"},
                       {"role": "assistant", "content": "<think>b</think>"}])
    ids, mask = encode_conversation(policy.tokenizer, msgs)
    text = policy.tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert text == "<think>a</think><answer>{}</answer><|im_end|><think>b</think><|im_end|>"
    # Whitespace inside a turn is the policy's to write (and learn); the template's own newline is not.
    msgs[2]["content"] = "<think>a</think>\n<answer>{}</answer>"
    ids, mask = encode_conversation(policy.tokenizer, msgs)
    assert policy.tokenizer.decode([i for i, m in zip(ids, mask) if m]).startswith("<think>a</think>\n<answer>{}</answer><|im_end|><think>")


class FakeTools:
    def search(self, queries, top_k=5):
        return "--- search result for [q] ---\n--- end of search result ---"

    def image_search(self, query, top_k=5):
        return [ImageHit(title="t", url="u", local_path="/tmp/x.png")]

    def query(self, skill_name):
        return "card"


@pytest.mark.parametrize("max_batch,prefill_scores", [(64, None), (3, None), (64, 1)])
def test_engine_records_exact_streams(policy, max_batch, prefill_scores, monkeypatch):
    """3 rows for 4 trajectories: one waits for a free row; a tiny score budget: one row per prefill call."""
    from genevolve.policies import continuous

    if prefill_scores:
        monkeypatch.setattr(continuous, "PREFILL_SCORES", prefill_scores)
    tools = Tools(FakeTools(), FakeTools(), FakeTools())
    reqs = [Request(id="r1", text="Draw a red circle."), Request(id="r2", text="Draw two blue squares above a star.")]
    progress = []
    trajs = rollout(reqs, policy, tools, k=2, params=SamplingParams(max_new_tokens=16, seed=0), seed=5, max_batch=max_batch,
                    on_turn=lambda done, total: progress.append((done, total)))
    assert [t.id for t in trajs] == ["r1-s5-k0", "r1-s5-k1", "r2-s5-k0", "r2-s5-k1"]
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]  # reported as each trajectory finishes
    for t in trajs:
        assert t.termination in ("answer", "no_answer", "max_rounds_reached")  # a random model rarely answers
        assert len(t.token_ids) == len(t.assistant_mask) == len(t.token_logprobs)
        runs, cur = [], []  # each turn's sampled tokens are one run of the mask (decoded apart: a turn
        for i, m in zip(t.token_ids, t.assistant_mask):  # cut by the token budget may end mid-character)
            if m:
                cur.append(i)
            elif cur:
                runs, cur = runs + [cur], []
        sampled = "".join(policy.tokenizer.decode(r) for r in runs + [cur])
        for stop in ("<|im_end|>", "<|endoftext|>"):  # the stop token each turn sampled
            sampled = sampled.replace(stop, "")
        assert sampled == "".join(turn.raw for turn in t.turns)
        assert not any("re-encoded" in e for e in t.errors)
        assert all(turn.finish_reason in ("stop", "length") for turn in t.turns)
        # Observations and format-error notes are in the stream but never in the mask.
        assert sum(t.assistant_mask) < len(t.token_ids)
        # Streams of different lengths shared one padded batch per turn, yet every recorded
        # log-probability is what the model gives the whole stream read in one pass.
        with torch.no_grad():
            logp = torch.log_softmax(policy.model(input_ids=torch.tensor([t.token_ids])).logits[0].float(), -1)
        at = [i for i, m in enumerate(t.assistant_mask) if m]
        want = [float(logp[i - 1, t.token_ids[i]]) for i in at]
        assert [t.token_logprobs[i] for i in at] == pytest.approx(want, abs=1e-4)


def test_engine_is_reproducible_and_records_model_failures(policy, monkeypatch):
    tools = Tools(FakeTools(), FakeTools(), FakeTools())
    reqs = [Request(id="r1", text="Draw a red circle.")]
    params = SamplingParams(max_new_tokens=16)
    a, b = (rollout(reqs, policy, tools, k=3, params=params, seed=1) for _ in range(2))
    assert [t.token_ids for t in a] == [t.token_ids for t in b]

    calls = {"n": 0}
    real = policy.model.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(policy.model, "forward", flaky)
    trajs = rollout(reqs, policy, tools, k=3, params=params, seed=1)
    assert all(t.termination == "error" and any("out of memory" in e for e in t.errors) for t in trajs)


def test_lora_adapters_attach_switch_and_disable(policy, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model(policy.tokenizer, seed=0, layers=2, hidden=64)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "a1")
    pol = LocalPolicy(build_tiny_model(policy.tokenizer, seed=0, layers=2, hidden=64).eval(), policy.tokenizer)
    c = [conv()]
    plain = pol.generate(c, GREEDY)[0].logprobs
    pol.load_adapter(tmp_path / "a1", "a1")
    adapted = pol.generate(c, GREEDY)[0].logprobs
    pol.disable_adapter()
    disabled = pol.generate(c, GREEDY)[0].logprobs
    assert adapted != pytest.approx(plain, abs=1e-4)
    assert disabled == pytest.approx(plain, abs=1e-5)
    pol.set_adapter("a1")
    assert pol.generate(c, GREEDY)[0].logprobs == pytest.approx(adapted, abs=1e-5)
    assert pol.adapters == ["a1"]
    with pytest.raises(FileNotFoundError, match="no adapter at .*missing"):
        pol.load_adapter(tmp_path / "missing", "x")


def test_sampling_inverts_the_distribution_and_never_leaves_the_top_p_set():
    from genevolve.policies.sampling import sample_tokens, uniform

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(temperature=1.0, top_p=0.8, max_new_tokens=1)
    picks = [int(sample_tokens(logits, params, [u])[0]) for u in (0.0, 0.3, 0.63, 0.99, 1 - 2**-53)]
    assert picks == [0, 0, 1, 1, 1]  # the kept set {0, 1} renormalised to 0.625 / 0.375
    # The uniform numbers are a function of (key, position) only, and spread over [0, 1).
    us = [uniform(7, i) for i in range(2000)]
    assert us == [uniform(7, i) for i in range(2000)] and 0 <= min(us) and max(us) < 1
    assert abs(sum(us) / len(us) - 0.5) < 0.03 and uniform(8, 0) != us[0]


def test_dtype_comes_from_the_argument_then_the_environment(monkeypatch):
    import torch

    from genevolve.policies.local import pick_dtype

    cpu = torch.device("cpu")
    monkeypatch.delenv("GENEVOLVE_DTYPE", raising=False)
    assert pick_dtype(cpu) is torch.float32
    monkeypatch.setenv("GENEVOLVE_DTYPE", "bfloat16")
    assert pick_dtype(cpu) is torch.bfloat16
    assert pick_dtype(cpu, "float32") is torch.float32
    monkeypatch.setenv("GENEVOLVE_DTYPE", "bf16")
    with pytest.raises(ValueError, match="unknown dtype 'bf16'"):
        pick_dtype(cpu)
