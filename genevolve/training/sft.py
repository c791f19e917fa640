"""Supervised fine-tuning with an assistant-only loss: the cold start of the tiny sandbox policy.

One loop, top to bottom: data -> tokenizer and model -> length-bucketed batches -> AdamW with
warm-up and cosine decay -> loss -> metrics JSONL -> atomic checkpoints (resumable) -> the final
model folder with its config and a loss curve.

A model built from scratch (the tiny recipe) has never read anything, so it first gets
``pretrain_epochs`` of plain language modelling over the same conversations (every token counts:
requests, observations and turns), the way a real policy starts from a pretrained LM. That is
where it learns the sandbox's language. The SFT epochs that follow use the assistant-only loss.

Copying names, years and ids from the request and the observations is the skill a small model
learns last. Trained on the 720 ``sft`` requests alone it learns their texts by heart and restates a
remembered request instead of the one in front of it; ``extra_requests`` adds freshly sampled
requests per category (never the text of any split's request), which leaves copying as the only way
to lower the loss (a synthetic copy task, tried too, taught copying far more slowly on a CPU).

The shipped tiny policy is built in three stages (``make tiny-policy``): from scratch on the sft split
plus 150 extra requests per category; one more assistant-only epoch on a fresh draw (seed 1: other
extra requests, other noise) with three in four requests also guided; and one more on another draw
(seed 2) whose unguided trajectories have blind spots (``--noise blind-spots``: three skills mostly
skipped unless a guide names them; see ``ExpertNoise.blind_spots`` for why)::

    genevolve sft --recipe tiny --out runs/tiny-stage1 --extra-requests 150 --pretrain-epochs 1 --epochs 2
    genevolve sft --recipe model --model runs/tiny-stage1 --out runs/tiny-stage2 --extra-requests 150 \
        --seed 1 --epochs 1 --lr 1e-3 --guided-fraction 0.75
    genevolve sft --recipe model --model runs/tiny-stage2 --out assets/policy/tiny --extra-requests 150 \
        --seed 2 --epochs 1 --lr 1e-3 --guided-fraction 0.75 --noise blind-spots

SmolLM2-135M-Instruct as the student (``make smollm2-policy``): a guide-free cold start, one
assistant-only epoch over the 720 ``sft`` requests with cold-start noise, no guided rows and no
blind-spot mix, so the student has never seen a decision guide before self-evolution::

    genevolve sft --recipe model --model smollm2 --out runs/smollm2-sft --guided-fraction 0 --epochs 1 \
        --lr 1e-4 --warmup-steps 10 --batch-tokens 4096 --max-len 2048 --save-every 10

Full fine-tuning, not LoRA, measured on the 2-core CPU (3 steps each, 4096 padded tokens = about 3,500
real tokens a step, float32): full 64-78 CPU-seconds a step, peak 10.4 GB; LoRA rank 16 on every linear
layer 64-85 CPU-seconds, peak 14.4 GB. LoRA still back-propagates through all 30 layers (only the
weight gradients are saved) and PEFT keeps extra activations, so on a CPU it is no faster and uses more
memory; full fine-tuning also lowers the loss faster (0.71 vs 1.33 after 3 steps at the same lr), and
its output is a plain model folder every ``--policy`` takes. bfloat16 autocast (the CPU has AMX) was
no faster either. The LM head is applied only to the tokens the loss counts (``model_loss``): the
49k-wide logits of every token were a fifth of the compute and gigabytes of memory.

The data are 720 conversations, 513k tokens (148k of them the assistant's; median 666, max 2,039, so
``--max-len 2048`` cuts none), about 150 steps. At 3,500 tokens per 64-78 CPU-seconds the epoch
needs 9,400-11,400 CPU-seconds: about 80-95 minutes on two free cores (plus a minute of data
generation), under the 2-hour budget. The steps were timed while other jobs shared the two cores (the
process got about one: wall time close to CPU time), so a busy machine takes about twice as long; there,
``OMP_NUM_THREADS=1`` also keeps two threads from waiting on each other at every small matrix product.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..records.schema import atomic_write_json, atomic_write_text, finite, replace_dir
from .checkpoint import CheckpointError, failure_reason, read_state, write_state

SFT_KEYS = ("model", "opt", "sched", "step", "rng")


@dataclass
class SFTConfig:
    out: str = "assets/policy/tiny"  # final model folder (replaced atomically at the end)
    recipe: str = "tiny"  # "tiny": new tokenizer + small Llama; "model": fine-tune the model at `model`
    model: str | None = None  # base model folder for recipe "model"
    data: str | None = None  # JSONL of {"messages": [...]}; default: the expert's cold-start data from the world
    epochs: int = 4
    pretrain_epochs: int = 2  # tiny recipe: first learn the sandbox's text with next-token loss on every token
    guided_fraction: float = 0.5  # expert data: share of requests that also get a guide-following trajectory
    extra_requests: int = 0  # expert data: freshly sampled requests per category on top of the sft split
    noise: str = "cold-start"  # expert data: noise of the unguided trajectories (ExpertNoise.named)
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    batch_tokens: int = 8192  # padded tokens per optimizer step
    max_len: int = 2048  # longer conversations are cut (their tail is lost)
    grad_clip: float = 1.0
    weight_decay: float = 0.01
    lora_rank: int = 0  # 0: full fine-tuning; >0: train a LoRA adapter of this rank (merged into the saved model)
    seed: int = 0
    save_every: int = 100  # optimizer steps between checkpoints
    layers: int = 4  # tiny recipe only
    hidden: int = 256  # tiny recipe only
    vocab_size: int = 6000  # tiny recipe only (upper bound; BPE stops earlier on small data)
    device: str | None = None
    dtype: str | None = None
    report_to: str = "none"  # also log every step to 'tensorboard' or 'trackio' (see .tracking)

    def validate(self) -> None:
        from .tracking import check

        check(self.report_to)
        if self.recipe not in ("tiny", "model"):
            raise ValueError("recipe is 'tiny' or 'model'")
        if self.recipe == "model" and not self.model:
            raise ValueError("recipe 'model' needs --model (a model folder)")
        if not 0 <= self.guided_fraction <= 1:
            raise ValueError("guided_fraction must be in [0, 1]")
        if self.pretrain_epochs < 0 or self.extra_requests < 0:
            raise ValueError("pretrain_epochs and extra_requests must be >= 0")
        for name in ("epochs", "batch_tokens", "max_len", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 < self.lr < 1:
            raise ValueError("lr must be in (0, 1)")
        from ..agent.expert import ExpertNoise

        ExpertNoise.named(self.noise)
        if self.vocab_size > 8192:
            raise ValueError("the tiny policy's vocabulary is at most 8192")


def _load_conversations(cfg: SFTConfig, world, log) -> list[list[dict]]:
    if cfg.data:
        rows = []
        with open(cfg.data, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    msgs = rec["messages"]
                    assert isinstance(msgs, list) and all("role" in m and "content" in m for m in msgs)
                except Exception as exc:
                    raise ValueError(f"{cfg.data}:{n}: not an SFT record with a 'messages' list ({exc})") from exc
                rows.append(msgs)
        return rows
    from .sft_data import conversations, expert_trajectories

    log("generating cold-start trajectories with the scripted expert ...")
    from ..agent.expert import ExpertNoise

    return conversations(expert_trajectories(world, seed=cfg.seed, guided_fraction=cfg.guided_fraction,
                                             noise=ExpertNoise.named(cfg.noise), extra_per_category=cfg.extra_requests))


def _batches(examples: list[tuple[list[int], list[int]]], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    batches, cur, cur_max = [], [], 0
    for i in order:
        n = len(examples[i][0])
        if cur and max(cur_max, n) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def _collate(examples, idx, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(examples[i][0]) for i in idx)
    ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), n), dtype=torch.float32)
    attn = torch.zeros((len(idx), n), dtype=torch.long)
    for r, i in enumerate(idx):
        x, m = examples[i]
        ids[r, : len(x)] = torch.tensor(x)
        mask[r, : len(m)] = torch.tensor(m, dtype=torch.float32)
        attn[r, : len(x)] = 1
    return ids.to(device), mask.to(device), attn.to(device)


def assistant_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over tokens whose mask is 1 (the assistant's own tokens)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = mask[:, 1:]
    return -(tgt_logp * m).sum() / m.sum().clamp_min(1.0)


def model_loss(model, ids: torch.Tensor, mask: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """``assistant_loss`` of the model's logits, with the LM head applied only where the mask counts.

    Most tokens of a conversation are not the assistant's, and a 49k-word head over all of them costs a
    fifth of a SmolLM2 step and gigabytes of logits. Models that rescale their logits take the plain path.
    """
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1.0):
        return assistant_loss(model(input_ids=ids, attention_mask=attn).logits, ids, mask)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state
    sel = mask[:, 1:] > 0
    if not sel.any():
        return hidden.sum() * 0.0
    logits = model.get_output_embeddings()(hidden[:, :-1][sel])
    return F.cross_entropy(logits.float(), ids[:, 1:][sel])


def _save_checkpoint(ckpt_dir: Path, model, opt, sched, step: int, epoch: int, cfg: SFTConfig) -> None:
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write_state(tmp / "state.pt", {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                       "step": step, "epoch": epoch, "rng": torch.get_rng_state()})
        atomic_write_json(tmp / "config.json", asdict(cfg))
    except OSError as exc:  # a full disk: the previous checkpoint stays, the command ends in one line
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"run folder {ckpt_dir.parent}: the checkpoint of step {step} could not be written "
                              f"({failure_reason(exc)}); free space and run the same command again to resume") from None
    replace_dir(tmp, ckpt_dir)  # a kill in between leaves the old checkpoint or the new one, never none


def plot_curve(metrics_path: Path, out_png: Path, key: str = "loss", title: str = "SFT loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    xs, ys = [r["step"] for r in rows], [r[key] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(xs, ys, lw=1, alpha=0.4, label=key)
    k = max(1, len(ys) // 30)
    smooth = [sum(ys[max(0, i - k) : i + 1]) / len(ys[max(0, i - k) : i + 1]) for i in range(len(ys))]
    ax.plot(xs, smooth, lw=2, label=f"{key} (moving mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def _data_digest(cfg: SFTConfig) -> str | None:
    """A checksum of the --data file: a resume on a file that changed since would train on the old rows."""
    import hashlib

    if not cfg.data or not Path(cfg.data).is_file():
        return None
    h = hashlib.sha256()
    with open(cfg.data, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _open_work(cfg: SFTConfig, work: Path) -> None:
    """The scratch folder of a run; one that holds a run with other settings or other data raises (resuming
    would mix them)."""
    work.mkdir(parents=True, exist_ok=True)
    free = ("device", "report_to")  # may change on a resume
    same = {k: v for k, v in asdict(cfg).items() if k not in free} | {"data_sha256": _data_digest(cfg)}
    if (work / "config.json").exists():
        old = {k: v for k, v in json.loads((work / "config.json").read_text()).items() if k not in free}
        if old != same:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in same.items() if old.get(k) != v)
            raise ValueError(f"{work} holds a run with other settings ({diff}); run with the same settings to "
                             f"resume, or delete {work} to start over")
    atomic_write_json(work / "config.json", same)


def _conversations(cfg: SFTConfig, work: Path, world, log) -> list[list[dict]]:
    """The training conversations, saved in the work folder so that a resumed run sees the same ones."""
    from ..records.schema import atomic_write_text

    data_path = work / "sft_data.jsonl"
    if data_path.exists():
        return [json.loads(line)["messages"] for line in data_path.read_text("utf-8").splitlines() if line.strip()]
    convs = _load_conversations(cfg, world, log)
    atomic_write_text(data_path, "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in convs))
    return convs


def _tokenizer_and_model(cfg: SFTConfig, work: Path, world, convs, device):
    """The tiny recipe's tokenizer (trained once, saved in the work folder) and fresh model, or a pretrained one."""
    from ..policies.local import pick_dtype

    if cfg.recipe == "tiny":
        from transformers import AutoTokenizer

        from ..policies.tiny import build_tiny_model, train_tokenizer

        if (work / "tokenizer" / "tokenizer.json").exists():
            tok = AutoTokenizer.from_pretrained(work / "tokenizer")
        else:
            corpus = [json.loads(line)["text"] for line in (world.root / "corpus.jsonl").read_text("utf-8").splitlines() if line.strip()]
            tok = train_tokenizer([m["content"] for c in convs for m in c] + corpus, cfg.vocab_size)
            tok.save_pretrained(work / "tokenizer")
        model = build_tiny_model(tok, cfg.seed, cfg.layers, cfg.hidden)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..policies.resolve import model_source

        folder, gguf = model_source(cfg.model)  # "smollm2", "tiny" or a folder (a GGUF one too)
        kw = {"gguf_file": gguf} if gguf else {}
        tok = AutoTokenizer.from_pretrained(folder, **kw)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
        if gguf:  # its weights arrive dequantized to float32: train and save them as a plain model
            model.hf_quantizer = None
            del model.config.quantization_config
    model.to(device=device, dtype=pick_dtype(device, cfg.dtype))
    if cfg.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return tok, model


def _restore(ckpt: Path, metrics_path: Path, model, opt, sched, device, log) -> int:
    """Load the checkpoint (model, optimizer, schedule, RNG; safely, see :func:`.checkpoint.read_state`) and trim
    metrics written after it; the step it holds."""
    from ..records.schema import atomic_write_text

    restart = f"delete {ckpt} to start the SFT again"
    step = 0
    if ckpt.exists() and not (ckpt / "state.pt").exists():
        raise CheckpointError(f"run folder {ckpt.parent}: checkpoint/ has no state.pt: {restart}")
    if (ckpt / "state.pt").exists():
        state = read_state(ckpt / "state.pt", ckpt.parent, device, SFT_KEYS, restart)
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            torch.set_rng_state(state["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
            raise CheckpointError(f"run folder {ckpt.parent}: checkpoint/state.pt does not fit this model "
                                  f"({failure_reason(exc)}): {restart}") from None
        step = int(state["step"])
        log(f"resumed from step {step}")
    if metrics_path.exists():  # drop metric lines written after the checkpoint (and a torn last one): no duplicates
        rows = []
        for n, line in enumerate(metrics_path.read_text("utf-8").splitlines(), 1):
            try:
                if line.strip() and json.loads(line)["step"] <= step:
                    rows.append(line)
            except (ValueError, KeyError, TypeError):
                log(f"{metrics_path}:{n}: a torn or broken metrics line, dropped ({line[:60]!r})")
        atomic_write_text(metrics_path, "".join(r + "\n" for r in rows))
    return step


CLI_FLAGS = ("recipe", "model", "data", "epochs", "pretrain_epochs", "guided_fraction", "noise", "extra_requests", "lr",
             "batch_tokens", "max_len", "warmup_steps", "save_every", "lora_rank", "seed")


def has_guide(conversation: list[dict]) -> bool:
    """Whether a conversation's system prompt carries a decision guide."""
    from ..agent.protocol import split_guide

    first = conversation[0] if conversation else {}
    return first.get("role") == "system" and split_guide(str(first.get("content", "")))[1] is not None


def recipe_text(cfg: SFTConfig, result: dict) -> str:
    """The policy folder's RECIPE.md: the command that trains it again and what its data held (how many
    conversations carry a decision guide, which expert noise the unguided ones have)."""
    import shlex

    flags = []
    for key in CLI_FLAGS:  # every setting `genevolve sft` takes, spelled out (never left to a default that may change)
        value = getattr(cfg, key)
        if value is not None:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    cmd = shlex.join(["genevolve", "sft", "--out", cfg.out, *flags])
    n, guided = result.get("conversations"), result.get("guided_conversations")
    data = (f"the data file {cfg.data}" if cfg.data else
            f"the scripted expert's cold-start data, noise {cfg.noise!r}"
            + (" (three skills mostly skipped unless a guide names them)" if cfg.noise == "blind-spots" else
               " (no skill is skipped more often than another)" if cfg.noise == "cold-start" else "")
            + f", guided fraction {cfg.guided_fraction} (that share of requests also gets a guide-following trajectory)")
    share = f" ({guided / n:.1%})" if n and guided is not None else ""
    return (f"# Recipe\n\n```\n{cmd}\n```\n\n- data: {data}\n- conversations: {n}, of which {guided} carry a decision "
            f"guide{share}\n- recipe {cfg.recipe!r}" + (f" on {cfg.model}" if cfg.model else "")
            + f", {cfg.epochs} epoch(s), lr {cfg.lr}, seed {cfg.seed}\n- every setting: sft_config.json\n")


def _finish(cfg: SFTConfig, out: Path, work: Path, model, tok, result: dict) -> None:
    """The final folder: model, tokenizer, config, metrics and curve, swapped in atomically; the work folder goes."""
    model.eval()
    final_tmp = out.with_name(out.name + ".tmp")
    if final_tmp.exists():
        shutil.rmtree(final_tmp)
    if cfg.lora_rank:  # merged, so the output is a plain model folder that every --policy takes
        model = model.merge_and_unload()
    model.save_pretrained(final_tmp)
    for key in ("local_files_only", "is_local"):  # loading flags picked up by a resumed run: not part of the tokenizer
        tok.init_kwargs.pop(key, None)
    tok.save_pretrained(final_tmp)
    atomic_write_json(final_tmp / "sft_config.json", asdict(cfg))
    atomic_write_text(final_tmp / "RECIPE.md", recipe_text(cfg, result))
    shutil.copy(work / "metrics.jsonl", final_tmp / "metrics.jsonl")
    plot_curve(work / "metrics.jsonl", final_tmp / "loss_curve.png")
    if (work / "tensorboard").is_dir():  # --report-to tensorboard: the event files stay with the model
        shutil.copytree(work / "tensorboard", final_tmp / "tensorboard")
    atomic_write_json(final_tmp / "sft_result.json", result)
    replace_dir(final_tmp, out)
    shutil.rmtree(work)


def train_sft(cfg: SFTConfig, world=None, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run SFT; resume from ``<out>.work/checkpoint`` if a previous run stopped. Returns final metrics."""
    from ..records.live import run_lock

    cfg.validate()
    out = Path(cfg.out)
    work = out.with_name(out.name + ".work")  # scratch: checkpoint, metrics; becomes part of `out` at the end
    with run_lock(work):  # a second `sft --out` on the same folder is refused while this one runs
        return _train_sft_locked(cfg, world, log, progress, out, work)


def _train_sft_locked(cfg: SFTConfig, world, log: Callable[[str], None], progress: bool, out: Path, work: Path) -> dict:
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from ..policies.local import encode_conversation, pick_device

    _open_work(cfg, work)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    if world is None and (cfg.recipe == "tiny" or not cfg.data):
        from ..world import World

        world = World()
    convs = _conversations(cfg, work, world, log)
    tok, model = _tokenizer_and_model(cfg, work, world, convs, device)
    encoded = [(c, *encode_conversation(tok, c)) for c in convs]
    kept = [(c, ids[: cfg.max_len], mask[: cfg.max_len]) for c, ids, mask in encoded if sum(mask[: cfg.max_len])]
    examples = [(ids, mask) for _, ids, mask in kept]
    n_guided = sum(has_guide(c) for c, _, _ in kept)  # counted over the conversations trained on
    n_tokens = sum(len(x) for x, _ in examples)
    log(f"SFT: {len(examples)} conversations, {n_tokens} tokens ({sum(sum(m) for _, m in examples)} assistant), "
        f"vocab {len(tok)}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}")

    rng = random.Random(cfg.seed)
    pre = cfg.pretrain_epochs if cfg.recipe == "tiny" else 0
    epochs_batches = [_batches(examples, cfg.batch_tokens, rng) for _ in range(pre + cfg.epochs)]
    total = sum(len(b) for b in epochs_batches)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, total, num_cycles=0.5 * (1 - cfg.min_lr_ratio))
    metrics_path, ckpt = work / "metrics.jsonl", work / "checkpoint"
    step = _restore(ckpt, metrics_path, model, opt, sched, device, log)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    model.train()
    bar = tqdm(total=total, initial=step, desc="sft", unit="step", disable=not progress)
    flat = [(e, b) for e, batches in enumerate(epochs_batches) for b in batches]
    t_last, loss_val = time.time(), float("nan")
    from dataclasses import asdict

    from .tracking import open_tracker

    tracker = open_tracker(cfg.report_to, work, asdict(cfg), warn=log)
    for e, idx in flat[step:]:
        ids, mask, attn = _collate(examples, idx, pad_id, device)
        phase = "pretrain" if e < pre else "sft"
        loss = model_loss(model, ids, attn.float() if phase == "pretrain" else mask, attn)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        opt.step()
        sched.step()
        step, now, loss_val = step + 1, time.time(), float(loss.detach())
        row = {"step": step, "epoch": e, "phase": phase, "loss": finite(loss_val), "lr": sched.get_last_lr()[0],
               "grad_norm": finite(gnorm), "tokens": int(attn.sum()), "tokens_per_s": float(attn.sum()) / max(now - t_last, 1e-9)}
        t_last = now
        with metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, allow_nan=False) + "\n")
        tracker.log(row, step)
        bar.set_postfix(loss=f"{loss_val:.3f}", epoch=e, phase=phase)
        bar.update(1)
        if step % cfg.save_every == 0 and step < total:
            _save_checkpoint(ckpt, model, opt, sched, step, e, cfg)
    bar.close()
    tracker.finish()
    result = {"steps": step, "final_loss": finite(loss_val), "conversations": len(examples), "tokens": n_tokens,
              "guided_conversations": n_guided}
    _finish(cfg, out, work, model, tok, result)
    log(f"saved {out} (final loss {loss_val:.3f}); curve: {out / 'loss_curve.png'}")
    return result
