"""SFT under ``accelerate launch``: the assistant-only loss of :mod:`genevolve.training.sft`, data-parallel.

A worked example of multi-process training (DDP; FSDP with an accelerate config, see
``docs/scale-out.md``). Each process reads the same ``{"messages"}`` JSONL, takes its shard of the
conversations, and accelerate averages gradients, so every replica takes the same step. At the end
every process reports a checksum of its weights; the main process checks they agree and saves the
model and ``result.json``.

    accelerate launch --cpu --num_processes 2 -m genevolve.training.accelerate_sft \\
        --model assets/policy/tiny --data sft.jsonl --out runs/ddp-sft --max-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> dict:
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..policies.local import encode_conversation
    from .sft import assistant_loss

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder to fine-tune")
    ap.add_argument("--data", required=True, help="JSONL of {'messages': [...]} rows")
    ap.add_argument("--out", required=True, help="folder for the model and result.json")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    ap.add_argument("--batch-size", type=int, default=2, help="conversations per process per step")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    acc = Accelerator()
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = [json.loads(line)["messages"] for line in Path(args.data).read_text("utf-8").splitlines() if line.strip()]
    examples = []
    for msgs in rows:
        ids, mask = encode_conversation(tok, msgs)
        if sum(mask[: args.max_len]):
            examples.append((ids[: args.max_len], mask[: args.max_len]))
    if len(examples) < acc.num_processes * args.batch_size:
        raise ValueError(f"{len(examples)} usable conversations for {acc.num_processes} processes x {args.batch_size}")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def collate(batch):
        n = max(len(x) for x, _ in batch)
        ids = torch.full((len(batch), n), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), n))
        attn = torch.zeros((len(batch), n), dtype=torch.long)
        for r, (x, m) in enumerate(batch):
            ids[r, : len(x)], mask[r, : len(m)], attn[r, : len(x)] = torch.tensor(x), torch.tensor(m, dtype=torch.float32), 1
        return ids, mask, attn

    loader = torch.utils.data.DataLoader(examples, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(args.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, opt, loader = acc.prepare(model, opt, loader)  # DDP (or FSDP) wrapping and per-process shards
    model.train()
    step, losses = 0, []
    for _ in range(args.epochs):
        for ids, mask, attn in loader:
            loss = assistant_loss(model(input_ids=ids, attention_mask=attn).logits, ids, mask)
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(acc.reduce(loss.detach(), reduction="mean")))
            if acc.is_main_process:
                print(f"step {step} loss {losses[-1]:.4f} ({acc.num_processes} processes)", flush=True)
            if args.max_steps and step >= args.max_steps:
                break
        if args.max_steps and step >= args.max_steps:
            break
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in acc.unwrap_model(model).parameters()]).sum()
    sums = acc.gather(checksum.reshape(1).to(acc.device)).tolist()
    result = {"world_size": acc.num_processes, "steps": step, "losses": losses, "param_checksums": sums,
              "replicas_in_sync": max(sums) - min(sums) <= 1e-6 * max(1.0, abs(sums[0])),
              "backend": str(getattr(acc.state, "backend", "")), "distributed_type": str(acc.distributed_type)}
    if acc.is_main_process:
        out = Path(args.out)
        acc.unwrap_model(model).save_pretrained(out)
        tok.save_pretrained(out)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
    acc.wait_for_everyone()
    acc.end_training()
    return result


if __name__ == "__main__":
    main()
