"""Bad input gets one clear line, nothing escapes its directory, nothing hangs; and the checks
the other tests lean on (rule soundness, extraction, the tolerance) can catch what they
claim to."""

import dataclasses
import errno
import json
import os
import struct
import threading

import numpy as np
import pytest
import torch

import hf_checkpoints as hf
import meganeura
from configs import CONFIGS, GQA2, SMALL
from egraph_checks import assert_classes_agree, optimum_cost
from meganeura.compiler.cost import CPU_INTERPRETER, H200, H200_ROOFLINE, CostModel
from meganeura.compiler.graph import Graph
from meganeura.errors import ConfigError, GraphError, MeganeuraError, WeightsError
from meganeura.models import build
from meganeura.models.gemma4_text import from_dict
from meganeura.models.kv import Generation
from meganeura.models.weights import load_weights, random_weights, save_random_weights
from meganeura.pipeline import optimize_graph as optimize
from meganeura.runtime.check import ROW_TOLERANCE, TOLERANCE, row_relative_error
from meganeura.runtime.reference import run_reference
from numerics import assert_close
from test_cli import cli


def _one_line_exit_2(rc, out, err, message):
    assert rc == 2, (rc, out[-500:], err[-2000:])
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err


# ---- the library ----------------------------------------------------------------------------


def test_bf16_on_the_cpu_is_refused_not_wrong(tmp_path):
    g, w = build(SMALL, 3), random_weights(SMALL)
    with pytest.raises(MeganeuraError, match="bf16 runs on CUDA only"):
        meganeura.compile(g, w, device="cpu", dtype=torch.bfloat16, cache_dir=tmp_path)
    _one_line_exit_2(*cli("compile", "--dtype", "bf16", "--device", "cpu", "--run"),
                     "bf16 runs on CUDA only")


@pytest.mark.parametrize("weights, message", [
    (None, "weights must be a dict of parameter name -> torch.Tensor, got NoneType"),
    ({**random_weights(SMALL), "lm_head.weight": np.zeros((32, 64))},
     "'lm_head.weight' must be a torch.Tensor, got numpy.ndarray"),
])
def test_bad_weights_arguments(weights, message, tmp_path):
    with pytest.raises(WeightsError, match=message):
        meganeura.compile(build(SMALL, 3), weights, device="cpu", cache_dir=tmp_path)


@pytest.mark.parametrize("kw, message", [
    (dict(device="gpu"), "device must be cuda or cpu, got 'gpu'"),
    (dict(profile="h100"), "unknown profile 'h100'"),
    (dict(profile=3), "profile must be a DeviceProfile"),
])
def test_bad_device_and_profile_arguments(kw, message, tmp_path):
    with pytest.raises(MeganeuraError, match=message):
        meganeura.compile(build(SMALL, 3), random_weights(SMALL), cache_dir=tmp_path, **kw)


def test_a_profile_by_name(tmp_path):
    fn = meganeura.compile(build(SMALL, 3), random_weights(SMALL), device="cpu", profile="h200",
                           cache_dir=tmp_path)
    assert fn.report.profile is H200


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(value, tmp_path):
    w = random_weights(SMALL)
    w["model.layers.2.mlp.up_proj.weight"][3, 5] = value
    with pytest.raises(WeightsError, match="'model.layers.2.mlp.up_proj.weight' holds NaN or inf"):
        meganeura.compile(build(SMALL, 3), w, device="cpu", cache_dir=tmp_path)


def test_one_model_called_from_threads(tmp_path):
    g, w = build(SMALL, 6), random_weights(SMALL, seed=4)
    fn = meganeura.compile(g, w, device="cpu", cache_dir=tmp_path)
    ids = [torch.randint(0, 64, (6,), generator=torch.Generator().manual_seed(k)) for k in range(4)]
    refs = [run_reference(g, w, {"token_ids": x})[0] for x in ids]
    errors = []

    def worker(k):
        for _ in range(2):
            try:
                # the copy is made under the model's lock: a .clone() after the call returns
                # could read the logits of another thread's call
                assert_close(fn(ids[k], copy=True), refs[k], "fp32")
            except Exception as e:  # noqa: BLE001 (collected and failed on below)
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_run_far_beyond_the_device_says_what_it_needs(tmp_path):
    # a model that has the positions (the small preset's 131072 refuses 1e9 tokens at once)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**dataclasses.asdict(SMALL), "max_position_embeddings": 2**31 - 1}))
    rc, out, err = cli("compile", "--config", str(cfg), "--seq-len", "1000000000", "--run")
    _one_line_exit_2(rc, out, err, "of cpu memory for its buffers, tables and inputs")
    assert "GiB is free" in err
    _one_line_exit_2(*cli("compile", "--seq-len", "1000000000", "--run"),
                     "1000000000 tokens: the model has 131072 positions")


# ---- files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/hostname"])
def test_shards_must_lie_inside_the_checkpoint(tmp_path, shard):
    d = tmp_path / "ck"
    d.mkdir()
    save_random_weights(SMALL, tmp_path / "outside.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": shard}}))
    with pytest.raises(WeightsError, match="which is not a file inside"):
        load_weights(d, SMALL)


def test_index_values_must_be_file_names(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": 3}}))
    with pytest.raises(WeightsError, match="weight_map values must be shard file names"):
        load_weights(tmp_path, SMALL)


def test_a_header_error_shows_no_bytes_of_the_file(tmp_path):
    f = tmp_path / "notes.safetensors"
    f.write_bytes(b"secret-token-1234" * 4)
    with pytest.raises(WeightsError) as e:
        load_weights(f, SMALL)
    n = struct.unpack("<Q", b"secret-t")[0]
    assert "corrupt safetensors" in str(e.value) and str(n) not in str(e.value)


def test_a_fifo_is_not_read(tmp_path):
    fifo = tmp_path / "w.safetensors"
    os.mkfifo(fifo)
    rc, out, err = cli("compile", "--weights", str(fifo), timeout=60, subprocess=True)
    _one_line_exit_2(rc, out, err, "is not a regular file")


def test_a_cache_entry_that_is_not_a_file_is_replaced(tmp_path):
    from meganeura.codegen.cache import KernelCache

    cache = KernelCache(tmp_path)
    source = "import triton\n# a kernel source\n"
    cache.path(source).symlink_to("/dev/zero")
    path = cache.store(source)  # read nothing from the device: replaced at once
    assert path.is_file() and not path.is_symlink() and cache.rebuilt == 1
    assert path.read_text().endswith(source)


@pytest.mark.parametrize("args, message", [
    (("compile", "--emit-dir", "FILE"), "exists and is not a directory"),
    (("compile", "--emit-dir", "/proc/meganeura-emit"), "is not writable"),
    (("compile", "--run", "--cache-dir", "/proc/meganeura-kernels"), "cannot be made"),
    (("compile", "--run", "--cache-dir", "FILE/kernels"), "cannot be made: Not a directory"),
    (("compile", "--run", "--cache-dir", "FILE"), "exists and is not a directory"),
    (("compile", "--seed", str(2 ** 64)), "--seed: expected an integer in [0, 2^63)"),
    (("compile", "--run", "--tokens", f"1,{2 ** 64}"), "is not an integer in [0, 2^63)"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "FILE").write_text("")
    args = [str(tmp_path / a) if a.startswith("FILE") else a for a in args]
    rc, out, err = cli(*args)
    _one_line_exit_2(rc, out, err, message)
    assert "weights ready" not in out  # checked before anything was loaded


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe{}", "is not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "is nested too deeply"),
    (json.dumps({**SMALL.__dict__, "hidden_size": 2 ** 70}).encode(),
     "hidden_size must be a positive integer below 2^31"),
    (json.dumps({**SMALL.__dict__, "hidden_size": "32", "head_dim": None}).encode(),
     "hidden_size must be a positive integer"),
])
def test_bad_config_files(tmp_path, content, message):
    f = tmp_path / "c.json"
    f.write_bytes(content)
    _one_line_exit_2(*cli("compile", "--config", str(f)), message)


@pytest.mark.parametrize("value", ["32", 32.0, None])
def test_a_bad_hidden_size_is_named(value):
    d = {k: v for k, v in SMALL.__dict__.items() if k != "head_dim"} | {"hidden_size": value}
    from meganeura.models import config_from_dict

    with pytest.raises(ConfigError, match="config field hidden_size must be a positive integer"):
        config_from_dict(d)


def test_emit_dir_keeps_only_the_last_models_files(tmp_path):
    out = tmp_path / "out"
    assert cli("compile", "--model", "gemma4-4b", "--seq-len", "64", "--emit-dir", str(out))[0] == 0
    first = {p.name for p in (out / "kernels").iterdir()}
    rc, _, err = cli("compile", "--emit-dir", str(out), "--seq-len", "5")
    assert rc == 0, err
    second = {p.name for p in (out / "kernels").iterdir()}
    from meganeura.pipeline import kernel_sources, setup

    plan, _ = optimize(build(SMALL, 5), CostModel(CPU_INTERPRETER, "fp32"))
    cpu = setup("cpu")
    expected = {cpu.kernel_cache().path(s).name for s in kernel_sources(plan, cpu)}
    assert second == expected and first != second
    assert sorted(p.name for p in out.glob("template*.egg")) == [f"template{k}.egg"
                                                                 for k in range(3)]


# ---- long phases --------------------------------------------------------------------------


def test_long_cpu_runs_show_progress_and_big_models_warn(tmp_path, capsys):
    model = hf.text_model("dense", seed=2)
    hf.save(model, tmp_path)
    rc, out, err = cli("compile", "--weights", str(tmp_path), "--run", "--tokens", "1,2,3")
    assert rc == 0, err
    assert "kernels bound:" in out and "running kernels (Triton's interpreter):" in out
    from meganeura.cli.commands import warn_cpu_size
    from meganeura.models import PRESETS

    warn_cpu_size(PRESETS["gemma4_1b"], torch.device("cpu"))
    assert "2,315,537,864 parameters" in capsys.readouterr().out


# ---- graphs the builder accepts compile ----------------------------------------------------


def _runtime_operand_graphs():
    """Fusions whose operands are run-time tensors, not weights."""
    g1 = Graph()  # matmul(rms_norm(x, w), y): y and the norm weight given at run time
    x, y = g1.input_f32("x", (7, 24)), g1.input_f32("y", (24, 10))
    g1.set_outputs([g1.matmul(g1.rms_norm(x, g1.input_f32("w", (24,)), 1e-6), y)])
    g2 = Graph()  # swiglu(h @ a, h @ b) with a, b run-time
    h, a, b = (g2.input_f32(n, s) for n, s in (("h", (5, 12)), ("a", (12, 9)), ("b", (12, 9))))
    g2.set_outputs([g2.swiglu(g2.matmul(h, a), g2.matmul(h, b))])
    g3 = Graph()  # q | k merge candidates with one weight run-time
    h3, wq = g3.input_f32("h", (5, 16)), g3.parameter("wq", (16, 8))
    wk = g3.input_f32("wk", (16, 8))
    g3.set_outputs([g3.add(g3.matmul(h3, wq), g3.matmul(h3, wk))])
    return [g1, g2, g3]


@pytest.mark.parametrize("k", range(3))
def test_fusions_over_runtime_operands_compile(k, tmp_path):
    g = _runtime_operand_graphs()[k]
    gen = torch.Generator().manual_seed(k)
    weights = {n.name: torch.randn(n.shape, generator=gen) for n in g.parameters()}
    inputs = {n.name: torch.randn(n.shape, generator=gen) for n in g.inputs()}
    for profile in (CPU_INTERPRETER, H200_ROOFLINE):
        fn = meganeura.compile(g, weights, device="cpu", profile=profile, cache_dir=tmp_path)
        (ref,) = run_reference(g, weights, inputs)
        assert_close(fn(*(inputs[n.name] for n in g.inputs())), ref, "fp32")


def _random_graph(seed: int) -> Graph:
    """A random sequence of builder ops over [rows, width] tensors: run-time and parameter
    operands, norms with either kind of weight, gated products, scales, soft-caps."""
    gen = torch.Generator().manual_seed(seed)

    def pick(n):
        return int(torch.randint(0, n, (1,), generator=gen))

    rows, width = 3 + pick(9), 8 * (1 + pick(4))
    g = Graph()
    live = [g.input_f32("x0", (rows, width))]
    for k in range(6 + pick(6)):
        x = live[pick(len(live))]
        kind = pick(8)
        name = f"t{k}"
        if kind == 0:
            b = g.parameter(name, (width, width)) if pick(2) else g.input_f32(name, (width, width))
            y = g.matmul(x, b)
        elif kind == 1:
            w = g.parameter(name, (width,)) if pick(2) else g.input_f32(name, (width,))
            y = g.rms_norm(x, w, 1e-5)
        elif kind == 2:
            y = g.add(x, live[pick(len(live))])
        elif kind == 3:
            y = g.glu(x, live[pick(len(live))], ["silu", "gelu_tanh"][pick(2)])
        elif kind == 4:
            y = g.scale(x, 0.25 + pick(8) / 4)
        elif kind == 5:
            y = g.softcap(x, 1.0 + pick(30))
        elif kind == 6:
            hd = width // 2
            y = g.head_rms_norm(x, g.parameter(name, (hd,)), 1e-6, hd)
        else:
            b = g.transpose(g.parameter(name, (width, width)))
            y = g.matmul(g.rms_norm(x, g.parameter(name + "n", (width,)), 1e-6), b)
        live.append(y)
    g.set_outputs(live[-2:] if live[-1] != live[-2] else live[-1:])
    return g


@pytest.mark.parametrize("seed", range(8))
def test_random_graphs_compile_and_match_the_reference(seed, tmp_path):
    g = _random_graph(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    weights = {n.name: torch.randn(n.shape, generator=gen) * n.shape[0] ** -0.5
               for n in g.parameters()}
    inputs = {n.name: torch.randn(n.shape, generator=gen) for n in g.inputs()}
    fn = meganeura.compile(g, weights, device="cpu", profile=H200_ROOFLINE, cache_dir=tmp_path)
    outs = fn(*(inputs[n.name] for n in g.inputs()))
    outs = outs if isinstance(outs, tuple) else (outs,)
    for out, ref in zip(outs, run_reference(g, weights, inputs)):
        assert_close(out, ref, "fp32")


def test_layers_that_differ_in_eps_window_or_theta_are_separate_templates(tmp_path):
    c = CONFIGS["gqa2"]
    g = build(c, 9)
    nodes = list(g.nodes)  # layer 0 and a copy of it as layer 1's: then change one attribute
    by_block = {}
    for n in nodes:
        by_block.setdefault(n.block, []).append(n)
    for attr, value in (("eps", 1e-3), ("window", 3), ("theta", 500.0)):
        h = Graph([n if n.block != "layer.0" or attr not in n.attrs
                   else type(n)(n.id, n.op, n.inputs, n.shape, n.dtype, {**n.attrs, attr: value},
                                n.name, n.block) for n in nodes], g.outputs)
        base, _ = optimize(g, CostModel(CPU_INTERPRETER, "fp32"))
        plan, rep = optimize(h, CostModel(CPU_INTERPRETER, "fp32"))
        w = random_weights(c, seed=3)
        ids = torch.randint(0, c.vocab_size, (9,), generator=torch.Generator().manual_seed(4))
        (ref,) = run_reference(h, w, {"token_ids": ids})
        (other,) = run_reference(g, w, {"token_ids": ids})
        assert (ref - other).abs().max() > 1e-4, attr  # the attribute matters here
        fn = meganeura.compile(h, w, device="cpu", cache_dir=tmp_path)
        assert_close(fn(ids), ref, "fp32")
        def attrs(n):  # a node's attributes and, for a fused kernel, its stages'
            stages = n.attrs.get("prologue", ()) + n.attrs.get("epilogue", ())
            return [n.attrs] + [st.attr for st in stages]
        changed = [n for n in plan.graph.nodes if n.block == "layer.0" and
                   any(a.get(attr) == value for a in attrs(n))]
        assert changed, attr
    assert len(rep.templates) == 3


# ---- the checks themselves ------------------------------------------------------------------

def _templates():
    c = from_dict(hf.CONFIGS["every_feature"])
    moe = from_dict(hf.CONFIGS["moe"])  # the experts family's rules, at 9 tokens and at one
    return [build(CONFIGS["gqa2"], 7), build(SMALL, 5), build(c, 9),
            build(c, 9, Generation(16, False)), build(c, 1, Generation(16, True)),
            build(moe, 9), build(moe, 1, Generation(16, True))]


@pytest.mark.parametrize("profile", [H200, CPU_INTERPRETER], ids=lambda p: p.name)
@pytest.mark.parametrize("k", range(7), ids=["gqa2", "small", "published", "prefill", "decode",
                                             "moe", "moe-decode"])
def test_every_enode_of_every_class_computes_the_same(k, profile):
    g = _templates()[k]
    _, rep = optimize(g, CostModel(profile, "fp32"))
    assert assert_classes_agree(g, rep, seed=k) > sum(t.enodes for t in rep.templates) * 0.99


def test_the_class_check_catches_an_unsound_rule():
    from meganeura.compiler.egraph import EClasses, ENode

    g = build(SMALL, 5)
    _, rep = optimize(g, CostModel(CPU_INTERPRETER, "fp32"))
    t = rep.templates[1]
    # a "rule" that claims glu(a, b) is glu(b, a): an e-node no rewrite may add
    c, node = next((c, n) for c, ns in t.saturated.nodes.items() for n in ns if n.op == "glu")
    wrong = ENode("glu", node.children[::-1], dict(node.attrs))
    t.saturated = EClasses({**t.saturated.nodes, c: t.saturated.nodes[c] + [wrong]},
                           t.saturated.roots)
    with pytest.raises(AssertionError, match="relative error"):
        assert_classes_agree(g, rep)


@pytest.mark.parametrize("name, seq, generation", [
    ("gqa2", 7, None), ("gemma4_4b", 2048, None), ("gemma4_e4b", 2048, None),
    ("gemma4_e4b", 1, Generation(4096, True)), ("gemma4_e4b", 600, Generation(4096, False)),
    ("gemma4_31b", 1, Generation(4096, True)), ("llama_3_1_8b", 1, Generation(4096, True))])
def test_extraction_equals_the_exact_optimum(name, seq, generation):
    from meganeura.models import PRESETS

    config = CONFIGS.get(name) or PRESETS[name]
    _, rep = optimize(build(config, seq, generation), CostModel(H200, "bf16"))
    for t in rep.templates:
        best = optimum_cost(t.saturated, t.price)
        assert abs(t.cost - best) <= 1e-9 * best, (t.cost, best)


def test_the_row_check_catches_one_wrong_row():
    ref = torch.randn(2048, 300, generator=torch.Generator().manual_seed(0))
    out = ref.clone()
    out[1234] *= 1.5  # one row 50% off: lost in the whole tensor's error
    from meganeura.runtime.check import relative_error

    assert relative_error(out, ref) < TOLERANCE["bf16"]
    assert row_relative_error(out, ref) > ROW_TOLERANCE["bf16"]
    with pytest.raises(AssertionError, match="worst row"):
        assert_close(out, ref, "bf16")


def test_a_graph_the_builder_refuses_names_why():
    g = Graph()
    x = g.input_f32("x", (3, 4))
    with pytest.raises(GraphError, match="transpose: operand %0 input 'x' depends on a run-time"):
        g.transpose(x)


# ---- second round: file systems, memory, owned results, load-time errors, messages -----------


def _ids(n: int, seed: int = 0, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _config_file(tmp_path, **fields):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**dataclasses.asdict(SMALL), **fields}))
    return str(path)


def test_a_path_that_cannot_be_looked_at_is_one_line(tmp_path, monkeypatch):
    # a name too long for the file system (a real OSError from stat, not "missing") ...
    long = str(tmp_path / ("x" * 300))
    with pytest.raises(WeightsError, match="cannot be read: File name too long"):
        meganeura.from_pretrained(long, device="cpu", cache_dir=tmp_path)
    _one_line_exit_2(*cli("generate", "--weights", long, "--tokens", "1"),
                     "cannot be read: File name too long")
    # ... and a directory this user may not enter (tests run as root, who may: stat says no)
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.stat

    def stat(path, *a, **k):
        if str(path).startswith(str(locked)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    _one_line_exit_2(*cli("compile", "--weights", str(locked)), "cannot be read: Permission denied")
    with pytest.raises(WeightsError, match="Permission denied"):
        meganeura.from_pretrained(locked, device="cpu", cache_dir=tmp_path)


def test_any_os_error_the_cli_meets_is_one_line(tmp_path, monkeypatch):
    from meganeura.compiler import report

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "plan.json"))

    monkeypatch.setattr(report, "emit", full)
    rc, out, err = cli("compile", "--emit-dir", str(tmp_path))
    _one_line_exit_2(rc, out, err, f"{tmp_path / 'plan.json'}: No space left on device")


def test_a_full_disk_compiles_from_memory_and_leaves_nothing_half_written(tmp_path, monkeypatch,
                                                                          capsys):
    from meganeura.codegen import cache

    def full(f, data):
        f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.KernelCache, "_write", staticmethod(full))
    g, w = build(SMALL, 5), random_weights(SMALL, seed=2)
    fn = meganeura.compile(g, w, device="cpu", cache_dir=tmp_path / "k")
    x = _ids(5)
    assert_close(fn(x), run_reference(g, w, {"token_ids": x})[0], "fp32")
    assert list((tmp_path / "k").iterdir()) == []  # no kernel file, no temporary file
    err = capsys.readouterr().err
    assert err.count("takes no new files (No space left on device)") == 1, err


def test_a_read_only_cache_is_used_as_it_is(tmp_path, monkeypatch, capsys):
    from meganeura.codegen import cache

    g, w, x = build(SMALL, 4), random_weights(SMALL, seed=3), _ids(4, 1)
    ref = run_reference(g, w, {"token_ids": x})[0]
    meganeura.compile(g, w, device="cpu", cache_dir=tmp_path)  # fills it
    files = sorted(tmp_path.iterdir())

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache.tempfile, "mkstemp", read_only)
    fn = meganeura.compile(g, w, device="cpu", cache_dir=tmp_path)  # holds every kernel
    assert_close(fn(x), ref, "fp32")
    assert fn.cache.hits > 0 and fn.cache.misses == 0 and not fn.cache.writable
    # a plan whose kernels it lacks: compiled from memory, the cache left as it was
    g2 = build(GQA2, 3)
    w2 = random_weights(GQA2, seed=1)
    fn2 = meganeura.compile(g2, w2, device="cpu", cache_dir=tmp_path)
    y = _ids(3, 2, GQA2.vocab_size)
    assert_close(fn2(y), run_reference(g2, w2, {"token_ids": y})[0], "fp32")
    assert fn2.cache.misses > 0 and sorted(tmp_path.iterdir()) == files
    assert capsys.readouterr().err.count("takes no new files (Read-only file system)") == 1


def test_a_cache_dir_under_a_read_only_home_compiles_from_memory(tmp_path, monkeypatch,
                                                                 capsys):
    from pathlib import Path

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    d = tmp_path / "home" / ".cache" / "kernels"
    g, w, x = build(SMALL, 3), random_weights(SMALL, seed=6), _ids(3, 6)
    fn = meganeura.compile(g, w, device="cpu", cache_dir=d)
    assert_close(fn(x), run_reference(g, w, {"token_ids": x})[0], "fp32")
    assert not d.exists() and "takes no new files (Read-only file system)" in \
        capsys.readouterr().err


def test_an_entry_that_cannot_be_replaced_is_compiled_from_memory(tmp_path):
    from meganeura.codegen.cache import KernelCache

    source = "import triton\n\n\ndef k(x_ptr):\n    pass\n"
    cache = KernelCache(tmp_path)
    (tmp_path / cache.path(source).name).mkdir()  # a directory where the file goes
    assert cache.store(source) is not None and cache.path(source).is_file()  # replaced
    assert cache.load(source, "k", interpreted=True) is not None


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_a_bad_cache_dir_is_reported_when_the_model_is_made(tmp_path, where):
    (tmp_path / "f").write_text("")
    d = tmp_path / "f" if where == "file" else tmp_path / "f" / "kernels"
    message = "exists and is not a directory" if where == "file" else "cannot be made"
    for make in (lambda: meganeura.from_config(SMALL, device="cpu", cache_dir=d),
                 lambda: meganeura.compile(build(SMALL, 3), random_weights(SMALL), device="cpu",
                                           cache_dir=d)):
        with pytest.raises(MeganeuraError, match=message):
            make()


def test_a_cpu_run_without_the_interpreter_is_reported_at_load(tmp_path, monkeypatch):
    import meganeura.pipeline as pipeline

    monkeypatch.setattr(pipeline, "interpreter_active", lambda: False)
    for make in (lambda: meganeura.from_config(SMALL, device="cpu", cache_dir=tmp_path),
                 lambda: meganeura.compile(build(SMALL, 3), random_weights(SMALL), device="cpu",
                                           cache_dir=tmp_path)):
        with pytest.raises(MeganeuraError, match="needs TRITON_INTERPRET=1 in the environment "
                                                 "before triton is imported"):
            make()
    assert list(tmp_path.iterdir()) == []  # refused before a kernel was made


def test_kv_caches_beyond_the_device_are_refused_before_they_are_made(tmp_path):
    cfg = _config_file(tmp_path, max_position_embeddings=2 ** 31 - 1)
    rc, out, err = cli("generate", "--config", cfg, "--tokens", "1,2",
                       "--max-new-tokens", str(2 * 10 ** 9))
    _one_line_exit_2(rc, out, err, "the KV caches for 2147483647 positions and the weights beside "
                                   "them need")
    assert "GiB is free" in err and "weights ready" not in out
    from meganeura.models.gemma4 import config_from_dict

    model = meganeura.from_config(config_from_dict(json.loads(open(cfg).read())), device="cpu",
                                  cache_dir=tmp_path)
    with pytest.raises(MeganeuraError, match="the KV caches for 2147483647 positions need"):
        model.generate(_ids(2), 2 * 10 ** 9)
    assert model.generator.sessions == []


def test_the_seeds_models_have_a_position_limit_for_forward_and_generate(tmp_path):
    model = meganeura.from_config(SMALL, device="cpu", cache_dir=tmp_path)
    assert SMALL.max_position_embeddings == 131_072
    with pytest.raises(MeganeuraError, match="need 50000002 positions, the model has 131072"):
        model.generate(_ids(2), 5 * 10 ** 7)
    short = dataclasses.replace(SMALL, max_position_embeddings=16)
    model = meganeura.from_config(short, device="cpu", cache_dir=tmp_path)
    with pytest.raises(MeganeuraError, match="17 tokens: the model has 16 positions"):
        model(_ids(17))
    with pytest.raises(MeganeuraError, match="need 17 positions, the model has 16"):
        model.generate(_ids(10), 7)
    assert model.plans == {} and model.generator.sessions == []
    with pytest.raises(ConfigError, match="max_position_embeddings must be a positive integer"):
        dataclasses.replace(SMALL, max_position_embeddings=0)


def test_results_belong_to_the_caller(tmp_path):
    model = meganeura.from_config(SMALL, device="cpu", cache_dir=tmp_path, seed=5)
    x, y = _ids(6, 1), _ids(6, 2)
    a = model(x)
    b = model(y)
    assert_close(a, run_reference(build(SMALL, 6), model.weights, {"token_ids": x})[0], "fp32")
    assert not torch.equal(a, b)
    # the no-copy path, by name: the plan's buffer, which the next call overwrites
    fast = model(x, copy=False)
    assert model(y, copy=False).data_ptr() == fast.data_ptr() and torch.equal(fast, b)


def test_a_directory_without_config_json_says_so(tmp_path):
    save_random_weights(SMALL, tmp_path / "model.safetensors")
    _one_line_exit_2(*cli("compile", "--weights", str(tmp_path)), "no config.json in this directory")
    rc, out, _ = cli("compile", "--model", "gemma4-small-test", "--weights", str(tmp_path))
    assert rc == 0 and "names and shapes match" in out  # bare weights of a named model


def test_a_gpu_plan_is_inspected_on_any_machine(tmp_path):
    rc, out, err = cli("compile", "--dtype", "bf16", "--profile", "h200", "--seq-len", "7",
                       "--emit-dir", str(tmp_path))
    assert rc == 0, err
    assert "cost model: h200, bf16" in out
    kernels = "".join(p.read_text() for p in (tmp_path / "kernels").glob("k_*.py"))
    assert 'input_precision="tf32"' in kernels  # a bf16 GPU plan's kernels (fp32: "ieee")
    _one_line_exit_2(*cli("compile", "--dtype", "bf16", "--device", "cpu", "--run"),
                     "bf16 runs on CUDA only")


@pytest.mark.parametrize("args, message", [
    (("compile", "--config", "CFG"), "vocab_size must be a positive integer below 2^31, got "
                                     "1000000000000"),
    (("generate", "--tokens", "1,2", "--max-new-tokens", str(10 ** 12)),
     "need 1000000000002 positions, the model has 131072"),
])
def test_messages_name_the_limit(tmp_path, args, message):
    cfg = _config_file(tmp_path, vocab_size=10 ** 12)
    _one_line_exit_2(*cli(*[cfg if a == "CFG" else a for a in args]), message)


def test_stop_ids_as_a_tensor(tmp_path):
    from meganeura.inference.generation import SamplingParams, check_request

    # an integer tensor of ids is read as their list (generate reads stop through this)
    _, stops, _ = check_request(SMALL, [1, 2], 3, SamplingParams(), torch.tensor([7, 9]), ())
    assert stops == {7, 9}
    _, stops, _ = check_request(SMALL, [1, 2], 3, SamplingParams(), torch.tensor(5), ())
    assert stops == {5}
    model = meganeura.from_config(SMALL, device="cpu", cache_dir=tmp_path, seed=1)
    with pytest.raises(MeganeuraError, match=r"must be 0-D or 1-D integers, got shape \[1, 1\]"):
        model.generate(_ids(3), 4, stop=torch.ones(1, 1, dtype=torch.int64))
    with pytest.raises(MeganeuraError, match=r"stop ids must be integers in \[0, 64\), got 99$"):
        model.generate(_ids(3), 4, stop=torch.tensor([1, 99]))
    assert model.generator.sessions == []


def test_an_unknown_debug_channel_in_the_environment_is_named(tmp_path, monkeypatch):
    _one_line_exit_2(*cli("compile", env={"MEGANEURA_DEBUG": "bogus"}),
                     "unknown debug channel bogus in MEGANEURA_DEBUG (known: egraph, plan, "
                     "kernels, timing)")
    monkeypatch.setenv("MEGANEURA_DEBUG", "plan,bogus")
    with pytest.raises(MeganeuraError, match="unknown debug channel bogus in MEGANEURA_DEBUG"):
        meganeura.from_config(SMALL, device="cpu", cache_dir=tmp_path)
    monkeypatch.setenv("MEGANEURA_DEBUG", "plan")
    assert meganeura.from_config(SMALL, device="cpu", cache_dir=tmp_path).setup.debug == {"plan"}


def test_the_stream_prints_its_last_incomplete_character(capsys):
    from meganeura.cli.commands import _Stream

    class Bytes:  # a byte-level tokenizer: id k is byte k
        @staticmethod
        def decode(ids, skip_special_tokens=False):
            return bytes(ids).decode("utf-8", errors="replace")

    s = _Stream(Bytes())
    for b in "é".encode() + b"!" + "€".encode()[:2]:  # ends inside a character
        s.add(b)
    s.end()
    assert capsys.readouterr().out == "é!\ufffd\n"


def test_weights_beyond_the_device_are_refused_before_one_is_made(tmp_path, monkeypatch):
    import meganeura.runtime.compiled as compiled

    monkeypatch.setattr(compiled, "_host_available", lambda: 4096)  # bytes free
    with pytest.raises(MeganeuraError, match=r"the weights need 0\.00 GiB of cpu memory; "
                                             r"0\.00 GiB is free"):
        meganeura.from_config(SMALL, device="cpu", cache_dir=tmp_path)
    _one_line_exit_2(*cli("compile", "--run"), "the fp32 weights of this model need")


def test_a_config_that_cannot_be_read_is_one_line(tmp_path, monkeypatch):
    from pathlib import Path

    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text("{}")
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "config.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    _one_line_exit_2(*cli("compile", "--weights", str(d)),
                     f"cannot read config {d / 'config.json'}: Permission denied")


def test_save_pretrained_refuses_what_it_cannot_write_whole(tmp_path):
    model = meganeura.from_config(SMALL, device="cpu", cache_dir=tmp_path / "k")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        model.save_pretrained(tmp_path / "file")
    from meganeura.models.gemma4_text import PRESETS as PUBLISHED

    odd = dataclasses.replace(PUBLISHED["gemma4_e2b"], vocab_size=1000)
    with pytest.raises(ConfigError, match="written back only as one of the presets"):
        meganeura.models.family(odd).to_dict(odd)
    out = model.save_pretrained(tmp_path / "seed")  # the seed's field names, read back
    again = meganeura.from_pretrained(out, device="cpu", cache_dir=tmp_path / "k")
    assert again.config == SMALL and all(torch.equal(again.weights[n], w)
                                         for n, w in model.weights.items())
