"""Llama and Qwen3 from checkpoint directories written by transformers: logits equal
transformers' fp32 logits and greedy generation equals its generate, token for token, every
kernel generated from the extracted plan (the interpreter); configs read in both forms,
unsupported ones refused by field; the command line on a checkpoint and on the presets."""

import json
import os
import re

import pytest
import torch

import hf_checkpoints as hf
import meganeura
from meganeura.errors import ConfigError, InputError
from meganeura.models import PRESETS, LlamaConfig, Qwen3Config, build
from meganeura.models.llama import from_dict as llama_config
from meganeura.models.qwen3 import from_dict as qwen3_config
from meganeura.runtime.check import relative_error
from meganeura.runtime.reference import run_reference
from numerics import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _ids(vocab, n, seed):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> (transformers' model, its saved directory), each written once."""
    made = {}

    def get(name):
        if name not in made:
            model = hf.decoder_model(name, seed=3)
            d = tmp_path_factory.mktemp(name)
            hf.save(model, d)
            made[name] = model, d
        return made[name]

    return get


@pytest.mark.parametrize("name", sorted(hf.DECODERS))
def test_logits_match_transformers(checkpoint, kernels, name):
    model, d = checkpoint(name)
    ours = meganeura.from_pretrained(d, device="cpu", cache_dir=kernels)
    kind, fields = hf.DECODERS[name]
    assert ours.checkpoint.layout == kind
    assert type(ours.config) is {"llama": LlamaConfig, "qwen3": Qwen3Config}[kind]
    ids = _ids(fields["vocab_size"], 13, 1)
    assert_close(ours(ids), hf.logits(model, ids), "fp32")
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    stored = set(model.state_dict()) - tied
    assert set(ours.weights) == stored  # every weight read, a tied lm_head from the embedding


def test_llama3_scaling_is_what_the_logits_need(checkpoint):
    # positions up to 12 with original_max_position_embeddings 64: the interpolated and divided
    # frequencies turn far enough that plain RoPE lands well outside the tolerance
    model, d = checkpoint("llama3_tied")
    ours = meganeura.from_pretrained(d, device="cpu")
    assert ours.config.rope_scaling == (8.0, 1.0, 4.0, 64)
    plain = LlamaConfig(**{**ours.config.__dict__, "rope_scaling": (1.0, 1.0, 4.0, 8192)})
    ids = _ids(67, 13, 2)
    (out,) = run_reference(build(plain, 13), ours.weights, {"token_ids": ids})
    assert relative_error(out, hf.logits(model, ids)) > 1e-3


def test_greedy_generation_equals_transformers(checkpoint, kernels):
    # (Qwen3's: through the command line, below)
    name = "llama3_tied"
    model, d = checkpoint(name)
    ours = meganeura.from_pretrained(d, device="cpu", cache_dir=kernels)
    prompt = _ids(hf.DECODERS[name][1]["vocab_size"], 6, 4)
    steps = []
    out = ours.generator.generate(prompt, 4, meganeura.inference.generation.SamplingParams(),
                                  stop=[], on_logits=lambda x: steps.append(x.clone()))
    with torch.no_grad():
        ref = model.generate(prompt[None], max_new_tokens=4, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0]
    assert out.tolist() == ref.tolist()
    full = hf.logits(model, out[:-1])  # each step's logits: the full forward's row
    for k, logits in enumerate(steps):
        assert_close(logits, full[prompt.numel() - 1 + k], "fp32")


def test_end_of_sequence_ids_and_the_position_limit(checkpoint):
    _, d = checkpoint("llama3_tied")
    ours = meganeura.from_pretrained(d, device="cpu")
    assert ours.eos_token_ids == (2,)  # LlamaConfig's default, in generation_config.json
    with pytest.raises(InputError, match="need 129 positions, the model has 128"):
        ours.generate(torch.tensor([1, 2, 3]), max_new_tokens=126)
    assert ours.generator.sessions == []


LLAMA3 = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_type": "llama3"}
RELEASED_1B = {  # Llama-3.2-1B's config.json as released
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": LLAMA3, "rope_theta": 500000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256}


def test_released_and_transformers_5_config_forms_agree():
    released = llama_config(RELEASED_1B)
    assert released == PRESETS["llama_3_2_1b"]
    v5 = {k: v for k, v in RELEASED_1B.items() if k not in ("rope_scaling", "rope_theta")}
    assert llama_config(v5 | {"rope_parameters": {**LLAMA3, "rope_theta": 500000.0}}) == released
    legacy = {**LLAMA3, "type": "llama3"}  # older configs spell rope_type as type
    del legacy["rope_type"]
    assert llama_config(RELEASED_1B | {"rope_scaling": legacy}) == released
    plain = llama_config(RELEASED_1B | {"rope_scaling": None})
    assert plain.rope_theta == 500000.0 and plain.rope_attrs == {}
    # without head_dim: hidden / heads; a scaling without original_max_position_embeddings
    # takes max_position_embeddings, as transformers does
    bare = {k: v for k, v in RELEASED_1B.items() if k != "head_dim"}
    scaling = {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}
    c = llama_config(bare | {"rope_scaling": scaling})
    assert c.head_dim == 64 and c.rope_scaling == (32.0, 1.0, 4.0, 131072)
    # transformers' own config.json (rope_parameters), as save_pretrained writes it
    q = qwen3_config(json.loads(hf_config_json("qwen3")))
    assert (q.head_dim, q.rope_theta, q.num_key_value_heads) == (12, 1e6, 2)


def hf_config_json(name: str) -> str:
    import transformers

    kind, fields = hf.DECODERS[name]
    cls = getattr(transformers, {"llama": "LlamaConfig", "qwen3": "Qwen3Config"}[kind])
    return cls(**fields).to_json_string()


@pytest.mark.parametrize("kind, field, value, message", [
    ("llama", "attention_bias", True, "attention_bias is True: biased attention projections"),
    ("llama", "mlp_bias", True, "mlp_bias is True: biased MLP projections"),
    ("llama", "hidden_act", "gelu", "hidden_act must be silu"),
    ("llama", "rope_scaling", {"rope_type": "yarn", "factor": 4.0},
     "rope_scaling has rope_type 'yarn', which is not supported"),
    ("llama", "rope_parameters", {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4},
     "rope_parameters low_freq_factor must be a positive number, got None"),
    ("llama", "rope_parameters", {**LLAMA3, "low_freq_factor": 4.0},
     "rope_parameters (llama3) needs low_freq_factor < high_freq_factor"),
    ("llama", "partial_rotary_factor", 0.5, "partial_rotary_factor 0.5: partial RoPE"),
    ("llama", "num_key_value_heads", 4, "num_key_value_heads (4) must divide"),
    ("llama", "hidden_size", "40", "hidden_size must be a positive integer"),
    ("llama", "rope_parameters", {"rope_type": "default", "rope_theta": -1.0},
     "rope_parameters rope_theta must be a positive number, got -1.0"),
    ("llama", "tie_word_embeddings", "yes", "tie_word_embeddings must be true or false"),
    ("qwen3", "use_sliding_window", True, "use_sliding_window is True: sliding-window layers"),
    ("qwen3", "attention_bias", True, "attention_bias is True"),
    ("qwen3", "head_dim", 11, "head_dim must be even"),
])
def test_unsupported_or_bad_config_names_the_field(tmp_path, kind, field, value, message):
    name = {"llama": "llama3_tied", "qwen3": "qwen3"}[kind]
    fields = {k: v for k, v in hf.DECODERS[name][1].items() if k != "head_dim" or kind == "qwen3"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": kind, **fields, field: value}))
    with pytest.raises(ConfigError, match=re.escape(f"config field {message}")):
        meganeura.from_pretrained(tmp_path, device="cpu")


def test_cli_compiles_and_runs_a_checkpoint(checkpoint):
    from test_cli import cli

    model, d = checkpoint("llama3_tied")
    rc, out, err = cli("compile", "--weights", str(d), "--run", "--tokens", "5,1,7,3,2,9,60")
    assert rc == 0, err
    assert "checkpoint: Llama decoder (llama)" in out
    assert "Llama, 2 layers, hidden 40, heads 5/1 x 8, ffn 72, vocab 67, RoPE theta 10000 with " \
           "llama3 scaling (factor 8, frequency factors 1-4, original 64 positions), tied " \
           "lm_head, 128 positions" in out
    assert "names and shapes match" in out and "top tokens at position 6" in out
    err_line = next(line for line in out.splitlines() if line.startswith("relative error"))
    assert float(err_line.split(": ")[1]) <= 1e-4


def test_cli_generates_from_a_checkpoint(checkpoint):
    from test_cli import cli

    model, d = checkpoint("qwen3")
    rc, out, err = cli("generate", "--weights", str(d), "--tokens", "4,8,15,16,23,42",
                       "--max-new-tokens", "3", "--stop", "0")
    assert rc == 0, err
    with torch.no_grad():  # greedy, token for token
        ref = model.generate(torch.tensor([[4, 8, 15, 16, 23, 42]]), max_new_tokens=3,
                             do_sample=False, eos_token_id=0, pad_token_id=0)[0]
    assert f"ids: {','.join(map(str, ref.tolist()))}" in out.splitlines()


def test_cli_compiles_a_preset_without_weights():
    from test_cli import cli

    rc, out, err = cli("compile", "--model", "llama-3.1-8b", "--seq-len", "2048")
    assert rc == 0, err
    assert "model llama-3.1-8b: Llama, 32 layers, hidden 4096, heads 32/8 x 128, ffn 14336, " \
           "vocab 128256, RoPE theta 500000 with llama3 scaling (factor 8, frequency factors " \
           "1-4, original 8192 positions), untied lm_head, 131072 positions" in out
    assert "parameters: 8,030,261,248 in 291 tensors" in out
    assert "fusions chosen: " in out and "estimated time: " in out
    assert "top tokens" not in out and "\nweights:" not in out  # nothing materialized


def test_the_presets_have_the_published_shapes():
    from meganeura.models import family, num_parameters, weight_specs

    q = PRESETS["qwen3_8b"]
    assert family(q).summary(q) == (
        "Qwen3, 36 layers, hidden 4096, heads 32/8 x 128 with per-head q/k norm, ffn 12288, "
        "vocab 151936, RoPE theta 1e+06, untied lm_head, 40960 positions")
    small = PRESETS["llama_3_2_1b"]
    assert small.tie_word_embeddings and small.rope_scaling == (32.0, 1.0, 4.0, 8192)
    assert "lm_head.weight" not in weight_specs(small)  # tied: the embedding is the lm_head
    # Llama-3.2-1B 1.24e9, Llama-3.1-8B 8.03e9, Qwen3-8B 8.19e9 parameters, as published
    assert [num_parameters(PRESETS[k]) for k in ("llama_3_2_1b", "llama_3_1_8b", "qwen3_8b")] \
        == [1_235_814_400, 8_030_261_248, 8_190_735_360]


@pytest.mark.parametrize("name", ["llama3_tied", "qwen3"])
def test_save_pretrained_loads_in_transformers_with_equal_logits(checkpoint, kernels, name,
                                                                  tmp_path):
    from transformers import AutoModelForCausalLM

    import shutil

    model, shared = checkpoint(name)
    d = shutil.copytree(shared, tmp_path / "ck")
    (d / "tokenizer.json").write_text("{}")  # a side file, copied as it is
    ours = meganeura.from_pretrained(d, device="cpu", cache_dir=kernels)
    out = ours.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(ours.config.vocab_size, 9, 2)
    assert_close(hf.logits(back, ids), hf.logits(model, ids), "fp32-exact")
    # a directory that holds something is replaced only when asked, and whole
    with pytest.raises(ConfigError, match="is not empty: pass overwrite=True"):
        ours.save_pretrained(out)
    ours.save_pretrained(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "saved"]  # no temporary left


def test_save_pretrained_of_a_config_writes_the_familys_config(kernels, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = qwen3_config(dict(hf.DECODERS["qwen3"][1]))
    ours = meganeura.from_config(cfg, device="cpu", cache_dir=kernels, seed=4)
    out = ours.save_pretrained(tmp_path / "q")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(cfg.vocab_size, 7, 3)
    assert_close(ours(ids), hf.logits(back, ids), "fp32")
    again = meganeura.from_pretrained(out, device="cpu", cache_dir=kernels)
    assert again.config == cfg and torch.equal(again(ids), ours(ids))


def _hub_cache(tmp_path, shared, repo="org--tiny-llama"):
    """A Hugging Face cache holding one snapshot, laid out as huggingface_hub lays it out:
    the snapshot's files are links into the repository's blobs/."""
    import hashlib

    root = tmp_path / "hub" / f"models--{repo}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    snap = root / "snapshots" / rev
    (root / "blobs").mkdir()
    snap.mkdir(parents=True)
    for f in sorted(shared.iterdir()):
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return tmp_path / "hub", snap


def test_a_model_id_loads_from_the_hugging_face_cache(tmp_path, monkeypatch, kernels):
    import hf_checkpoints

    model = hf.decoder_model("llama_untied", seed=5)
    d = tmp_path / "saved"
    hf_checkpoints.save(model, d, shard_size="20KB")  # sharded, with an index
    assert (d / "model.safetensors.index.json").exists()
    cache, snap = _hub_cache(tmp_path, d)
    assert all(p.is_symlink() for p in snap.iterdir())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    ours = meganeura.from_pretrained("org/tiny-llama", device="cpu", cache_dir=kernels)
    ids = _ids(ours.config.vocab_size, 7, 4)
    assert_close(ours(ids), hf.logits(model, ids), "fp32")
    with pytest.raises(meganeura.errors.WeightsError, match=r"org/absent is neither a directory "
                       r"nor a model in the Hugging Face cache .*nothing is downloaded"):
        meganeura.from_pretrained("org/absent", device="cpu", cache_dir=kernels)
    # a snapshot file that links outside the snapshot and its blobs is still refused
    shard = next(p for p in sorted(snap.iterdir()) if p.name.startswith("model-"))
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(meganeura.errors.WeightsError, match="which is not a file inside"):
        meganeura.from_pretrained("org/tiny-llama", device="cpu", cache_dir=kernels)


TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}w5 "
            "{% else %}w6 {% endif %}{{ m['content'] | trim }} w7 {% endfor %}"
            "{% if add_generation_prompt %}w6 {% endif %}")


@pytest.mark.parametrize("where", ["tokenizer_config", "jinja_file"])
def test_chat_ids_equal_transformers_apply_chat_template(checkpoint, kernels, tmp_path, where):
    import shutil

    from test_cli import cli
    from transformers import PreTrainedTokenizerFast

    from meganeura.inference.chat import chat_ids, load_template, render

    from tokenizers import AddedToken, Tokenizer

    model, shared = checkpoint("llama3_tied")
    d = shutil.copytree(shared, tmp_path / "ck")
    hf.save_tokenizer(d, model.config.vocab_size)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))  # its special tokens, as checkpoints
    tok.add_special_tokens([AddedToken("w2", special=True), AddedToken("w4", special=True)])
    tok.save(str(d / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "w2", "eos_token": "w4"}
    if where == "jinja_file":
        (d / "chat_template.jinja").write_text(TEMPLATE)
    else:
        config["chat_template"] = [{"name": "default", "template": TEMPLATE},
                                   {"name": "tool_use", "template": "w9"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = PreTrainedTokenizerFast.from_pretrained(d)
    messages = [{"role": "user", "content": " w10 w11 "}, {"role": "assistant", "content": "w12"},
                {"role": "user", "content": "w13"}]
    want = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    ours = chat_ids(Tokenizer.from_file(str(d / "tokenizer.json")), d, messages)
    assert ours == want and ours[0] == 2 and ours[-1] == 6
    template, specials = load_template(d)
    assert render(template, messages[:1], specials, add_generation_prompt=False) == \
        "w2w5 w10 w11 w7 "
    if where != "jinja_file":
        return
    # the command line: --chat puts the prompt in the template, then generates from its ids
    rc, out, err = cli("generate", "--weights", str(d), "--prompt", "w10 w11", "--chat",
                       "--max-new-tokens", "2", "--stop", "0", "--cache-dir", str(kernels))
    assert rc == 0, err
    assert "prompt 6 tokens" in out, out  # w2 w5 w10 w11 w7 w6
    # a special token written as an object (older tokenizer configs) reads as its content
    config["bos_token"] = {"content": "w3", "special": True}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_template(d)[1]["bos_token"] == "w3"


def test_chat_command_streams_replies_and_keeps_the_conversation(checkpoint, kernels,
                                                                 tmp_path, monkeypatch):
    import io
    import shutil

    from test_cli import cli

    model, shared = checkpoint("llama3_tied")
    d = shutil.copytree(shared, tmp_path / "ck")
    hf.save_tokenizer(d, model.config.vocab_size)
    (d / "chat_template.jinja").write_text(TEMPLATE)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w2", "eos_token": "w4"}))
    monkeypatch.setattr("sys.stdin", io.StringIO("w10 w11\nw12\n/reset\nw13\n"))
    rc, out, err = cli("chat", "--weights", str(d), "--max-new-tokens", "3", "--stop", "0",
                       "--max-context", "64", "--cache-dir", str(kernels))
    assert rc == 0, err
    turns = [line for line in out.splitlines() if line.startswith("(")]
    assert len(turns) == 3, out
    from tokenizers import Tokenizer

    from meganeura.inference.chat import chat_ids

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    ids = torch.tensor(chat_ids(tok, d, [{"role": "user", "content": "w10 w11"}]))
    # the first turn prefills its ids; the second keeps them and the replies fed back,
    # prefilling what the template adds; after /reset nothing is kept
    assert f"{ids.numel()} prompt tokens prefilled, 0 kept" in turns[0]
    kept = int(turns[1].split(" kept")[0].split(", ")[-1])
    assert kept >= ids.numel() and re.search(r"\b0 kept", turns[2]), turns
    # the first reply: the greedy continuation, as transformers gives it
    with torch.no_grad():
        ref = model.generate(ids[None], max_new_tokens=3, do_sample=False, eos_token_id=0,
                             pad_token_id=0)[0, ids.numel():].tolist()
    assert tok.decode(ref, skip_special_tokens=False) in out


def test_chat_without_a_template_is_one_line(checkpoint, tmp_path):
    import shutil

    from test_cli import cli

    model, shared = checkpoint("llama3_tied")
    d = shutil.copytree(shared, tmp_path / "ck")
    hf.save_tokenizer(d, model.config.vocab_size)
    rc, out, err = cli("generate", "--weights", str(d), "--prompt", "w10", "--chat")
    assert rc == 2 and err.strip().splitlines() == [
        f"error: {d} has no chat template (chat_template.jinja, or chat_template in "
        f"tokenizer_config.json)"]
