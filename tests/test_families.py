"""The family table (models/registry.py): every family builds, optimizes and runs its plan as
its graph computes; its weights are listed from its config alone, as its graph declares them;
preset names, command-line choices and the table agree."""

import dataclasses

import pytest
import torch

import hf_checkpoints as hf
from configs import GQA2
from meganeura.cli import MODEL_CHOICES, build_parser
from meganeura.compiler.cost import CPU_INTERPRETER, CostModel
from meganeura.errors import ConfigError
from meganeura.models import (FAMILIES, MODEL_NAMES, PRESETS, Family, LlamaConfig, Qwen3Config,
                              build, family, weight_specs)
from meganeura.models.checkpoint import config_of
from meganeura.models.gemma4_text import from_dict as gemma4_text_config
from meganeura.models.kv import Generation
from meganeura.models.registry import BY_MODEL_TYPE, read_config
from meganeura.pipeline import optimize_graph
from meganeura.runtime.reference import run_reference
from numerics import assert_close

# a small config of every family: odd widths, GQA ratios above 1, the family's options on
SMALL = {
    "the seed's Gemma-4": GQA2,
    "published Gemma-4": gemma4_text_config(hf.CONFIGS["every_feature"]),
    "Llama": LlamaConfig(vocab_size=37, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                         num_attention_heads=5, num_key_value_heads=1, head_dim=8,
                         rope_scaling=(8.0, 1.0, 4.0, 64), tie_word_embeddings=True),
    "Qwen3": Qwen3Config(vocab_size=41, hidden_size=36, intermediate_size=44, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                         rope_theta=1e6),
}


def test_every_family_has_a_small_config():
    assert sorted(SMALL) == sorted(f.name for f in FAMILIES)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("seq", [1, 7])
def test_the_optimized_plan_computes_what_the_graph_does(fam, seq):
    c = SMALL[fam.name]
    assert family(c) is fam
    g = fam.build(c, seq)
    g.validate()
    plan, _ = optimize_graph(g, CostModel(CPU_INTERPRETER, "fp32"))
    w = fam.random_weights(c, seed=seq)
    ids = torch.randint(0, c.vocab_size, (seq,), generator=torch.Generator().manual_seed(seq))
    (ref,) = run_reference(g, w, {"token_ids": ids})
    (out,) = run_reference(plan.graph, w, {"token_ids": ids})
    assert ref.shape == (seq, c.vocab_size)
    assert_close(out, ref, "fp32-exact")


def _graph_parameters(config, generation=None) -> list:
    seq = 1 if generation and generation.decode else 3
    return [(n.name, n.shape) for n in build(config, seq, generation).parameters()]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_weight_specs_are_the_graph_parameters(name):
    c = SMALL[name]
    specs = [(n, s.shape) for n, s in weight_specs(c).items()]
    assert specs == _graph_parameters(c)  # names, shapes and order (random weights seed by it)
    for generation in (Generation(16, decode=False), Generation(16, decode=True)):
        assert _graph_parameters(c, generation) == specs


@pytest.mark.parametrize("key", sorted(PRESETS))
def test_weight_specs_of_every_preset_are_its_graph_parameters(key):
    c = PRESETS[key]
    assert [(n, s.shape) for n, s in weight_specs(c).items()] == _graph_parameters(c)


def test_preset_names_cli_choices_and_the_table_agree():
    presets = [p for f in FAMILIES for p in f.presets]
    assert MODEL_NAMES == {p.name: p.key for p in presets}
    assert PRESETS == {p.key: p.config for p in presets}
    assert tuple(MODEL_CHOICES) == tuple(MODEL_NAMES) and "qwen3-8b" in MODEL_CHOICES
    parser = build_parser()
    for command in ("compile", "generate"):
        sub = parser._subparsers._group_actions[0].choices[command]
        (model,) = [a for a in sub._actions if a.dest == "model"]
        assert model.choices is MODEL_CHOICES
        text = " ".join(sub.format_help().split())
        assert f"--model NAME built-in preset, random weights: {', '.join(MODEL_NAMES)} " in text
        assert all(f"{t}," in text or f"{t})" in text for t in BY_MODEL_TYPE if t)  # --config
    for f in FAMILIES:
        for p in f.presets:
            assert type(p.config) is f.config and family(p.config) is f
    assert {"llama-3.2-1b", "llama-3.1-8b", "qwen3-8b", "gemma4-e4b",
            "gemma4-small-test"} <= set(MODEL_NAMES)


def test_every_family_declares_the_whole_protocol():
    members = [f.name for f in dataclasses.fields(Family)]
    assert members == ["name", "config", "from_dict", "layouts", "presets", "build",
                       "weight_specs", "random_weights", "summary", "to_dict", "model_types"]
    for f in FAMILIES:
        assert isinstance(f, Family) and f.model_types == tuple(f.layouts)
        for m in ("from_dict", "build", "weight_specs", "random_weights", "summary", "to_dict"):
            assert callable(getattr(f, m)), (f.name, m)
        assert all(callable(read) for read in f.layouts.values())
        assert f.summary(SMALL[f.name])
        for p in f.presets:  # what save_pretrained writes reads back as the same config
            assert read_config(f.to_dict(p.config), "config.json").config == p.config
    assert BY_MODEL_TYPE == {t: f for f in FAMILIES for t in f.model_types}
    assert set(BY_MODEL_TYPE) == {None, "gemma4_text", "gemma4", "llama", "qwen3"}


def test_a_config_json_is_read_by_the_family_its_model_type_names():
    llama = {"model_type": "llama", **hf.DECODERS["llama_untied"][1]}
    ck = config_of(llama, "config.json")
    assert type(ck.config) is LlamaConfig and ck.layout == "llama" and ck.rename is None
    qwen = {"model_type": "qwen3", **hf.DECODERS["qwen3"][1]}
    assert type(config_of(qwen, "config.json").config) is Qwen3Config
    with pytest.raises(ConfigError, match=r"model_type 'gpt2' is not supported \(gemma4_text, "
                       r"gemma4, llama, qwen3, or the seed's fields without model_type\)"):
        config_of({"model_type": "gpt2"}, "config.json")
    with pytest.raises(ConfigError, match="model_type \\[1\\] is not supported"):
        config_of({"model_type": [1]}, "config.json")
    with pytest.raises(ConfigError, match="not a model config: dict"):
        family({})


def test_the_command_line_parses_without_the_table():
    # a bad argument is answered at once: the table (which loads torch) is read only when
    # --model is given or help is printed, and never loads triton (the CLI chooses the
    # interpreter after parsing)
    import subprocess
    import sys

    probe = ("import sys; from meganeura.cli import build_parser; import meganeura.cli as c; "
             "build_parser(); assert 'torch' not in sys.modules; "
             "assert 'gemma4-1b' in c.MODEL_CHOICES; assert 'triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", probe], check=True)
