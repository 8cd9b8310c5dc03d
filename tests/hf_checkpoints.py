"""Tiny random checkpoints written by transformers itself (nothing is downloaded): Gemma-4,
Llama and Qwen3.

Every parameter and buffer that the checkpoint holds is perturbed away from transformers'
initial values (norm weights of ones, layer scalars of one, ...), so a weight read from
the wrong place, or not at all, changes the logits.
"""

import copy
from pathlib import Path

import torch

SLIDING, FULL = "sliding_attention", "full_attention"

# transformers Gemma4TextConfig fields, by test case
CONFIGS = {
    # PLE, KV sharing (a sliding and a full producer), K = V with one global kv head, double-wide
    # MLP on the shared layers, soft-cap, partial RoPE on 32-wide global heads, window 5
    "every_feature": dict(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, num_kv_shared_layers=3,
        use_double_wide_mlp=True, hidden_size_per_layer_input=8, vocab_size_per_layer_input=97,
        sliding_window=5, final_logit_softcapping=30.0,
        layer_types=[SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL, FULL]),
    # E2B's shape: four sliding layers then one full, one kv head, V its own projection
    "e2b_like": dict(
        vocab_size=61, hidden_size=40, intermediate_size=72, num_hidden_layers=10,
        num_attention_heads=4, num_key_value_heads=1, head_dim=12, global_head_dim=24,
        num_kv_shared_layers=4, use_double_wide_mlp=True, hidden_size_per_layer_input=6,
        vocab_size_per_layer_input=61, sliding_window=6, final_logit_softcapping=30.0,
        layer_types=([SLIDING] * 4 + [FULL]) * 2),
    # 31B's shape: no PLE, no sharing, K = V; here also untied, without soft-cap
    "dense": dict(
        vocab_size=53, hidden_size=32, intermediate_size=56, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
        num_global_key_value_heads=1, attention_k_eq_v=True, hidden_size_per_layer_input=0,
        sliding_window=4, final_logit_softcapping=None, tie_word_embeddings=False,
        layer_types=[SLIDING] * 5 + [FULL]),
    # 26B-A4B's shape: 7 experts of 20 (top 3) beside each MLP, K = V, no PLE
    "moe": dict(
        vocab_size=59, hidden_size=40, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
        num_global_key_value_heads=1, attention_k_eq_v=True, hidden_size_per_layer_input=0,
        sliding_window=4, final_logit_softcapping=30.0, layer_types=[SLIDING, SLIDING, FULL],
        enable_moe_block=True, num_experts=7, top_k_experts=3, moe_intermediate_size=20),
    # experts with per-layer inputs and KV sharing: 4 experts of 12, one chosen a token
    "moe_top1": dict(
        vocab_size=43, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=12, global_head_dim=24,
        num_kv_shared_layers=1, hidden_size_per_layer_input=4, vocab_size_per_layer_input=43,
        sliding_window=5, final_logit_softcapping=None, layer_types=[SLIDING, FULL, SLIDING],
        enable_moe_block=True, num_experts=4, top_k_experts=1, moe_intermediate_size=12),
}


# transformers LlamaConfig / Qwen3Config fields, by test case: odd widths, GQA ratios above 1
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
DECODERS = {
    # llama3 scaling whose bands fall inside the head (wavelengths 6.3 kept, 63 interpolated,
    # 628 and 6283 divided by 8), tied lm_head, 5 query heads on one kv head
    "llama3_tied": ("llama", dict(
        vocab_size=67, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters=LLAMA3)),
    # untied lm_head, head_dim 12 apart from hidden / heads (8), 6 heads on 2, plain RoPE
    "llama_untied": ("llama", dict(
        vocab_size=53, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    # per-head q/k norm, head_dim 12 (hidden 36 / 4 heads is 9), 4 heads on 2, untied
    "qwen3": ("qwen3", dict(
        vocab_size=71, hidden_size=36, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}


def _perturb(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.add_(noise * (0.3 if p.dim() == 1 else 0.05))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.add_(torch.randn(b.shape, generator=gen) * 0.3)


def text_model(name: str, seed: int = 0):
    """A Gemma4ForCausalLM of the named config, fp32, every weight perturbed."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(Gemma4TextConfig(**CONFIGS[name])).eval()
    _perturb(model, seed)
    return model


def decoder_model(name: str, seed: int = 0):
    """A LlamaForCausalLM or Qwen3ForCausalLM of the named DECODERS config, fp32, every
    weight perturbed."""
    import transformers

    kind, fields = DECODERS[name]
    prefix = {"llama": "Llama", "qwen3": "Qwen3"}[kind]
    config = getattr(transformers, f"{prefix}Config")(**fields)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    _perturb(model, seed)
    return model


def multimodal_model(name: str, seed: int = 0):
    """A Gemma4ForConditionalGeneration (tiny vision and audio towers) around the named text
    config: its text weights sit under model.language_model."""
    from transformers import (Gemma4AudioConfig, Gemma4Config, Gemma4ForConditionalGeneration,
                              Gemma4VisionConfig)

    torch.manual_seed(seed)
    text = CONFIGS[name]
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    audio = Gemma4AudioConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              output_proj_dims=text["hidden_size"])
    model = Gemma4ForConditionalGeneration(Gemma4Config(text_config=text, vision_config=vision,
                                                        audio_config=audio)).eval()
    _perturb(model, seed)
    return model


def save(model, directory, dtype=torch.float32, shard_size=None) -> None:
    """save_pretrained in the given stored dtype (optionally sharded); the model is unchanged."""
    kw = {"max_shard_size": shard_size} if shard_size else {}
    copy.deepcopy(model).to(dtype).save_pretrained(directory, **kw)


def reload_fp32(model, directory):
    """transformers' own fp32 model of a saved checkpoint (stored bf16 / fp16 values upcast)."""
    return type(model).from_pretrained(directory, dtype=torch.float32).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """transformers' fp32 logits [S, vocab] for one sequence."""
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


def save_tokenizer(directory, vocab_size: int) -> None:
    """A word-level tokenizer.json over the words w0 .. w{vocab-1} (w0 unknown, w1 end of
    sequence as transformers' default eos_token_id 1), split on whitespace."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(Path(directory) / "tokenizer.json"))
