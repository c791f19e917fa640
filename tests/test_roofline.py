"""The roofline's arithmetic (benchmarks/roofline.py) and the llama.cpp peer's client (benchmarks/peers_llamacpp.py),
without timing anything: what one decode step must read and compute, and how the peer is driven turn by turn."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import roofline  # noqa: E402

SHAPE = {"hidden": 8, "intermediate": 24, "layers": 3, "heads": 4, "kv_heads": 2, "head_dim": 2, "vocab": 50,
         "projections": [(8, 8), (8, 4), (8, 8), (8, 24), (24, 8), (8, 50)]}
SHAPE["matmul_params"] = SHAPE["layers"] * (8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 24) + 50 * 8


def test_a_step_at_one_rate_costs_its_multiplications_over_that_rate():
    """Every product of a step counted once (k and v, gate and up twice; the output layer once per step)."""
    for rows in (1, 8):
        rates = [{"m": rows, "k": k, "n": n, "flops_per_s": 1e9} for k, n in SHAPE["projections"]]
        assert roofline.shape_time(SHAPE, rows, rates) == pytest.approx(2 * rows * SHAPE["matmul_params"] / 1e9)


def test_few_rows_are_bound_by_memory_and_many_by_compute():
    one = roofline.decode_bound(SHAPE, 1, 0, 2, bw=1e9, peak=1e12)
    many = roofline.decode_bound(SHAPE, 10_000, 0, 2, bw=1e9, peak=1e12)
    assert one["bound"] == "memory" and many["bound"] == "compute"
    assert one["tokens_per_s"] == pytest.approx(1 / (SHAPE["matmul_params"] * 2 / 1e9))
    longer = roofline.decode_bound(SHAPE, 1, 100, 2, bw=1e9, peak=1e12)  # the rows' keys and values are read too
    assert longer["bytes"] == one["bytes"] + 100 * 3 * 2 * 2 * 2 * 2


def test_the_llama_cpp_client_runs_each_conversation_turn_by_turn():
    import peers_llamacpp as pl

    from genevolve.policies.base import SamplingParams

    class Server:
        def __init__(self):
            self.bodies = []

        def complete(self, body):
            self.bodies.append(body)
            return {"content": "ok", "tokens": [5, 6], "stop_type": "eos" if len(body["prompt"]) < 4 else "limit"}

    class Local:
        class tokenizer:  # noqa: N801
            @staticmethod
            def apply_chat_template(msgs, tokenize=False, add_generation_prompt=True):
                return " ".join(m["content"] for m in msgs)

            def __call__(self, text, add_special_tokens=False):
                return {"input_ids": [len(w) for w in text.split()]}

        tokenizer = tokenizer()

    server = Server()
    pol = pl.LlamaCppPolicy(server, Local(), eot=2)
    convs = {0: [{"role": "user", "content": "a"}], 1: [{"role": "user", "content": "bb cc"}]}
    turns = {0: [], 1: []}

    def next_messages(i):
        return None if len(turns[i]) == 2 else convs[i] + [{"role": "assistant", "content": "x"}] * len(turns[i])

    pol.run_conversations(2, next_messages, lambda i, c: turns[i].append(c), SamplingParams(max_new_tokens=7, seed=3),
                          max_batch=2, seeds=[10, 11])
    assert [len(t) for t in turns.values()] == [2, 2]
    first = turns[0][0]
    assert first.finish_reason == "stop" and first.token_ids == [5, 6, 2]  # the end-of-turn token counted
    assert all(b["n_predict"] == 7 and b["top_k"] == 0 and b["min_p"] == 0.0 and b["n_probs"] == 1 for b in server.bodies)
    assert sorted(b["seed"] for b in server.bodies) == [10000, 10001, 11000, 11001]
