import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from configs import SMALL
from meganeura.errors import WeightsError
from meganeura.models import transposed_weight_names, weight_names
from meganeura.models.weights import (check_weights, load_weights, random_weights,
                                      save_random_weights)


def test_round_trip_transposes_linear_weights(tmp_path):
    f = tmp_path / "w.safetensors"
    save_random_weights(SMALL, f, seed=5)
    w = random_weights(SMALL, seed=5)
    from safetensors import safe_open
    with safe_open(str(f), framework="pt") as raw:
        q = "model.layers.0.self_attn.q_proj.weight"
        assert raw.get_slice(q).get_shape() == [32, 32][::-1]
        up = "model.layers.1.mlp.up_proj.weight"
        assert raw.get_slice(up).get_shape() == [64, 32]  # HF: [out, in]
        assert torch.equal(raw.get_tensor(up), w[up].T)
    loaded = load_weights(f, SMALL)
    assert sorted(loaded) == sorted(weight_names(SMALL))
    for name in weight_names(SMALL):
        assert torch.equal(loaded[name], w[name]), name
    assert loaded["model.layers.1.mlp.up_proj.weight"].shape == (32, 64)


def test_random_weights_are_deterministic_and_seeded():
    a, b, c = random_weights(SMALL, 1), random_weights(SMALL, 1), random_weights(SMALL, 2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert a["model.norm.weight"].std() > 0.01  # norm weights are not all ones


def test_load_casts_dtype(tmp_path):
    f = tmp_path / "w.safetensors"
    save_random_weights(SMALL, f)
    w = load_weights(f, SMALL, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in w.values())


def test_sharded_directory(tmp_path):
    w = random_weights(SMALL, seed=3)
    tr = set(transposed_weight_names(SMALL))
    names = weight_names(SMALL)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for shard, ns in shards.items():
        save_file({n: (w[n].T if n in tr else w[n]).contiguous() for n in ns}, tmp_path / shard)
    index = {"weight_map": {n: s for s, ns in shards.items() for n in ns}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_weights(tmp_path, SMALL)
    assert all(torch.equal(loaded[n], w[n]) for n in names)
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(WeightsError, match="names shard b.safetensors, which is missing"):
        load_weights(tmp_path, SMALL)


def _write_without(tmp_path, drop=None, replace=None):
    w = random_weights(SMALL)
    if drop:
        del w[drop]
    tr = set(transposed_weight_names(SMALL))
    tensors = {n: (t.T if n in tr else t).contiguous() for n, t in w.items()}
    tensors.update(replace or {})
    f = tmp_path / "w.safetensors"
    save_file(tensors, f)
    return f


def test_missing_tensor_is_named(tmp_path):
    f = _write_without(tmp_path, drop="model.layers.2.mlp.down_proj.weight")
    with pytest.raises(WeightsError, match="'model.layers.2.mlp.down_proj.weight' is missing"):
        check_weights(f, SMALL)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    # a graph-layout (not transposed) up_proj: [32, 64] where HF layout [64, 32] is expected
    f = _write_without(tmp_path, replace={"model.layers.0.mlp.up_proj.weight": torch.ones(32, 64)})
    with pytest.raises(WeightsError) as e:
        load_weights(f, SMALL)
    assert ("'model.layers.0.mlp.up_proj.weight' has shape [32, 64]" in str(e.value)
            and "expected [64, 32] (HF layout [out, in])" in str(e.value))


@pytest.mark.parametrize("corrupt, message", [
    (lambda b: b[:4], "shorter than its header"),
    (lambda b: struct.pack("<Q", 10**9) + b[8:], "header length"),
    (lambda b: b[:8] + b"\xff" * 20 + b[28:], "header is not JSON"),
    (lambda b: b[: len(b) - 100], "truncated or corrupt"),
])
def test_corrupt_file(tmp_path, corrupt, message):
    f = tmp_path / "w.safetensors"
    save_random_weights(SMALL, f)
    f.write_bytes(corrupt(f.read_bytes()))
    with pytest.raises(WeightsError, match=message):
        load_weights(f, SMALL)


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        check_weights(tmp_path / "nope.safetensors", SMALL)
    with pytest.raises(WeightsError, match="no model.safetensors"):
        check_weights(tmp_path, SMALL)


def test_pickle_files_are_never_loaded(tmp_path):
    f = tmp_path / "w.bin"
    torch.save({"model.embed_tokens.weight": torch.ones(1)}, f)
    with pytest.raises(WeightsError, match="corrupt safetensors"):
        load_weights(f, SMALL)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    f = tmp_path / "w.safetensors"
    save_random_weights(SMALL, f, seed=1)
    before = f.read_bytes()

    def half_write(tensors, path):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_random_weights(SMALL, f, seed=2)
    assert f.read_bytes() == before  # the old file is intact, no temp file is left
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
