"""Every bf16 kernel of a real plan compiles for sm_90 (Hopper) within its shared memory.

Triton lowers to PTX and ptxas assembles it here, without a GPU: a tile, stage count or
kernel structure that asks more shared memory than an H200 block has is caught in CI.
The check runs in its own process: the tests' process has Triton's interpreter on.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_prefill_kernels_fit_an_sm90_block():
    # 12b's plan: 128- and 256-wide product tiles, gate | up and q | k | v read in place,
    # head_dim 240 padded to 256 in both attentions (4b's plan adds six kernels of the same
    # archetypes at smaller tiles, and 16 s on the CPU)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "compile_check.py"), "--model",
                          "gemma4-12b", "--seq-len", "2048"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if " smem " in line]
    kinds = {line.split()[0] for line in lines}
    assert kinds == {"embedding", "rowwise", "matmul", "attention"}
    assert not any("OVER SHARED MEMORY" in line for line in lines)
    assert not any("local-mem True" in line for line in lines), "a kernel spills"
    matmuls = [line for line in lines if line.startswith("matmul")]
    assert all(" wgmma   0 " not in line for line in matmuls)  # Hopper's warpgroup MMA
    assert any("2-part-B" in line for line in matmuls)  # gate | up read in place
    # q | k | v read in place too (12b: 128-wide tiles, which its parts take): the three K
    # loops share one set of stage buffers
    assert any("3-part-B" in line for line in matmuls)


# stage chains whose kernels run their stages in two scopes (a one-row product's tile and
# its row's last-tile pass): Triton keeps one type a name across a branch or loop, which the
# interpreter does not check
TWO_SCOPES = ["rms_norm|rms_norm,add", "rms_norm|glu.pair-silu,rms_norm,add",
              "|softcap,rms_norm,glu@1-silu,softcap,scale_by"]

SCRIPT = """
import sys, torch
sys.path[:0] = [{tests!r}, {tools!r}]
from compile_check import compile_launches
from kernel_cases import product_case
from meganeura.codegen import Target
for name in {cases!r}:
    g, _, _ = product_case(name, 1, 512, 512, transposed=True)
    out = compile_launches(g, [g.outputs[0]], Target(torch.device("cuda"), torch.bfloat16, sms=132))
    print(name, [r["local_memory"] for r in out])
"""


def test_stages_in_two_scopes_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    script = SCRIPT.format(tests=str(ROOT / "tests"), tools=str(ROOT / "tools"),
                           cases=TWO_SCOPES)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert [line.split()[0] for line in run.stdout.splitlines()] == TWO_SCOPES


BACKWARD = """
import sys, torch
sys.path[:0] = [{tests!r}, {tools!r}]
from compile_check import compile_launches
import kernel_cases as kc
from meganeura.codegen import Target
target = Target(torch.device("cuda"), torch.bfloat16, sms=132)
cases = {{
    "attention_grad-512": kc.attention_grad_case(64, 8, 1, 512, window=16),
    "attention_grad-256-fp32-dy": kc.attention_grad_case(64, 8, 2, 256, window=16, dy_fp32=True),
    "matmul_tn": kc.product_tn_case(256, 512, 640),
    "matmul_tn-thin": kc.product_tn_case(4096, 10240, 16),
    "embedding_grad": kc.embedding_grad_case(64, 300, 512),
    "linear_cross_entropy_grad_w": kc.linear_loss_case("linear_cross_entropy_grad_w", 64, 256,
                                                       1000, 30.0),
    "linear_cross_entropy_dh": kc.linear_loss_case("linear_cross_entropy_dh", 300, 640, 5000,
                                                   30.0),
}}
for name, (g, _, _) in cases.items():
    out = compile_launches(g, [g.outputs[0]], target)
    print(name, len(out), max(r["shared"] for r in out), any(r["local_memory"] for r in out))
"""


def test_backward_kernels_compile_for_sm90():
    # the training plan's own kernels at Gemma-4's widest heads (e2b's whole plan, 256-wide
    # heads and the norms' gradients included: tools/compile_check.py --train), and
    # attention's gradient of a LoRA plan's fp32 dO (twice the stage room): what the
    # interpreter runs, ptxas must take too, in a block's shared memory
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    script = BACKWARD.format(tests=str(ROOT / "tests"), tools=str(ROOT / "tools"))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = [line.split() for line in run.stdout.splitlines()]
    assert [r[0] for r in rows] == ["attention_grad-512", "attention_grad-256-fp32-dy",
                                    "matmul_tn", "matmul_tn-thin", "embedding_grad",
                                    "linear_cross_entropy_grad_w",
                                    "linear_cross_entropy_dh"]
    assert all(int(r[2]) <= 232448 and r[3] == "False" for r in rows), rows
