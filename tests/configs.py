"""Small model configs shared by the tests."""

from meganeura.models import PRESETS, Gemma4Config

SMALL = PRESETS["small_test"]

# 2 layers, GQA 4/2, layer 0 sliding (window 5), layer 1 global; q width 48 != hidden 40.
GQA2 = Gemma4Config(vocab_size=61, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=72, head_dim=12,
                    sliding_window_size=5, global_attn_period=2, global_attn_offset=1)

CONFIGS = {"small_test": SMALL, "gqa2": GQA2}
