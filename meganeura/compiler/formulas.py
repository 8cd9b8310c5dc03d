"""The formula of every op in plain PyTorch: what the reference executor runs and what each
generated kernel must agree with.

Norms, RoPE, activations and softmax compute in fp32 and cast back to the input's dtype;
matmuls run in the input's dtype (fp32 accumulation on every backend).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh")


def rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(mean(x^2) + eps) over the last dim, fp32: [..., 1]."""
    x32 = x.float()
    return torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)


def rms_norm(x, w, eps):
    # x: [S, D], w: [D]; y = x * rsqrt(mean(x^2) + eps) * w
    return (x.float() * rstd(x, eps) * w.float()).to(x.dtype)


def head_rms_norm(x, w, eps, head_dim):
    # x: [S, heads*hd]; each head normalized on its own, w: [hd] shared by the heads (or None)
    s, width = x.shape
    xh = x.view(s, width // head_dim, head_dim)
    y = xh.float() * rstd(xh, eps)
    if w is not None:
        y = y * w.float()
    return y.reshape(s, width).to(x.dtype)


# llama3 frequency scaling (scale_factor, low_freq_factor, high_freq_factor, original_limit);
# a scale_factor of 1 leaves the frequencies as they are
NO_SCALING = (1.0, 1.0, 4.0, 8192)


def inv_freq(theta: float, head_dim: int, rotary: int, scaling=NO_SCALING) -> torch.Tensor:
    """float64 [hd/2]: theta^(-2d/hd) for the first `rotary` frequencies, 0 (no rotation) after;
    then llama3's scaling: wavelengths 2 pi / f above original_limit / low_freq_factor are
    divided by scale_factor, those below original_limit / high_freq_factor kept, and those
    between interpolated by s = (original_limit / wavelength - low) / (high - low):
    f ((1 - s) / scale_factor + s)."""
    d = torch.arange(head_dim // 2, dtype=torch.float64)
    f = torch.where(d < rotary, theta ** (-2.0 * d / head_dim), torch.zeros_like(d))
    factor, low, high, original = scaling
    if factor == 1.0:
        return f
    wavelen = 2 * math.pi / f  # inf where f = 0: divided by the factor, still 0
    s = (original / wavelen - low) / (high - low)
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    scaled = torch.where(wavelen > original / low, f / factor, f)
    return torch.where(medium, (1 - s) * f / factor + s * f, scaled)


def rope_tables(positions: torch.Tensor, theta: float, head_dim: int, rotary: int,
                scaling=NO_SCALING):
    """cos and sin of pos * inv_freq, fp32 [S, hd/2], computed in float64 (fp32 angles in the
    thousands of radians lose digits)."""
    ang = positions.to(torch.float64)[:, None] * inv_freq(theta, head_dim, rotary, scaling)[None, :]
    return ang.cos().float(), ang.sin().float()


def rope_frequencies(theta: float, head_dim: int, rotary: int, scaling=NO_SCALING) -> torch.Tensor:
    """float64 [hd/2 + 2]: inv_freq, then pi and 1 / pi (the kernels' angle reduction)."""
    return torch.cat([inv_freq(theta, head_dim, rotary, scaling),
                      torch.tensor([math.pi, 1 / math.pi], dtype=torch.float64)])


def rope(x, theta, head_dim, rotary, positions=None, scaling=NO_SCALING):
    # x: [S, heads*hd] at positions [S] (default 0 .. S-1); pair d with d + hd/2 in each head
    s, width = x.shape
    half = head_dim // 2
    pos = torch.arange(s) if positions is None else positions.cpu().long()
    cos, sin = (t.to(x.device)[:, None, :]
                for t in rope_tables(pos, theta, head_dim, rotary, scaling))
    xh = x.float().view(s, width // head_dim, head_dim)
    x1, x2 = xh[..., :half], xh[..., half:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.reshape(s, width).to(x.dtype)


def attention(q, k, v, num_heads, num_kv_heads, head_dim, scale, window=None):
    # q: [S, H*hd], k/v: [S, KV*hd]; query head h reads kv head h // (H / KV)
    s = q.shape[0]
    group = num_heads // num_kv_heads
    qh = q.view(s, num_heads, head_dim).transpose(0, 1)  # [H, S, hd]
    kh = k.view(s, num_kv_heads, head_dim).transpose(0, 1)
    vh = v.view(s, num_kv_heads, head_dim).transpose(0, 1)
    i = torch.arange(s, device=q.device)[:, None]
    j = torch.arange(s, device=q.device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    out = torch.empty_like(qh)
    for g in range(num_kv_heads):  # one kv head at a time bounds the [group, S, S] scores
        qg = qh[g * group:(g + 1) * group].float()
        scores = (qg @ kh[g].float().T) * scale
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[g * group:(g + 1) * group] = (p @ vh[g].float()).to(q.dtype)
    return out.transpose(0, 1).reshape(s, num_heads * head_dim)


def activation(x32: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(x32)
    if act == "gelu_tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return F.gelu(x32, approximate="tanh")
    raise ValueError(f"unknown activation {act!r}")


def glu(gate, up, act):
    # act(gate) * up, fp32
    return (activation(gate.float(), act) * up.float()).to(gate.dtype)


def halves(t):
    n = t.shape[1] // 2
    return t[:, :n], t[:, n:]


def softcap(x, cap):
    # cap * tanh(x / cap)
    return (torch.tanh(x.float() / cap) * cap).to(x.dtype)


def scale(x, factor):
    return (x.float() * factor).to(x.dtype)


def scale_by(x, s):
    # s: [1], a scalar read from the weights
    return (x.float() * s.float()[0]).to(x.dtype)


def cache_write(cache, x, pos, sequences=1):
    # cache: [sequences * slots, width], x: [S, width], pos: [S]. One sequence: pos
    # increasing, a ring of `slots` rows keeps the last `slots` positions, position p at slot
    # p % slots. Several: row i is sequence i's, at slot p % slots of block i
    out = cache.clone()
    slots = cache.shape[0] // sequences
    p = pos.long()
    if sequences > 1:
        out[torch.arange(sequences, device=p.device) * slots + p % slots] = x.to(cache.dtype)
        return out
    keep = p > p[-1] - slots
    out[p[keep] % slots] = x[keep].to(cache.dtype)
    return out


def cache_attention(q, k, v, pos, num_heads, num_kv_heads, head_dim, scale, window=0,
                    sequences=1):
    # q: [S, H*hd], row i at position pos[i]; k/v: [sequences * slots, KV*hd]. Row i attends
    # to its last min(window, slots) positions (window 0: slots) down to 0, position p at
    # slot p % slots of its block (block i with several sequences, else the only one)
    slots = k.shape[0] // sequences
    group = num_heads // num_kv_heads
    rows = []
    for i in range(q.shape[0]):
        p = int(pos[i])
        lo = max(0, p - min(window or slots, slots) + 1)
        base = i * slots if sequences > 1 else 0
        at = base + torch.arange(lo, p + 1, device=k.device) % slots
        n = at.numel()
        qh = q[i].float().view(num_kv_heads, group, head_dim)
        kh = k[at].float().view(n, num_kv_heads, head_dim).transpose(0, 1)  # [KV, n, hd]
        vh = v[at].float().view(n, num_kv_heads, head_dim).transpose(0, 1)
        w = torch.softmax((qh @ kh.transpose(1, 2)) * scale, dim=-1)  # [KV, group, n]
        rows.append((w @ vh).reshape(num_heads * head_dim))
    return torch.stack(rows).to(q.dtype)
