"""The buffer arena of a model's training plan, with and without fp32_products (no GPU).

    python tools/train_arena.py --model gemma4-e2b --seq-len 2048
    python tools/train_arena.py --model gemma4-e4b --seq-len 4096 --lora   # benchmarks/train.py's adapters

The Trainer's joint graph (every trained weight but the embeddings) is optimized as for a
GPU (H200 profile, bf16, the Trainer's memory price) and its buffers placed by liveness,
as the run allocates them; once as the Trainer makes it, once with the forward products'
outputs held in fp32 (Trainer(fp32_products=True)).
"""

from __future__ import annotations

import argparse
import math
import sys

from compile_check import train_graph

from meganeura.compiler.cost import MEMORY_PRICE, PROFILES, CostModel
from meganeura.models import MODEL_NAMES, PRESETS, build
from meganeura.pipeline import optimize_graph
from meganeura.runtime.buffers import plan_buffers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma4-e2b", choices=sorted(MODEL_NAMES))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--lora", action="store_true", help="LoRA rank 16 on q, k, v, o, gate, up "
                    "and down (only the adapters trained), as benchmarks/train.py's e4b-lora")
    ap.add_argument("--recompute-products", action="store_true",
                    help="Trainer(recompute_products=True): a GLU's gate and up computed again "
                    "in the backward")
    a = ap.parse_args(argv)
    cfg = PRESETS[MODEL_NAMES[a.model]]
    if a.lora:
        from meganeura.training.trainer import LoRA, training_graph, with_lora

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        g, shapes = with_lora(build(cfg, a.seq_len), LoRA(16, 32.0, targets))
        graph = training_graph(g, list(shapes), cfg, a.recompute_products)
    else:
        graph = train_graph(cfg, build(cfg, a.seq_len), a.recompute_products)
    for on in (False, True):
        plan, _ = optimize_graph(graph, CostModel(PROFILES["h200"], "bf16", MEMORY_PRICE, on))
        arena = plan_buffers(plan, 2, inputs=True).total
        g = plan.graph
        wide = sum(math.prod(g[i].shape) for i in g.wide) * 2
        print(f"{a.model} seq {a.seq_len}, fp32_products={on}: arena {arena / 2**30:.3f} GiB; "
              f"{len(g.wide)} products held in fp32 ({wide / 2**30:.3f} GiB more than in bf16, "
              f"all at once)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
