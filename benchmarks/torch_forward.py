"""The seed model as a plain PyTorch forward, written the way a user would for speed.

This is what meganeura is measured against: run eagerly, and under torch.compile.
It uses the same weights dict (graph layout) and the same semantics as the graph:
RMSNorm in fp32, half-split RoPE, GQA through scaled_dot_product_attention (kv heads
repeated so that the flash backend serves causal layers), SwiGLU, residual adds.
Sliding-window layers shorter than the sequence take one of two forms:
- "flex" (the default, the strongest under torch.compile): FlexAttention with a
  sliding-window block mask, so the blocks outside the window are skipped as meganeura
  skips them (GQA without repeating the kv heads);
- "dense": scaled_dot_product_attention with a boolean band mask over every key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x, w, eps):
    # x: [S, D] -> fp32 statistics, result in x's dtype
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def rope_tables(seq: int, head_dim: int, theta: float, device):
    half = head_dim // 2
    inv = theta ** (-2.0 * torch.arange(half, device=device, dtype=torch.float64) / head_dim)
    ang = torch.arange(seq, device=device, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()  # [S, hd/2] each


def rope(x, cos, sin, head_dim):
    # x: [S, heads*hd] -> rotate (d, d + hd/2) pairs of each head
    s = x.shape[0]
    xh = x.float().view(s, -1, head_dim)
    x1, x2 = xh[..., : head_dim // 2], xh[..., head_dim // 2:]
    c, sn = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * sn, x2 * c + x1 * sn], -1).view(s, -1).to(x.dtype)


def make_forward(cfg, seq: int, device, sliding: str = "flex"):
    """Returns forward(weights, token_ids) -> logits [S, vocab] for a fixed sequence length;
    sliding: "flex" or "dense", the form of the sliding-window layers (module docstring)."""
    if sliding not in ("flex", "dense"):
        raise ValueError(f"sliding must be 'flex' or 'dense', got {sliding!r}")
    cos, sin = rope_tables(seq, cfg.head_dim, cfg.rope_theta, device)
    window = cfg.sliding_window_size
    eps, hd = cfg.rms_norm_eps, cfg.head_dim
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    band = block_mask = None
    if window < seq and sliding == "dense":
        i = torch.arange(seq, device=device)
        band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    elif window < seq:
        from torch.nn.attention.flex_attention import create_block_mask

        def in_window(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

        block_mask = create_block_mask(in_window, None, None, seq, seq, device=device)

    def attend(q, k, v, global_layer):
        # [S, H*hd] -> [1, H, S, hd]: 4-D inputs, so SDPA can pick its flash backend
        qh = q.view(1, seq, heads, hd).transpose(1, 2)
        kh = k.view(1, seq, kv, hd).transpose(1, 2)
        vh = v.view(1, seq, kv, hd).transpose(1, 2)
        if block_mask is not None and not global_layer:
            from torch.nn.attention.flex_attention import flex_attention

            # [1, H, S, hd] laid out as such (torch.compile fuses the copy into the producer;
            # the CPU lowering of flex_attention takes no transposed views)
            o = flex_attention(qh.contiguous(), kh.contiguous(), vh.contiguous(),
                               block_mask=block_mask, enable_gqa=heads != kv)
            return o.transpose(1, 2).reshape(seq, heads * hd)
        kh, vh = kh.repeat_interleave(heads // kv, 1), vh.repeat_interleave(heads // kv, 1)
        if global_layer or band is None:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=band)
        return o.transpose(1, 2).reshape(seq, heads * hd)

    def forward(w, token_ids):
        x = w["model.embed_tokens.weight"][token_ids]
        for layer in range(cfg.num_hidden_layers):
            p = f"model.layers.{layer}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            q = h @ w[p + "self_attn.q_proj.weight"]
            k = h @ w[p + "self_attn.k_proj.weight"]
            v = h @ w[p + "self_attn.v_proj.weight"]
            if cfg.use_qk_norm:
                q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
                k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
            q, k = rope(q, cos, sin, hd), rope(k, cos, sin, hd)
            a = attend(q, k, v, cfg.is_global_layer(layer))
            x = x + a @ w[p + "self_attn.o_proj.weight"]
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            g = h @ w[p + "mlp.gate_proj.weight"]
            u = h @ w[p + "mlp.up_proj.weight"]
            x = x + (F.silu(g) * u) @ w[p + "mlp.down_proj.weight"]
        x = rms_norm(x, w["model.norm.weight"], eps)
        return x @ w["lm_head.weight"]

    return forward
