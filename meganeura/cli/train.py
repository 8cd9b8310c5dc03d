"""`python -m meganeura train`: fine-tune a checkpoint on a text file.

The text (a .txt file: one document; a .jsonl file: a "text" field a line, a document
each) is tokenized with the checkpoint's tokenizer.json, each document ended by the
end-of-sequence id, and packed into sequences of --seq-len tokens (the last partial one
dropped); steps take --batch sequences in order, going round the data as often as
--steps asks. Each step prints a progress line (step, loss, tokens/s); at the end the
loss curve (loss.csv, and loss.png where matplotlib is installed) and the checkpoint
(LoRA merged into the weights) are written to --out.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import torch

from ..errors import MeganeuraError


def read_documents(path: Path) -> list[str]:
    """The documents of a .txt file (the whole file) or a .jsonl file ("text" a line)."""
    from ..models.weights import regular_file

    regular_file(path, "--data")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MeganeuraError(f"--data {path} is not UTF-8 text") from None
    if path.suffix != ".jsonl":
        return [text] if text.strip() else []
    docs = []
    for k, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MeganeuraError(f"--data {path}:{k}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise MeganeuraError(f"--data {path}:{k}: a JSON object with a \"text\" string is "
                                 f"expected")
        docs.append(row["text"])
    return docs


def pack(docs: list[list[int]], seq_len: int, eos: int | None) -> torch.Tensor:
    """The documents' ids end to end (each followed by eos when there is one), cut into
    [n, seq_len] rows; the partial last row is dropped."""
    stream = []
    for ids in docs:
        stream += ids + ([eos] if eos is not None else [])
    n = len(stream) // seq_len
    if n == 0:
        raise MeganeuraError(f"--data holds {len(stream)} tokens, fewer than one sequence of "
                             f"--seq-len {seq_len}")
    return torch.tensor(stream[:n * seq_len], dtype=torch.int64).view(n, seq_len)


def cmd_train(args) -> int:
    from ..models.checkpoint import probe
    from ..training import LoRA, Trainer
    from .commands import _load_model, _tokenizer, resolve_model

    out = Path(args.out)
    kind = probe(out, "--out")
    if kind == "file" or (kind == "dir" and any(out.iterdir()) and not args.overwrite):
        raise MeganeuraError(f"--out {out} is not an empty directory: pass --overwrite to "
                             f"replace what it holds")
    config, name, ck = resolve_model(args)
    if ck is not None and ck.layout == "gemma4":
        raise MeganeuraError("a multimodal Gemma-4 checkpoint's text decoder cannot be saved "
                             "alone yet, so it is not trained: use a gemma4_text checkpoint")
    tokenizer = _tokenizer(args, ck)
    if tokenizer is None:
        raise MeganeuraError("train needs a tokenizer: a --weights directory holding "
                             "tokenizer.json, or --tokenizer FILE")
    docs = read_documents(Path(args.data))
    if not docs:
        raise MeganeuraError(f"--data {args.data} holds no text")
    eos = ck.eos_token_ids[0] if ck is not None and ck.eos_token_ids else None
    data = pack([tokenizer.encode(d).ids for d in docs], args.seq_len, eos)
    vocab = config.vocab_size
    if int(data.max()) >= vocab:
        raise MeganeuraError(f"the tokenizer gives id {int(data.max())}, outside the model's "
                             f"vocabulary of {vocab}")
    print(f"data: {len(docs)} document(s), {data.numel()} tokens in {data.shape[0]} sequences "
          f"of {args.seq_len}")
    model = _load_model(args, config, name, ck, [], 0, train=True)
    lora = None
    if args.lora_rank:
        lora = LoRA(args.lora_rank, args.lora_alpha or 2.0 * args.lora_rank,
                    tuple(args.lora_targets.split(",")))
    trainer = Trainer(model, lr=args.lr, weight_decay=args.weight_decay, lora=lora,
                      grad_clip=args.grad_clip, seed=args.seed, executor=args.executor)
    trained = sum(model.weights[n].numel() for n in trainer.names)
    print(f"training {trained:,} weights ({len(trainer.names)} tensors"
          + (f", LoRA rank {lora.rank} alpha {lora.alpha:g} on {', '.join(lora.targets)})"
             if lora else ")") + f", {args.steps} steps of {args.batch} x {args.seq_len} tokens")
    rows = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        at = ((step - 1) * args.batch + torch.arange(args.batch)) % data.shape[0]
        t = time.perf_counter()
        loss = trainer.step(data[at])
        dt = time.perf_counter() - t
        rows.append((step, loss, args.batch * args.seq_len, dt))
        rate = args.batch * args.seq_len / dt
        end = "\n" if step == args.steps or not sys.stdout.isatty() else ""
        print(f"\rstep {step}/{args.steps}  loss {loss:.4f}  {rate:,.0f} tokens/s", end=end,
              flush=True)
    total = time.perf_counter() - t0
    model.save_pretrained(out, overwrite=True)
    curve = out / "loss.csv"
    with curve.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "tokens", "seconds"])
        w.writerows((s, f"{l:.6f}", n, f"{d:.4f}") for s, l, n, d in rows)
    png = plot_curve(rows, out / "loss.png")
    print(f"done in {total:.1f} s: loss {rows[0][1]:.4f} -> {rows[-1][1]:.4f}; checkpoint "
          f"{out}" + (" (LoRA merged)" if lora else "") + f"; curve {curve}"
          + (f" and {png}" if png else " (no loss.png: matplotlib is not installed)"))
    return 0


def plot_curve(rows: list, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r[0] for r in rows], [r[1] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
