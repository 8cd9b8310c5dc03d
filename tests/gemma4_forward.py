"""An independent forward of the seed's Gemma-4, written from its formulas (docs/design.md).

It shares no code with meganeura's reference executor: RoPE is a complex rotation,
attention goes through scaled_dot_product_attention with an explicit boolean mask
and repeated kv heads, RMSNorm is written out inline.
"""

import math

import torch
import torch.nn.functional as F


def _norm(x, w, eps):
    return x * (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * w


def _rotate(x, theta, head_dim):
    # the pair (x[d], x[d + hd/2]) of each head is the complex number x[d] + i x[d + hd/2]
    s = x.shape[0]
    half = head_dim // 2
    xh = x.reshape(s, -1, head_dim)
    z = torch.complex(xh[..., :half].double(), xh[..., half:].double())
    freqs = torch.tensor([theta ** (-2 * d / head_dim) for d in range(half)], dtype=torch.float64)
    phase = torch.polar(torch.ones(s, half, dtype=torch.float64),
                        torch.arange(s, dtype=torch.float64)[:, None] * freqs)
    z = z * phase[:, None, :]
    return torch.cat([z.real, z.imag], -1).reshape(s, -1).to(x.dtype)


def _attend(q, k, v, cfg, window):
    s, hd = q.shape[0], cfg.head_dim
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    qh = q.reshape(s, heads, hd).permute(1, 0, 2)
    kh = k.reshape(s, kv_heads, hd).permute(1, 0, 2).repeat_interleave(heads // kv_heads, 0)
    vh = v.reshape(s, kv_heads, hd).permute(1, 0, 2).repeat_interleave(heads // kv_heads, 0)
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    if window is not None:
        mask &= ~torch.ones(s, s, dtype=torch.bool).tril(-window)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=1 / math.sqrt(hd))
    return out.permute(1, 0, 2).reshape(s, heads * hd)


def forward(cfg, w, token_ids):
    """Logits [S, vocab] of the seed model; `w` holds graph-layout ([in, out]) weights."""
    eps = cfg.rms_norm_eps
    x = w["model.embed_tokens.weight"][token_ids.long()]
    for i in range(cfg.num_hidden_layers):
        p = lambda n: w[f"model.layers.{i}.{n}.weight"]  # noqa: E731
        h = _norm(x, p("input_layernorm"), eps)
        q, k, v = h @ p("self_attn.q_proj"), h @ p("self_attn.k_proj"), h @ p("self_attn.v_proj")
        if cfg.use_qk_norm:
            q, k = _norm(q, p("self_attn.q_norm"), eps), _norm(k, p("self_attn.k_norm"), eps)
        q, k = _rotate(q, cfg.rope_theta, cfg.head_dim), _rotate(k, cfg.rope_theta, cfg.head_dim)
        window = None if cfg.is_global_layer(i) else cfg.sliding_window_size
        x = x + _attend(q, k, v, cfg, window) @ p("self_attn.o_proj")
        h = _norm(x, p("post_attention_layernorm"), eps)
        x = x + (F.silu(h @ p("mlp.gate_proj")) * (h @ p("mlp.up_proj"))) @ p("mlp.down_proj")
    return _norm(x, w["model.norm.weight"], eps) @ w["lm_head.weight"]
