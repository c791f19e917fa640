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
    # The folder records its recipe: the command again, and how many conversations carried a guide.
    convs = [json.loads(line)["messages"] for line in small_data.read_text().splitlines()]
    guided = sum(any("Current-Task Decision Guide" in m["content"] for m in c if m["role"] == "system") for c in convs)
    assert 0 < guided < len(convs) and res["guided_conversations"] == guided and res["conversations"] == len(convs)
    recipe = (out / "RECIPE.md").read_text()
    assert f"--data {small_data}" in recipe and "--epochs 3" in recipe and "--lr 0.003" in recipe
    assert f"{len(convs)}, of which {guided} carry a decision guide" in recipe
    from genevolve.policies.local import LocalPolicy

    pol = LocalPolicy.load(out)
    assert len(pol.tokenizer) <= 8192 and pol.tokenizer.chat_template


def _crash_at(n: int, real):
    """``model_loss`` that raises on its n-th call, as if the process were killed mid-training."""
    calls = {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("killed mid-training")
        return real(*a, **k)

    return crashing


def test_sft_resumes_after_a_crash(tmp_path, small_data, world, monkeypatch):
    real = sft_mod.model_loss
    crashing = _crash_at(4, real)
    monkeypatch.setattr(sft_mod, "model_loss", crashing)
    with pytest.raises(KeyboardInterrupt, match="killed mid-training"):
        train_sft(_cfg(tmp_path, small_data), world=world, log=lambda _: None, progress=False)
    assert (tmp_path / "model.work" / "checkpoint" / "state.pt").exists() and not (tmp_path / "model").exists()
    monkeypatch.setattr(sft_mod, "model_loss", real)
    logs = []
    res = train_sft(_cfg(tmp_path, small_data), world=world, log=logs.append, progress=False)
    assert any("resumed from step 2" in line for line in logs)
    rows = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, res["steps"] + 1))


def test_a_resume_survives_a_torn_metrics_line_and_refuses_changed_data(tmp_path, small_data, world, monkeypatch):
    real = sft_mod.model_loss
    crashing = _crash_at(4, real)
    data = tmp_path / "data.jsonl"
    data.write_bytes(small_data.read_bytes())
    monkeypatch.setattr(sft_mod, "model_loss", crashing)
    with pytest.raises(KeyboardInterrupt, match="killed mid-training"):
        train_sft(_cfg(tmp_path, data), world=world, log=lambda _: None, progress=False)
    monkeypatch.setattr(sft_mod, "model_loss", real)
    with open(tmp_path / "model.work" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')  # killed in the middle of a line
    changed = data.read_text().splitlines()[:-1]  # the data file edited between the crash and the resume
    data.write_text("\n".join(changed) + "\n")
    with pytest.raises(ValueError, match="data_sha256"):
        train_sft(_cfg(tmp_path, data), world=world, log=lambda _: None, progress=False)
    data.write_bytes(small_data.read_bytes())
    logs = []
    res = train_sft(_cfg(tmp_path, data), world=world, log=logs.append, progress=False)
    assert any("metrics.jsonl:" in line and "torn or broken" in line for line in logs)
    rows = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, res["steps"] + 1))


def test_two_sft_runs_into_one_folder_do_not_mix(tmp_path, small_data, world):
    import subprocess
    import sys

    from genevolve.records.live import RunLockedError, is_running

    work = tmp_path / "model.work"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from genevolve.records.live import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(work)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held" and is_running(work)  # another process is training there
        with pytest.raises(RunLockedError, match="another process"):
            train_sft(_cfg(tmp_path, small_data), world=world, log=lambda _: None, progress=False)
        assert not (work / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_bad_sft_data_is_named(tmp_path, world):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        train_sft(_cfg(tmp_path, bad), world=world, log=lambda _: None, progress=False)
    with pytest.raises(ValueError, match="recipe"):
        SFTConfig(recipe="magic").validate()


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


def test_model_loss_applies_the_head_only_where_the_mask_counts(tmp_path, tiny_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    ids = torch.randint(5, 400, (2, 9))
    mask = torch.zeros(2, 9)
    mask[0, 3:6], mask[1, 5:] = 1, 1
    attn = torch.ones_like(ids)
    with torch.no_grad():
        want = assistant_loss(model(input_ids=ids, attention_mask=attn).logits, ids, mask)
        got = float(sft_mod.model_loss(model, ids, mask, attn))
    assert got == pytest.approx(float(want), rel=1e-5)


def test_guided_fraction_zero_puts_no_guide_anywhere(world):
    from itertools import islice

    from genevolve.agent.protocol import GUIDE_HEADER
    from genevolve.training.sft_data import conversations, expert_trajectories

    def guided_rows(fraction):
        convs = conversations(islice(expert_trajectories(world, guided_fraction=fraction, seed=3), 16))
        return sum(any(GUIDE_HEADER in m["content"] for m in c if m["role"] == "system") for c in convs), convs

    n, convs = guided_rows(0.0)
    assert n == 0 and len(convs) >= 12 and all(c[0]["role"] == "system" for c in convs)
    assert guided_rows(1.0)[0] >= 6  # the check can see a guide: every other row has one at fraction 1
    with pytest.raises(ValueError, match="guided_fraction"):
        SFTConfig(guided_fraction=1.5).validate()


@pytest.fixture(scope="module")
def unguided_data(tmp_path_factory, world):
    from itertools import islice

    from genevolve.training.sft_data import conversations, expert_trajectories

    convs = conversations(islice(expert_trajectories(world, guided_fraction=0.0, seed=0), 8))
    path = tmp_path_factory.mktemp("sft-unguided") / "data.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


KILL_AT_STEP_4 = """
import os, signal, sys
from genevolve.training import sft
from genevolve.training.sft import SFTConfig, train_sft
real, calls = sft.model_loss, []
def dying(*a, **k):
    calls.append(1)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, as with kill -9
    return real(*a, **k)
sft.model_loss = dying
train_sft(SFTConfig(**__import__("json").loads(sys.argv[1])), log=print, progress=False)
"""


def test_model_recipe_resumes_after_kill_9_and_saves_a_policy_folder(tmp_path, tiny_folder, unguided_data):
    """The SmolLM2 recipe's code path (recipe model, no guide, full fine-tuning) on a tiny random student."""
    import subprocess
    import sys
    from dataclasses import asdict

    from genevolve.policies.resolve import resolve_policy

    cfg = SFTConfig(out=str(tmp_path / "student"), recipe="model", model=str(tiny_folder), data=str(unguided_data),
                    guided_fraction=0.0, epochs=3, lr=1e-3, warmup_steps=1, batch_tokens=2048, save_every=2)
    proc = subprocess.run([sys.executable, "-c", KILL_AT_STEP_4, json.dumps(asdict(cfg))], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    work = tmp_path / "student.work"
    assert (work / "checkpoint" / "state.pt").exists() and not (tmp_path / "student").exists()
    assert len((work / "metrics.jsonl").read_text().splitlines()) == 3  # steps 1-3 logged before the kill
    logs = []
    res = train_sft(cfg, log=logs.append, progress=False)
    assert any("resumed from step 2" in line for line in logs)
    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, res["steps"] + 1)) and res["steps"] > 4
    pol = resolve_policy(str(tmp_path / "student"))
    assert pol.tokenizer.chat_template and json.loads((tmp_path / "student" / "sft_config.json").read_text())["guided_fraction"] == 0.0
    # A second run in the same place with other settings is refused instead of mixing two runs.
    other = SFTConfig(**(asdict(cfg) | {"out": str(tmp_path / "again"), "lr": 2e-3}))
    (tmp_path / "again.work").mkdir()
    (tmp_path / "again.work" / "config.json").write_text(json.dumps(asdict(cfg) | {"out": other.out}))
    with pytest.raises(ValueError, match="lr: 0.001 -> 0.002"):
        train_sft(other, log=lambda _: None, progress=False)


def test_lora_sft_saves_a_merged_model_folder(tmp_path, tiny_folder, unguided_data):
    from genevolve.policies.resolve import resolve_policy

    cfg = SFTConfig(out=str(tmp_path / "student"), recipe="model", model=str(tiny_folder), data=str(unguided_data),
                    epochs=1, lr=1e-3, warmup_steps=1, batch_tokens=4096, lora_rank=4)
    train_sft(cfg, log=lambda _: None, progress=False)
    assert (tmp_path / "student" / "config.json").exists() and not (tmp_path / "student" / "adapter_config.json").exists()
    assert resolve_policy(str(tmp_path / "student")).adapters == []
