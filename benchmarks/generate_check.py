"""Generation on the GPU, checked step by step against transformers (the published Gemma-4,
Llama, Qwen3).

    python benchmarks/generate_check.py --model gemma4-e4b --prompt-len 1000 --steps 64
    python benchmarks/generate_check.py --model llama-3.1-8b

transformers' model is built on the device in bf16 with random weights (`hf_forward.py`)
and meganeura generates greedily from a random prompt reading the very same tensors. Each
step's logits are then compared with transformers' fp32 model (the same weights upcast)
run once over the prompt and the generated tokens: row t of that forward is the logits
the step that produced token t + 1 must give. Prints the worst and median relative error
(bound 2e-2), the time to first token and the decode rate; writes a CSV row.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_forward import (has_transformers, hf_config, hf_fp32_copy, hf_logits,  # noqa: E402
                        hf_model, shared_weights)
from prefill import environment  # noqa: E402

import meganeura  # noqa: E402
from meganeura.inference.generation import SamplingParams  # noqa: E402
from meganeura.models import MODEL_NAMES, PRESETS  # noqa: E402
from meganeura.runtime.check import TOLERANCE, relative_error  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def step_errors(model, hf, prompt: torch.Tensor, steps: int, device) -> tuple[list, dict]:
    """meganeura generates `steps` greedy tokens after `prompt`; each step's logits against
    row t of transformers' fp32 model (the same weights upcast) run once over the prompt and
    the generated tokens. (relative error per step, the generation's stats)."""
    logits: list[torch.Tensor] = []
    t = time.perf_counter()
    out = model.generator.generate(prompt, steps, SamplingParams(), stop=[],
                                   on_logits=lambda x: logits.append(x.float().clone()))
    stats = dict(model.generator.last_stats, first_call_s=time.perf_counter() - t)
    ref_model = hf_fp32_copy(hf)
    full = hf_logits(ref_model, out[:-1].to(device)).float()
    del ref_model
    return [relative_error(s, full[prompt.numel() - 1 + k]) for k, s in enumerate(logits)], stats


def main(argv=None) -> int:
    names = sorted(n for n, key in MODEL_NAMES.items() if has_transformers(PRESETS[key]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma4-e4b", choices=names)
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", default=str(RESULTS / "generate.csv"))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: fp32 through Triton's interpreter (to check the script itself)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = PRESETS[MODEL_NAMES[args.model]]
    hf = hf_model(hf_config(cfg, MODEL_NAMES[args.model]), dtype, device, args.seed)
    model = meganeura.from_config(cfg, shared_weights(hf, cfg), device, dtype)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=gen)
    errs, st = step_errors(model, hf, prompt, args.steps, device)
    # a second run with the plans compiled: the steady decode rate
    model.generator.generate(prompt, args.steps, SamplingParams(), stop=[])
    warm = dict(model.generator.last_stats)
    env = environment()
    rate = (warm["new_tokens"] - 1) / warm["decode_s"]
    row = {**env, "model": args.model, "prompt_len": args.prompt_len, "steps": len(errs),
           "max_rel_error": max(errs), "median_rel_error": statistics.median(errs),
           "plans_s": st["plans_s"], "first_call_s": st["first_call_s"],
           "ttft_ms": warm["time_to_first_token_s"] * 1e3,
           "decode_ms_per_token": 1e3 / rate, "decode_tokens_per_s": rate}
    bound = TOLERANCE["bf16" if dtype == torch.bfloat16 else "fp32"]
    ok = max(errs) <= bound
    print(f"# generation check {env}")
    print(f"{args.model}: {len(errs)} greedy steps from a {args.prompt_len}-token prompt; "
          f"step logits vs transformers' fp32 forward: max {max(errs):.2e}, median "
          f"{statistics.median(errs):.2e} ({'ok' if ok else 'FAIL'}, bound {bound})")
    print(f"plans compiled in {st['plans_s']:.1f} s; warm: time to first token "
          f"{row['ttft_ms']:.1f} ms, decode {row['decode_ms_per_token']:.2f} ms/token "
          f"({rate:.1f} tokens/s)")
    print("worst steps: " + ", ".join(f"{k}: {e:.2e}" for k, e in sorted(
        enumerate(errs), key=lambda x: -x[1])[:5]))
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
