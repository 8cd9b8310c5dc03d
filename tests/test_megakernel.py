"""The decode step as one persistent kernel (codegen/megakernel.py) on Triton's interpreter:
the same bits as the plan's own launches, step after step, with one program or with
several whose waits cross programs; and its sm_90 compile."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import meganeura
from configs import CONFIGS
from meganeura.codegen.megakernel import Megakernel, source, task_function, weight_spans
from meganeura.errors import MeganeuraError
from meganeura.models.llama import LlamaConfig
from meganeura.compiler.schedule import build, check, works_of

ROOT = Path(__file__).resolve().parents[1]


def _decode(name, tmp_path, sequences=1):
    model = meganeura.from_config(CONFIGS[name], device="cpu", seed=4, cache_dir=tmp_path)
    gen = model.generator
    s = gen.session(40, sequences)
    step = gen.decode_plan(s)
    g = torch.Generator().manual_seed(6)
    for t in s.caches.values():  # a context's keys and values, fresh and nonzero
        t.normal_(generator=g)
    return model, s, step


def _in_program_order(s, programs):
    """The one-program schedule's list cut into `programs` consecutive runs: the interpreter
    runs program 0 to its end, then 1, ..., so every wait is met by a program before."""
    (order,) = s.lists
    cuts = [round(i * len(order) / programs) for i in range(programs + 1)]
    s.programs, s.lists = programs, [order[a:b] for a, b in zip(cuts, cuts[1:])]
    check(s)
    return s


@pytest.mark.parametrize("name, sequences, programs", [("small_test", 1, 1),
                                                        ("small_test", 1, 3),
                                                        ("gqa2", 1, 2)])
def test_the_megakernel_computes_the_plans_bits(name, sequences, programs, tmp_path):
    model, s, step = _decode(name, tmp_path, sequences)
    sched = build(works_of(step), 1)
    mk = Megakernel(step, _in_program_order(sched, programs))
    assert mk.kernels < len(sched.tasks_of)  # launches of one kernel share its code
    rows = s.sequences
    gen = torch.Generator().manual_seed(8)
    for k in range(3):  # three steps, each from the same caches both ways
        ids = torch.randint(0, CONFIGS[name].vocab_size, (rows,), generator=gen)
        pos = torch.tensor([12 + k + 3 * i for i in range(rows)])
        before = {n: t.clone() for n, t in s.caches.items()}
        want = step(ids, pos).clone()
        after = {n: t.clone() for n, t in s.caches.items()}
        for n, t in s.caches.items():
            t.copy_(before[n])
        step.outputs[0].fill_(float("nan"))
        step.load_inputs(ids, pos)
        mk.run()
        assert torch.equal(step.outputs[0], want)
        assert all(torch.equal(s.caches[n], after[n]) for n in s.caches)
        assert mk.counters.tolist() == sched.tasks_of  # every task counted once


def test_a_kernel_becomes_a_task_of_a_program_range(tmp_path):
    _, _, step = _decode("small_test", tmp_path)
    spec = next(sp for launch in step.launches for sp in launch.spec.chain()
                if "program_id(1)" in sp.source)
    src, runtime, consts = task_function(spec, "task_9")
    assert src.startswith("@triton.jit\ndef task_9(") and "tl.program_id" not in src
    assert src.count("_wait_(") >= 1 and "gdc_" not in src  # the task's wait, in the gate's place
    assert "pid_1_" in src and set(consts) == set(spec.constexprs)
    assert len(runtime) == len(spec.args)


def test_the_megakernel_compiles_for_sm90(tmp_path):
    _, _, step = _decode("small_test", tmp_path)
    mk = Megakernel(step, build(works_of(step), 1))  # (the source is the same for any P)
    path = tmp_path / "megakernel.py"
    path.write_text(mk.source)
    # the instrumented build (the GPU's timer), its tasks asking L2 for their weights first
    timed = tmp_path / "megakernel_timed.py"
    timed.write_text(source(mk.kinds, mk.width, timed=True, prefetch=True))
    assert "cp.async.bulk.prefetch.L2" in timed.read_text()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "compile_check.py"),
                          "--megakernel", str(path)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    line = run.stdout.strip().splitlines()[-1]
    # the waits are acquire reads at the GPU's scope, the counts release adds; nothing spills
    assert "local-mem False" in line and "acquire 0" not in line and "release 0" not in line
    # the table's arguments carry the alignment and unit strides a launch's specialization
    # would: loads of 8 and 16 bytes (without them, e4b's step had none among 2508 loads)
    wide = int(line.split("(")[1].split(" of 8 or 16 bytes")[0])
    assert wide > 0, line
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "compile_check.py"),
                          "--megakernel", str(timed)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "local-mem False" in run.stdout, run.stdout + run.stderr


@pytest.mark.parametrize("programs", [1, 3, 7])
def test_the_tasks_weight_spans_cover_each_weight_once(programs, tmp_path):
    # what the tasks of a launch ask L2 for (unbounded) are the weights its kernel streams,
    # each byte once: the spans of its tasks are disjoint and their union is the weights'
    # (a Llama: weights stored [N, K], as checkpoints hold them, stream as whole rows)
    config = LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16)
    model = meganeura.from_config(config, device="cpu", seed=4, cache_dir=tmp_path)
    step = model.generator.decode_plan(model.generator.session(40, 1))
    specs = [sp for launch in step.launches for sp in launch.spec.chain()]
    sched = build(works_of(step), programs)
    streamed = 0
    for j, spec in enumerate(specs):
        spans = sorted(sp for t in sched.tasks if t.launch == j
                       for sp in weight_spans(spec, step.tensors, t.first, t.count, 1 << 40))
        if spec.streams is None:
            assert not spans
            continue
        streamed += 1
        weights = {spec.args[arg][1] for arg, *_ in spec.streams[1]}
        extents = sorted((step.tensors[w].data_ptr(),
                          step.tensors[w].data_ptr() + step.tensors[w].numel() *
                          step.tensors[w].element_size()) for w in weights)
        merged = []
        for lo, n in spans:
            assert lo % 16 == 0 and n % 16 == 0 and n > 0
            if merged and merged[-1][1] == lo:
                merged[-1][1] = lo + n
            else:
                assert not merged or merged[-1][1] < lo, "spans overlap"
                merged.append([lo, lo + n])
        assert [tuple(m) for m in merged] == extents or \
            [(extents[0][0], extents[-1][1])] == [tuple(m) for m in merged]
        # a budget bounds what a task asks for
        t = next(t for t in sched.tasks if t.launch == j)
        assert sum(n for _, n in weight_spans(spec, step.tensors, t.first, t.count, 4096)) <= 4096
    assert streamed >= 4  # the layers' products stream their weights


def test_the_timed_build_is_for_cuda(tmp_path):
    _, _, step = _decode("small_test", tmp_path)
    with pytest.raises(MeganeuraError, match="CUDA only"):
        Megakernel(step, build(works_of(step), 1), timed=True)


def test_a_schedule_the_interpreter_cannot_run_is_refused(tmp_path):
    # programs balanced by time wait across programs in both directions: on the
    # interpreter (one program after another) the first would spin for ever
    _, _, step = _decode("small_test", tmp_path)
    sched = build(works_of(step), 3)
    with pytest.raises(MeganeuraError, match="interpreter cannot run"):
        Megakernel(step, sched)


def test_generation_with_the_decode_step_as_one_persistent_kernel(tmp_path):
    # the same greedy tokens as with the step's launches; the session's step runs the
    # megakernel (one program: the interpreter runs programs one after another)
    c = CONFIGS["gqa2"]
    prompt = torch.randint(0, c.vocab_size, (9,), generator=torch.Generator().manual_seed(2))
    plain = meganeura.from_config(c, device="cpu", seed=5, cache_dir=tmp_path)
    want = plain.generate(prompt, max_new_tokens=6, stop=[])
    mine = meganeura.from_config(c, device="cpu", seed=5, cache_dir=tmp_path)
    mine.generator.megakernel = 0
    got = mine.generate(prompt, max_new_tokens=6, stop=[])
    step = mine.generator.last_session.decode
    assert step.persistent is not None and step.persistent.schedule.programs == 1
    assert got.tolist() == want.tolist()
