"""The kernel source cache: keyed by text and versions, atomic, self-checking."""

import os

import pytest
import torch

import meganeura
from configs import SMALL
from meganeura.codegen.cache import KernelCache
from meganeura.compiler.graph import Graph
from meganeura.models import build
from meganeura.models.weights import random_weights

SOURCE = "import triton\nimport triton.language as tl\n\n\ndef k(x_ptr):\n    pass\n"


def test_same_source_same_file_other_source_other_file(tmp_path):
    c = KernelCache(tmp_path)
    a = c.store(SOURCE)
    assert c.store(SOURCE) == a and c.hits == 1
    b = c.store(SOURCE.replace("pass", "return"))
    assert a != b and sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, b.name])
    assert c.versions in a.read_text()  # versions are part of the key and the file


def test_versions_change_the_key(tmp_path):
    c1, c2 = KernelCache(tmp_path), KernelCache(tmp_path)
    c2.versions = c1.versions + " (other triton)"
    assert c1.key(SOURCE) != c2.key(SOURCE)


@pytest.mark.parametrize("damage", [
    lambda t: t[: len(t) // 2],  # half-written
    lambda t: t.replace("pass", "raise SystemExit"),  # edited
    lambda t: "",  # empty
])
def test_corrupt_entries_are_rebuilt(tmp_path, damage):
    c = KernelCache(tmp_path)
    path = c.store(SOURCE)
    good = path.read_text()
    path.write_text(damage(good))
    assert c.store(SOURCE) == path and c.rebuilt == 1
    assert path.read_text() == good


def test_writes_leave_no_temporary_files(tmp_path):
    c = KernelCache(tmp_path)
    for i in range(3):
        c.store(SOURCE + f"# {i}\n")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_loading_uses_the_cache_and_compiles(tmp_path):
    c = KernelCache(tmp_path)
    fn = c.load(SOURCE, "k", interpreted=True)
    assert c.load(SOURCE, "k", interpreted=True) is fn
    with pytest.raises(meganeura.errors.MeganeuraError, match="TRITON_INTERPRET"):
        c.load(SOURCE, "k", interpreted=False)  # this process runs the interpreter


def test_no_user_string_reaches_kernel_source(tmp_path):
    # hostile names in the graph and an odd cache path: none may appear in generated code
    g = Graph()
    evil = "x'); import os; os.system('echo pwned') #"
    ids = g.input_u32(evil + "ids", (3,))
    table = g.parameter(evil + "table", (11, 16))
    w = g.parameter(evil + "w", (16, 16))
    h = g.rms_norm(g.embedding(ids, table), g.parameter(evil + "n", (16,)), 1e-6)
    g.set_outputs([g.matmul(h, w)])
    weights = {evil + "table": torch.randn(11, 16), evil + "w": torch.randn(16, 16),
               evil + "n": torch.rand(16)}
    fn = meganeura.compile(g, weights, device="cpu", cache_dir=tmp_path / "a b'\"")
    fn(torch.tensor([1, 2, 3]))
    for src in fn.kernel_sources():
        assert "pwned" not in src and "ids" not in src.replace("ids_ptr", "")
    for p in (tmp_path / "a b'\"").iterdir():
        assert "pwned" not in p.read_text()


def test_compile_reuses_cached_sources(tmp_path):
    g = build(SMALL, 3)
    w = random_weights(SMALL)
    first = meganeura.compile(g, w, device="cpu", cache_dir=tmp_path)
    files = sorted(os.listdir(tmp_path))
    second = meganeura.compile(g, w, device="cpu", cache_dir=tmp_path)
    assert sorted(os.listdir(tmp_path)) == files
    assert second.cache.misses == 0 and second.cache.hits > 0
    assert len(files) == len(set(first.kernel_sources()))


def test_generation_plans_are_read_back_by_a_new_model(tmp_path):
    # a second model object (as a new process would) reads the plans the first one kept
    # beside the kernels instead of running the e-graph; a damaged plan file is made again
    import meganeura
    from configs import CONFIGS
    from meganeura.inference.generation import SamplingParams

    c = CONFIGS["small_test"]
    prompt = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    first = meganeura.from_config(c, device="cpu", seed=1, cache_dir=tmp_path)
    first.generator.chunks = (4, 8)
    want = first.generate(prompt, max_new_tokens=2)
    blobs = sorted(tmp_path.glob("p_*.bin"))
    assert len(blobs) == 2  # the chunk and the step
    second = meganeura.from_config(c, device="cpu", seed=1, cache_dir=tmp_path)
    second.generator.chunks = (4, 8)
    assert second.generate(prompt, max_new_tokens=2).tolist() == want.tolist()
    s = second.generator.last_session
    assert all(fn.report.optimize.templates == [] and "read" in fn.report.optimize.seconds
               for fn in s.plans.values())
    blobs[0].write_bytes(blobs[0].read_bytes()[:-7] + b"garbage")
    third = meganeura.from_config(c, device="cpu", seed=1, cache_dir=tmp_path)
    third.generator.chunks = (4, 8)
    out = third.generator.generate(prompt, 2, SamplingParams())
    assert out.tolist() == want.tolist()
    made = [fn for fn in third.generator.last_session.plans.values()
            if fn.report.optimize.templates]
    assert len(made) == 1  # the damaged one, optimized again (and written back whole)
    assert sorted(tmp_path.glob("p_*.bin")) == blobs
    assert third.generate(prompt, max_new_tokens=2).tolist() == want.tolist()


def test_a_plan_key_tells_apart_what_extraction_and_the_plan_depend_on():
    # a kept plan must not serve a setup that prices memory, or holds products, otherwise
    import dataclasses

    from meganeura.pipeline import plan_key, setup

    g = build(SMALL, 5)
    s = setup("cpu", run=False)
    keys = {plan_key(g, s), plan_key(g, dataclasses.replace(s, memory_price=1e-9)),
            plan_key(g, dataclasses.replace(s, fp32_products=True)), plan_key(build(SMALL, 6), s)}
    assert len(keys) == 4
    assert plan_key(build(SMALL, 5), setup("cpu", run=False)) == plan_key(g, s)
