"""Where a bf16 training plan's gradient error comes from, measured on the CPU.

    python benchmarks/bf16_grad_sources.py --layers 10 --seq 256

The Trainer's joint graph of a Gemma-4 E2B cut to --layers layers (transformers'
initialization, as `train.py --works check` draws it) runs on the reference executor in fp32,
with chosen tensors rounded to bf16 where a bf16 GPU plan rounds them; each variant's
gradients are compared with the unrounded run's (relative error per tensor, median and
worst):

- graph, forward / backward: every output of the unoptimized graph's forward (its loss and
  what precedes it) or of its backward rounded (but those held in fp32: the residual
  stream, weight gradients), nothing else;
- products' operands: the inputs of every product, forward and backward, rounded as tensor
  cores read them, nothing else (train.py's floor, here on the graph's own products);
- plan, stored: the extracted GPU plan (H200 profile, the Trainer's memory price), each
  launch's output rounded unless the plan holds it in fp32 (the residual stream, weight
  gradients, the loss), and the products' operands;
- the same with the forward products' outputs held in fp32, then the backward's launches.

An approximation of the plans it names: only the unfused products (matmul, matmul_tn)
get their operands rounded, and "forward products' outputs fp32" holds every forward
product so, a wider set than `plan.wide_products`. The fp32 run itself is checked against
transformers' fp32 autograd first. Memory: the
unrounded gradients and one variant's are held at once (10 layers: about 12 GB).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_forward import hf_fp32_copy, hf_model, shared_weights  # noqa: E402

import meganeura  # noqa: E402
from meganeura.compiler.cost import MEMORY_PRICE  # noqa: E402
from meganeura.compiler.ops import OPS  # noqa: E402
from meganeura.compiler.plan import holds_fp32  # noqa: E402
from meganeura.models.gemma4_text import FULL, PRESET_FIELDS, SLIDING, from_dict  # noqa: E402
from meganeura.pipeline import optimize_graph, setup  # noqa: E402
from meganeura.runtime.reference import _input, _parameter, evaluate  # noqa: E402
from meganeura.training.trainer import IGNORE, shift_labels  # noqa: E402

PRODUCTS = ("matmul", "matmul_tn")


def run(graph, weights, inputs, rounded, operands: bool):
    """The graph's outputs in fp32, each node's output rounded to bf16 where rounded(node),
    the products' operands too when `operands`."""
    users = graph.users()
    left = [len(u) for u in users]
    for o in graph.outputs:
        left[o] += 1
    vals = {}
    for n in graph.nodes:
        if n.op == "parameter":
            v = _parameter(n, weights, torch.float32, None)
        elif n.op == "input":
            v = _input(graph, n, inputs, None)
        else:
            args = [vals[i] for i in n.inputs]
            if operands and n.op in PRODUCTS:
                args = [a.to(torch.bfloat16).float() for a in args]
            v = evaluate(n, *args)
            if v.is_floating_point() and rounded(graph, n):
                v = v.to(torch.bfloat16).float()
            for i in set(n.inputs):
                left[i] -= n.inputs.count(i)
                if left[i] == 0:
                    del vals[i]
        vals[n.id] = v
    return [vals[o] for o in graph.outputs]


def stored(skip=lambda n: False):
    """A plan's launches rounded where the plan stores them in bf16, but those skipped."""
    def rounded(graph, n) -> bool:
        if OPS[n.op].kind in ("leaf", "view", "layout", "constant"):
            return False
        return not holds_fp32(graph, n.id) and not skip(n)
    return rounded


def backward(n) -> bool:
    return (n.block or "").endswith(".grad")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=10,
                    help="a multiple of 5 from 10 (E2B's pattern, K/V shared by its last 4/7)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=None, help="default: E2B's 262144")
    a = ap.parse_args(argv)
    if a.layers % 5 or a.layers < 10:
        ap.error("--layers must be a multiple of 5 from 10")
    fields = dict(PRESET_FIELDS["gemma4_e2b"], num_hidden_layers=a.layers,
                  layer_types=([SLIDING] * 4 + [FULL]) * (a.layers // 5),
                  num_kv_shared_layers=a.layers * 20 // 35)
    if a.vocab:
        fields["vocab_size"] = a.vocab
    cfg = from_dict(fields)
    import transformers

    bf16 = hf_model(transformers.Gemma4TextConfig(**fields), torch.bfloat16, "cpu", seed=0)
    ref = hf_fp32_copy(bf16)
    del bf16
    frozen = lambda n: "embed_tokens" in n  # noqa: E731 (train.py's check)
    weights = dict(shared_weights(ref, cfg))
    trainer = meganeura.Trainer(meganeura.from_config(cfg, weights, "cpu", torch.float32),
                                trainable=lambda n: not frozen(n), executor="reference")
    graph = trainer.graph(a.seq)
    ids = torch.randint(0, cfg.vocab_size, (a.seq,), generator=torch.Generator().manual_seed(2))
    target = shift_labels(ids[None])[0]
    seed = torch.full((a.seq, 1), 1.0 / int((target != IGNORE).sum()))
    inputs = {"token_ids": ids, "labels": target, "d_loss": seed}
    names = trainer.names

    exact = run(graph, weights, inputs, lambda g, n: False, False)[1:]
    for p in ref.parameters():
        p.requires_grad_(False)
    for n in names:
        ref.get_parameter(trainer.checkpoint_name(n)).requires_grad_(True)
    ref(input_ids=ids[None], labels=ids[None], use_cache=False).loss.backward()
    hf = max(((e - ref.get_parameter(trainer.checkpoint_name(n)).grad).norm() /
              ref.get_parameter(trainer.checkpoint_name(n)).grad.norm()).item()
             for n, e in zip(names, exact))
    print(f"E2B cut to {a.layers} layers, seq {a.seq}, {len(names)} trained tensors; fp32 "
          f"graph against transformers' fp32 autograd: worst {hf:.1e}", flush=True)
    del ref

    s = dataclasses.replace(setup("cuda", torch.bfloat16, profile="h200", run=False),
                            memory_price=MEMORY_PRICE)
    plan = optimize_graph(graph, s)[0].graph
    loss = graph.outputs[0]
    variants = [
        ("graph, every forward node's output (nothing else)", graph,
         lambda g, n: n.id <= loss and stored()(g, n)),
        ("graph, every backward node's output (nothing else)", graph,
         lambda g, n: n.id > loss and stored()(g, n)),
        ("products' operands", graph, lambda g, n: False),
        ("plan, stored", plan, stored()),
        ("plan, stored, forward products' outputs fp32", plan,
         stored(lambda n: n.op in PRODUCTS and not backward(n))),
        ("plan, stored, forward products' outputs and backward fp32", plan,
         stored(lambda n: backward(n) or n.op in PRODUCTS)),
    ]
    for what, g, rounded in variants:
        out = run(g, weights, inputs, rounded, not what.startswith("graph,"))[1:]
        errors = {n: ((o - e).norm() / e.norm()).item() for n, o, e in zip(names, out, exact)}
        worst = max(errors, key=errors.get)
        print(f"{what}: median {statistics.median(errors.values()):.2e}, worst "
              f"{errors[worst]:.2e} ({trainer.checkpoint_name(worst)})", flush=True)
        del out
    return 0


if __name__ == "__main__":
    sys.exit(main())
