"""SFT: assistant-only loss, a full tiny run on a few conversations, and resuming after a crash."""

from __future__ import annotations

import json

import pytest
import torch

from genevolve.training import sft as sft_mod
from genevolve.training.sft import SFTConfig, assistant_loss, train_sft


def test_assistant_loss_ignores_masked_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 0]], dtype=torch.float32)
    logp = torch.log_softmax(logits, -1)
    want = -(logp[0, 1, 3] + logp[0, 2, 4]) / 2  # targets at positions 2 and 3
    assert assistant_loss(logits, ids, mask) == pytest.approx(float(want))
    other = logits.clone()
    other[0, 3:, :] += 100.0  # changing logits that predict unmasked tokens changes nothing
    assert assistant_loss(other, ids, mask) == pytest.approx(float(want))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, world):
    from genevolve.training.sft_data import conversations, expert_trajectories

    it = expert_trajectories(world, split="bench", guided_fraction=0.5, seed=0)
    convs = conversations([next(it) for _ in range(6)])
    path = tmp_path_factory.mktemp("sft") / "data.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


def _cfg(tmp_path, data):
    return SFTConfig(out=str(tmp_path / "model"), data=str(data), epochs=3, lr=3e-3, warmup_steps=1,
                     batch_tokens=2048, layers=1, hidden=64, save_every=2, vocab_size=600)


def test_tiny_sft_learns_and_writes_a_loadable_model(tmp_path, small_data, world):
    res = train_sft(_cfg(tmp_path, small_data), world=world, log=lambda _: None, progress=False)
    out = tmp_path / "model"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, res["steps"] + 1))
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert (out / "loss_curve.png").stat().st_size > 1000 and (out / "sft_config.json").exists()
    assert not (tmp_path / "model.work").exists()
    from genevolve.policies.local import LocalPolicy

    pol = LocalPolicy.load(out)
    assert len(pol.tokenizer) <= 8192 and pol.tokenizer.chat_template


def test_sft_resumes_after_a_crash(tmp_path, small_data, world, monkeypatch):
    calls = {"n": 0}
    real = sft_mod.assistant_loss

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed mid-training")
        return real(*a, **k)

    monkeypatch.setattr(sft_mod, "assistant_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_sft(_cfg(tmp_path, small_data), world=world, log=lambda _: None, progress=False)
    assert (tmp_path / "model.work" / "checkpoint" / "state.pt").exists() and not (tmp_path / "model").exists()
    monkeypatch.setattr(sft_mod, "assistant_loss", real)
    logs = []
    res = train_sft(_cfg(tmp_path, small_data), world=world, log=logs.append, progress=False)
    assert any("resumed from step 2" in line for line in logs)
    rows = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, res["steps"] + 1))


def test_bad_sft_data_is_named(tmp_path, world):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        train_sft(_cfg(tmp_path, bad), world=world, log=lambda _: None, progress=False)
    with pytest.raises(ValueError, match="recipe"):
        SFTConfig(recipe="magic").validate()


def test_copy_batch_masks_exactly_the_repeat():
    import random

    ids, mask, attn = sft_mod.copy_batch(list(range(10, 60)), 2, 5, random.Random(0), "cpu", max_words=9)
    n = (ids.shape[1] - 1) // 2
    assert ids.shape[0] == 5 and ids.shape[1] == 2 * n + 1 and bool((ids[:, n] == 2).all())
    assert torch.equal(ids[:, :n], ids[:, n + 1 :])
    assert mask[:, : n + 1].sum() == 0 and bool((mask[:, n + 1 :] == 1).all()) and bool((attn == 1).all())


def test_copy_phase_runs_first_then_mixes_into_every_batch(tmp_path, small_data, world):
    cfg = _cfg(tmp_path, small_data)
    cfg.copy_steps, cfg.copy_mix, cfg.vocab_size = 3, 2, 1200
    res = train_sft(cfg, world=world, log=lambda _: None, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows[:3]] == ["copy"] * 3 and rows[3]["phase"] != "copy"
    assert len(rows) == res["steps"] and all(r["copy_loss"] is not None for r in rows)
    with pytest.raises(ValueError, match="copy_steps"):
        SFTConfig(copy_steps=-1).validate()


def test_extra_requests_are_new_texts_of_every_category_and_reproducible(world):
    from genevolve.training.sft_data import sft_requests

    base = world.split("sft")
    reqs = sft_requests(world, "sft", extra_per_category=3, seed=5)
    extra = reqs[len(base):]
    assert reqs[: len(base)] == base and len(extra) == 3 * 12
    assert {r.category for r in extra} == {r.category for r in base}
    every_split = {r.text for r in world.requests}
    assert not any(r.text in every_split for r in extra)  # never a bench, evolve or sft text
    assert len({r.text for r in extra}) == len(extra) and all(r.split == "sft-extra" for r in extra)
    # each reads back to its own scene, so the expert can act on it
    assert all(world.parse(r.text).scene.to_dict() == r.scene for r in extra)
    again = sft_requests(world, "sft", extra_per_category=3, seed=5)
    assert [r.text for r in again] == [r.text for r in reqs]
    assert [r.text for r in sft_requests(world, "sft", 3, seed=6)][len(base):] != [r.text for r in extra]
