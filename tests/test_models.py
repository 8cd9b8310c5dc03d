import json

import pytest

from meganeura.errors import ConfigError
from meganeura.models import (Gemma4Config, build, config_from_dict, load_config,
                              transposed_weight_names, weight_names, weight_shapes)
from meganeura.models.gemma4 import PRESETS  # the seed family's

LAYER_NAMES = [  # the seed's per-layer order
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight",
    "self_attn.k_norm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
    "mlp.up_proj.weight", "mlp.down_proj.weight",
]
LINEAR = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
          "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
          "mlp.down_proj.weight"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_with_the_seed_weight_names(preset):
    c = PRESETS[preset]
    g = build(c, 3)
    g.validate()
    expected = ["model.embed_tokens.weight"]
    for i in range(c.num_hidden_layers):
        expected += [f"model.layers.{i}.{n}" for n in LAYER_NAMES]
    expected += ["model.norm.weight", "lm_head.weight"]
    assert weight_names(c) == expected
    assert sorted(n.name for n in g.parameters()) == sorted(expected)  # graph and list agree
    tr = [f"model.layers.{i}.{n}" for i in range(c.num_hidden_layers) for n in LINEAR]
    assert transposed_weight_names(c) == tr + ["lm_head.weight"]
    (logits,) = g.outputs
    assert g[logits].shape == (3, c.vocab_size)
    counts = g.op_counts()
    n_global = sum(c.is_global_layer(i) for i in range(c.num_hidden_layers))
    assert counts["causal_attention"] == n_global
    assert counts["sliding_window_attention"] == c.num_hidden_layers - n_global
    assert counts["matmul"] == 7 * c.num_hidden_layers + 1


def test_layer_kinds_follow_offset_and_period():
    c = PRESETS["gemma4_4b"]
    assert [i for i in range(12) if c.is_global_layer(i)] == [3, 7, 11]


def test_1b_resolution():
    c = PRESETS["gemma4_1b"]
    assert (c.hidden_size, c.num_attention_heads, c.head_dim) == (1856, 14, 132)
    shapes = weight_shapes(c)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (1856, 1848)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (1848, 1856)
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == (1848,)
    assert shapes["model.layers.0.self_attn.k_norm.weight"] == (924,)


def test_head_dims_of_the_presets():
    assert {p: c.head_dim for p, c in PRESETS.items()} == {
        "gemma4_1b": 132, "gemma4_4b": 128, "gemma4_12b": 240, "gemma4_27b": 144, "small_test": 16}


def test_qk_norm_off_drops_its_weights():
    c = config_from_dict({**PRESETS["small_test"].__dict__, "use_qk_norm": False})
    assert not any("q_norm" in n or "k_norm" in n for n in weight_names(c))
    assert build(c, 2).op_counts()["rms_norm"] == 2 * c.num_hidden_layers + 1


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 0, "hidden_size must be a positive integer"),
    ("num_hidden_layers", -1, "num_hidden_layers must be a positive integer"),
    ("num_key_value_heads", 3, "num_key_value_heads (3) must divide num_attention_heads (2)"),
    ("head_dim", 15, "head_dim must be even"),
    ("rms_norm_eps", 0.0, "rms_norm_eps must be a positive number"),
    ("rope_theta", float("nan"), "rope_theta must be a positive number"),
    ("global_attn_offset", -1, "global_attn_offset must be an integer >= 0"),
    ("use_qk_norm", 1, "use_qk_norm must be true or false"),
    ("vocab_size", 2.5, "vocab_size must be a positive integer"),
])
def test_invalid_config_names_the_field(field, value, message):
    d = dict(PRESETS["small_test"].__dict__)
    d[field] = value
    with pytest.raises(ConfigError) as e:
        Gemma4Config(**d)
    assert message in str(e.value)


def test_config_from_json(tmp_path):
    seed_fields = {  # the seed's field names, no head_dim: derived as hidden / heads
        "vocab_size": 100, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 96, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "sliding_window_size": 16, "global_attn_period": 2,
        "global_attn_offset": 1, "use_qk_norm": True}
    f = tmp_path / "c.json"
    f.write_text(json.dumps(seed_fields))
    c = load_config(f)
    assert c.head_dim == 12 and c.kv_dim == 24
    f.write_text(json.dumps({**seed_fields, "hidden_size": 50}))
    with pytest.raises(ConfigError, match="head_dim is required: hidden_size 50"):
        load_config(f)
    f.write_text(json.dumps({**seed_fields, "hiden_size": 50}))
    with pytest.raises(ConfigError, match="unknown config field hiden_size"):
        load_config(f)
    f.write_text(json.dumps({k: v for k, v in seed_fields.items() if k != "vocab_size"}))
    with pytest.raises(ConfigError, match="vocab_size is missing"):
        load_config(f)
    f.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(f)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.json")
