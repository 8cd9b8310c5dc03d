"""The published Gemma-4 from checkpoint directories written by transformers: logits equal
transformers' fp32 logits, every kernel generated from the extracted plan (the interpreter)."""

import json

import pytest
import torch

import hf_checkpoints as hf
import meganeura
from meganeura.errors import ConfigError, InputError, WeightsError
from meganeura.models import build
from meganeura.models.checkpoint import open_checkpoint
from meganeura.models.gemma4_text import from_dict
from meganeura.models.weights import load_weights
from meganeura.runtime.reference import run_reference
from numerics import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _ids(vocab, n, seed):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(scope="module")
def every_feature(tmp_path_factory):
    model = hf.text_model("every_feature", seed=1)
    d = tmp_path_factory.mktemp("every_feature")
    hf.save(model, d)
    return model, d


def test_every_weight_is_perturbed_from_its_initial_value(every_feature):
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    model, _ = every_feature
    torch.manual_seed(1)
    fresh = Gemma4ForCausalLM(Gemma4TextConfig(**hf.CONFIGS["every_feature"]))
    state = fresh.state_dict()
    for name, t in model.state_dict().items():
        if "inv_freq" not in name and "embed_scale" not in name:
            assert not torch.equal(t, state[name]), name


@pytest.mark.parametrize("seq", [1, 23])
def test_text_checkpoint_matches_transformers(every_feature, kernels, seq):
    model, d = every_feature
    ours = meganeura.from_pretrained(d, device="cpu", cache_dir=kernels)
    ids = _ids(97, seq, seq)
    out = ours(ids)
    assert out.shape == (seq, 97)
    assert_close(out, hf.logits(model, ids), "fp32")
    assert ours.checkpoint.layout == "gemma4_text"


def test_every_feature_is_in_the_plan(every_feature, kernels):
    _, d = every_feature
    ours = meganeura.from_pretrained(d, device="cpu", cache_dir=kernels)
    fn = ours.compiled(23)
    ops = fn.report.plan.kernel_counts()
    c = ours.config
    assert c.is_kv_consumer(6) and not c.is_kv_consumer(3) and c.kv_producer(6) == 2
    assert ops["causal_attention"] == 3 and ops["sliding_window_attention"] == 4
    # shared layers read their producer's K/V: only 4 layers project k (q | k | v merged)
    assert ops["unit_rms_norm"] == 4 and ops["rows[head_rms_norm, rope]"] == 7 + 4
    assert ops["rows[rms_norm, add, scale_by]"] == 7  # post-norm, residual, layer scalar
    assert ops["product[rms_norm | softcap]"] == 1  # final norm and soft-cap around the lm_head
    # the embedding times sqrt(H); the per-layer inputs' gather times sqrt(P), plus the
    # projection, times 2^-0.5: one kernel
    assert ops["gather[scale]"] == 1 and ops["gather[scale, add, scale]"] == 1
    kinds = {(a, v) for _, a, v in fn.report.kernels}
    assert ("matmul", "rms_norm|softcap+tma+B-transposed") in kinds  # the lm_head
    assert ("matmul", "glu") in kinds or any(v.startswith("glu+") for _, v in kinds)
    # the tied lm_head reads the embedding in place, every linear weight is read where it
    # lies: no tensor is made at load time (the positions 0 .. S-1 are the row kernels' row
    # indices)
    assert [g_.op for g_ in (fn.report.plan.graph[i] for i in fn.tensors
                             if i in fn.plan.load_time)] == []


def test_multimodal_checkpoint_loads_its_text_decoder(tmp_path, kernels):
    model = hf.multimodal_model("every_feature", seed=2)
    hf.save(model, tmp_path)
    ours = meganeura.from_pretrained(tmp_path, device="cpu", cache_dir=kernels)
    assert ours.checkpoint.layout == "gemma4"
    assert "vision and audio towers are skipped" in ours.notes[0]
    ids = _ids(97, 11, 3)
    assert_close(ours(ids), hf.logits(model, ids), "fp32")
    with pytest.raises(ConfigError, match="multimodal Gemma-4 checkpoint.*not supported yet"):
        ours.save_pretrained(tmp_path / "out")  # its towers were never loaded
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["e2b_like", "dense"])
def test_other_layouts_match_transformers(name, tmp_path, kernels):
    model = hf.text_model(name, seed=4)
    hf.save(model, tmp_path, shard_size="20KB")  # sharded, with an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = meganeura.from_pretrained(tmp_path, device="cpu", cache_dir=kernels)
    vocab = hf.CONFIGS[name]["vocab_size"]
    ids = _ids(vocab, 17, 5)
    assert_close(ours(ids), hf.logits(model, ids), "fp32")


@pytest.mark.parametrize("name, layout", [("moe", "gemma4_text"), ("moe_top1", "gemma4")])
def test_mixture_of_experts_checkpoints_match_transformers(name, layout, tmp_path, kernels):
    # 7 experts, 3 a token (K = V, no per-layer inputs), as a text checkpoint, sharded; 4
    # experts, 1 a token, with per-layer inputs and KV sharing, nested in a multimodal one
    if layout == "gemma4":
        model = hf.multimodal_model(name, seed=5)
        hf.save(model, tmp_path)
    else:
        model = hf.text_model(name, seed=5)
        hf.save(model, tmp_path, shard_size="20KB")
    ours = meganeura.from_pretrained(tmp_path, device="cpu", cache_dir=kernels)
    assert ours.checkpoint.layout == layout and ours.config.enable_moe_block
    vocab = hf.CONFIGS[name]["vocab_size"]
    for n in (1, 13) if layout == "gemma4_text" else (13,):  # one token: a program per
        # chosen expert; 13: sorted, grouped
        ids = _ids(vocab, n, n)
        assert_close(ours(ids), hf.logits(model, ids), "fp32")
    ops = ours.compiled(13).report.plan.kernel_counts()
    layers = hf.CONFIGS[name]["num_hidden_layers"]  # a route and an expert glu each, or
    # (on the interpreter, where launches cost most) the glu routing its tokens itself
    assert ops.get("expert_glu", 0) + ops.get("expert_glu_routed", 0) == layers, ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stored_half_precision_is_upcast(dtype, tmp_path, kernels):
    model = hf.text_model("every_feature", seed=6)
    hf.save(model, tmp_path, dtype=dtype)
    ref_model = hf.reload_fp32(model, tmp_path)
    ours = meganeura.from_pretrained(tmp_path, device="cpu", dtype=torch.float32,
                                     cache_dir=kernels)
    assert all(t.dtype == torch.float32 for t in ours.weights.values())
    ids = _ids(97, 9, 7)
    assert_close(ours(ids), hf.logits(ref_model, ids), "fp32")


def test_reference_executor_matches_transformers(every_feature):
    model, d = every_feature
    ck = open_checkpoint(d)
    w = load_weights(ck.path, ck.config)
    ids = _ids(97, 31, 8)
    (ref,) = run_reference(build(ck.config, 31), w, {"token_ids": ids})
    assert_close(ref, hf.logits(model, ids), "fp32")


def test_plans_are_kept_per_sequence_length(every_feature, kernels):
    _, d = every_feature
    ours = meganeura.from_pretrained(d, device="cpu", cache_dir=kernels)
    a = ours(_ids(97, 3, 1)).clone()
    ours(_ids(97, 4, 1))
    assert sorted(ours.plans) == [3, 4] and ours.report is ours.plans[4].report
    assert torch.equal(ours(_ids(97, 3, 1)), a)  # the same weights, the same plan
    with pytest.raises(InputError, match="non-empty 1-D"):
        ours(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(InputError, match="token id 97, outside"):
        ours(torch.tensor([1, 97]))


def _config_dir(tmp_path, text: dict, **top) -> str:
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gemma4_text", **hf.CONFIGS["dense"],
                                               **text, **top}))
    return d


@pytest.mark.parametrize("field, value, message", [
    ("enable_moe_block", True, "num_experts must be a positive integer with enable_moe_block"),
    ("hidden_size", "48", "hidden_size must be a positive integer"),
    ("hidden_activation", "relu", "hidden_activation must be one of"),
    ("layer_types", ["sliding_attention"], "layer_types must be a list of 6"),
    ("num_kv_shared_layers", 6, "must leave at least one layer"),
    ("rope_parameters", {"sliding_attention": {"rope_type": "yarn"},
                         "full_attention": {"rope_type": "default"}}, "rope_type 'yarn' is not"),
    ("rope_parameters", {"sliding_attention": {"rope_type": "default"}}, "no object for full"),
    ("per_layer_config", {"9": {"head_dim": 8}}, "per_layer_config entry '9'"),
    ("use_bidirectional_attention", "all", "bidirectional text attention"),
])
def test_unsupported_or_bad_config_names_the_field(tmp_path, field, value, message):
    d = _config_dir(tmp_path, {field: value})
    with pytest.raises(ConfigError, match=message):
        meganeura.from_pretrained(d, device="cpu")


def test_checkpoint_directory_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        meganeura.from_pretrained(tmp_path / "nope", device="cpu")
    with pytest.raises(ConfigError, match="no config.json"):
        meganeura.from_pretrained(tmp_path, device="cpu")
    d = _config_dir(tmp_path, {}, model_type="gpt2")
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        meganeura.from_pretrained(d, device="cpu")
    (d / "config.json").write_text(json.dumps({"model_type": "gemma4_text", **hf.CONFIGS["dense"]}))
    with pytest.raises(WeightsError, match="no model.safetensors"):
        meganeura.from_pretrained(d, device="cpu")


def test_released_and_per_layer_config_forms_agree():
    # the form transformers >= 5.17 writes (per_layer_config) and the released form
    released = from_dict({**hf.CONFIGS["every_feature"]})
    per_layer = from_dict({k: v for k, v in hf.CONFIGS["every_feature"].items()
                           if k not in ("global_head_dim", "num_global_key_value_heads")}
                          | {"per_layer_config": {str(i): {"head_dim": 32, "num_key_value_heads": 1}
                                                  for i in (2, 5, 6)}})
    assert released == per_layer
    assert released.layer_head_dims == (16, 16, 32, 16, 16, 32, 32)
    assert released.layer_kv_heads == (2, 2, 1, 2, 2, 1, 1)
    assert released.rope_of(2) == (1e6, 4) and released.rope_of(0) == (1e4, 8)


def test_cli_reads_a_checkpoint_directory(tmp_path):
    from test_cli import cli

    model = hf.multimodal_model("dense", seed=3)
    hf.save(model, tmp_path)
    rc, out, err = cli("compile", "--weights", str(tmp_path), "--run", "--tokens", "5,1,7,3,2,9")
    assert rc == 0, err
    assert "checkpoint: Gemma-4 multimodal checkpoint (gemma4): its text decoder is loaded; the " \
           "vision and audio towers are skipped" in out
    assert "published Gemma-4, 6 layers (1 full, 5 sliding-window 4)" in out
    assert "names and shapes match" in out and "top tokens at position 5" in out
    err_line = next(line for line in out.splitlines() if line.startswith("relative error"))
    assert float(err_line.split(": ")[1]) <= 1e-4
    rc, out, err = cli("compile", "--weights", str(tmp_path), "--model", "gemma4-e4b")
    assert rc == 2 and "holds its own config.json" in err


def test_cli_published_preset_without_weights():
    from test_cli import cli

    rc, out, err = cli("compile", "--model", "gemma4-e4b", "--seq-len", "2048", "--profile", "h200")
    assert rc == 0, err
    assert "42 layers (7 full, 35 sliding-window 512)" in out and "parameters: 7,463,013,418" in out
    assert "template 6:" in out and "template 7:" not in out  # few templates for 42 layers
    assert "product[softcap] x1" in out and "rows[rms_norm, add, scale_by] x42" in out
