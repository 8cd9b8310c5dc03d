"""The formula of every op in plain PyTorch: what the reference executor runs and what each
generated kernel must agree with.

Norms, RoPE, activations and softmax compute in fp32 (fp64 for fp64 inputs: the gradient
checks) and cast back to the input's dtype; matmuls run in the input's dtype (fp32
accumulation on every backend). The gradients' formulas (`*_grad`) follow the same rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh")


def wide(x: torch.Tensor) -> torch.Tensor:
    """The working precision of x: fp32, or fp64 where x is fp64."""
    return x if x.dtype == torch.float64 else x.float()


def rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(mean(x^2) + eps) over the last dim, fp32: [..., 1]."""
    x32 = wide(x)
    return torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)


def rms_norm(x, w, eps):
    # x: [S, D], w: [D]; y = x * rsqrt(mean(x^2) + eps) * w
    return (wide(x) * rstd(x, eps) * wide(w)).to(x.dtype)


def head_rms_norm(x, w, eps, head_dim):
    # x: [S, heads*hd]; each head normalized on its own, w: [hd] shared by the heads (or None)
    s, width = x.shape
    xh = x.view(s, width // head_dim, head_dim)
    y = wide(xh) * rstd(xh, eps)
    if w is not None:
        y = y * wide(w)
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


def rope_rotation(x, positions, theta, head_dim, rotary, scaling, sign: float):
    """x rotated by sign * pos * inv_freq per head (sign -1: the inverse rotation, the
    gradient), in x's working precision."""
    s, width = x.shape
    half = head_dim // 2
    pos = torch.arange(s) if positions is None else positions.cpu().long()
    ang = pos.to(torch.float64)[:, None] * inv_freq(theta, head_dim, rotary, scaling)[None, :]
    work = wide(x).dtype
    cos = ang.cos().to(device=x.device, dtype=work)[:, None, :]
    sin = (sign * ang.sin()).to(device=x.device, dtype=work)[:, None, :]
    xh = wide(x).view(s, width // head_dim, head_dim)
    x1, x2 = xh[..., :half], xh[..., half:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.reshape(s, width).to(x.dtype)


def rope_frequencies(theta: float, head_dim: int, rotary: int, scaling=NO_SCALING) -> torch.Tensor:
    """float64 [hd/2 + 2]: inv_freq, then pi and 1 / pi (the kernels' angle reduction)."""
    return torch.cat([inv_freq(theta, head_dim, rotary, scaling),
                      torch.tensor([math.pi, 1 / math.pi], dtype=torch.float64)])


def rope(x, theta, head_dim, rotary, positions=None, scaling=NO_SCALING):
    # x: [S, heads*hd] at positions [S] (default 0 .. S-1); pair d with d + hd/2 in each head
    return rope_rotation(x, positions, theta, head_dim, rotary, scaling, 1.0)


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
        qg = wide(qh[g * group:(g + 1) * group])
        scores = (qg @ wide(kh[g]).T) * scale
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[g * group:(g + 1) * group] = (p @ wide(vh[g])).to(q.dtype)
    return out.transpose(0, 1).reshape(s, num_heads * head_dim)


def activation(x32: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(x32)
    if act == "gelu_tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return F.gelu(x32, approximate="tanh")
    raise ValueError(f"unknown activation {act!r}")


def glu(gate, up, act):
    # act(gate) * up, fp32
    return (activation(wide(gate), act) * wide(up)).to(gate.dtype)


def halves(t):
    n = t.shape[1] // 2
    return t[:, :n], t[:, n:]


def softcap(x, cap):
    # cap * tanh(x / cap)
    return (torch.tanh(wide(x) / cap) * cap).to(x.dtype)


def scale(x, factor):
    return (wide(x) * factor).to(x.dtype)


def scale_by(x, s):
    # s: [1], a scalar read from the weights
    return (wide(x) * wide(s)[0]).to(x.dtype)


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
        qh = wide(q[i]).view(num_kv_heads, group, head_dim)
        kh = wide(k[at]).view(n, num_kv_heads, head_dim).transpose(0, 1)  # [KV, n, hd]
        vh = wide(v[at]).view(n, num_kv_heads, head_dim).transpose(0, 1)
        w = torch.softmax((qh @ kh.transpose(1, 2)) * scale, dim=-1)  # [KV, group, n]
        rows.append((w @ vh).reshape(num_heads * head_dim))
    return torch.stack(rows).to(q.dtype)


# ---- gradients (the backward ops' formulas), in the working precision of their inputs -------


def activation_grad(x: torch.Tensor, act: str) -> torch.Tensor:
    """d act(x) / dx of a working-precision x."""
    if act == "silu":  # silu(x) = x sigmoid(x)
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if act == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (x + 0.044715 * x ** 3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    raise ValueError(f"unknown activation {act!r}")


def glu_grad_gate(dy, gate, up, act):
    return (wide(dy) * wide(up) * activation_grad(wide(gate), act)).to(dy.dtype)


def glu_grad_up(dy, gate, act):
    return (wide(dy) * activation(wide(gate), act)).to(dy.dtype)


def softcap_grad(dy, x, cap):
    t = torch.tanh(wide(x) / cap)
    return (wide(dy) * (1 - t * t)).to(dy.dtype)


def norm_grad(dy, x, w, eps, head_dim):
    # y = x r w per head, r = rsqrt(mean(x^2) + eps): dx = r (g - x^ mean(g x^)), g = dy w
    s, width = x.shape
    xh = wide(x).view(s, width // head_dim, head_dim)
    g = wide(dy).view(s, width // head_dim, head_dim)
    if w is not None:
        g = g * wide(w)
    r = rstd(xh, eps)
    xhat = xh * r
    dx = r * (g - xhat * (g * xhat).mean(dim=-1, keepdim=True))
    return dx.reshape(s, width).to(dy.dtype)


def norm_wgrad(dy, x, eps, head_dim):
    # dw = sum over rows and heads of dy x^: [head_dim]
    s, width = x.shape
    xh = wide(x).view(s, width // head_dim, head_dim)
    g = wide(dy).view(s, width // head_dim, head_dim)
    return (g * xh * rstd(xh, eps)).sum(dim=(0, 1))  # fp32 (fp64 for fp64 inputs)


def rope_grad(dy, theta, head_dim, rotary, positions, scaling=NO_SCALING):
    # a rotation's transpose is the rotation by the opposite angle
    return rope_rotation(dy, positions, theta, head_dim, rotary, scaling, -1.0)


def attention_grad(q, k, v, dy, num_heads, num_kv_heads, head_dim, scale, window=0):
    # [dq | dk | dv]: P = softmax(scale q k^T) masked, dV = P^T dO, dP = dO V^T,
    # dS = P (dP - rowsum(dP P)), dQ = scale dS K, dK = scale dS^T Q (summed over the group)
    s = q.shape[0]
    group = num_heads // num_kv_heads
    split = (lambda t, h: wide(t).view(s, h, head_dim).transpose(0, 1))
    qh, kh, vh, dh = (split(q, num_heads), split(k, num_kv_heads), split(v, num_kv_heads),
                      split(dy, num_heads))
    i = torch.arange(s, device=q.device)[:, None]
    j = torch.arange(s, device=q.device)[None, :]
    allowed = (j <= i) & ((j > i - window) if window else True)
    dq, dk, dv = torch.empty_like(qh), torch.empty_like(kh), torch.empty_like(vh)
    for g in range(num_kv_heads):
        rows = slice(g * group, (g + 1) * group)
        scores = (qh[rows] @ kh[g].T) * scale  # [group, S, S]
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        dv[g] = (p.transpose(1, 2) @ dh[rows]).sum(0)
        dp = dh[rows] @ vh[g].T
        ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
        dq[rows] = scale * (ds @ kh[g])
        dk[g] = scale * (ds.transpose(1, 2) @ qh[rows]).sum(0)
    heads = (lambda t: t.transpose(0, 1).reshape(s, -1))
    return torch.cat([heads(dq), heads(dk), heads(dv)], dim=1).to(dy.dtype)


def embedding_grad(ids, dy, vocab, padding=-1):
    # the rows' gradients summed into the rows of the table they were gathered from; rows
    # of the padding token add nothing
    out = torch.zeros(vocab, dy.shape[1], dtype=wide(dy).dtype, device=dy.device)
    out.index_add_(0, ids.long(), wide(dy) * (ids.long() != padding)[:, None])
    return out  # fp32 (fp64 for fp64 inputs)


def matmul_tn(a, b):
    # a^T b summed in the working precision, kept there (fp32: a weight's gradient)
    return wide(a).T @ wide(b)


def place_cols(x, start, width):
    out = torch.zeros(x.shape[0], width, dtype=x.dtype, device=x.device)
    out[:, start:start + x.shape[1]] = x
    return out


def place_add_cols(acc, x, start):
    out = acc.clone()
    out[:, start:start + x.shape[1]] += x.to(acc.dtype)
    return out


IGNORE_INDEX = -100  # a label counted nowhere (transformers' ignore_index)


def cross_entropy(logits, labels, cap=0.0):
    # [S, 1]: each counted row's (label != -100) logsumexp(row) - row[label], 0 on the
    # others; the mean sums them and divides by the count outside (it spans micro-batches).
    # cap > 0: of the rows soft-capped
    z = wide(logits)
    z = torch.tanh(z / cap) * cap if cap else z
    lab = labels.long()
    counted = lab != IGNORE_INDEX
    pick = z.gather(1, torch.where(counted, lab, 0)[:, None])[:, 0]
    return ((torch.logsumexp(z, dim=1) - pick) * counted)[:, None]


def cross_entropy_grad(logits, labels, d, cap=0.0):
    # d [S, 1]: d (softmax(row) - onehot(label)) on counted rows, 0 on the others; cap > 0:
    # of the soft-capped rows, times the cap's derivative 1 - tanh(z / cap)^2
    z = wide(logits)
    t = torch.tanh(z / cap) if cap else None
    z = t * cap if cap else z
    lab = labels.long()
    counted = lab != IGNORE_INDEX
    g = torch.softmax(z, dim=1)
    g[counted, lab[counted]] -= 1
    g = g * counted[:, None] * wide(d)
    return (g * (1 - t * t) if cap else g).to(logits.dtype)


def _linear_logits(h, w, cap):
    z = wide(h) @ wide(w).T
    return torch.tanh(z / cap) * cap if cap else z


def linear_cross_entropy(h, w, labels, cap=0.0):
    # cross_entropy(softcap(h @ w^T)) without a logits tensor in the plan: [S, 1], fp32
    return cross_entropy(_linear_logits(h, w, cap), labels)


def linear_cross_entropy_stats(h, w, labels, cap=0.0):
    # [S, 2] fp32: each row's loss and the logits' logsumexp
    z = _linear_logits(h, w, cap)
    return torch.cat([cross_entropy(z, labels), torch.logsumexp(z, dim=-1, keepdim=True)], 1)


def _linear_dz(h, w, labels, d, lse, cap):
    # d logits from the given logsumexp: d (exp(z - lse) - onehot), 0 on ignored rows
    z = _linear_logits(h, w, cap)
    p = torch.exp(z - wide(lse))
    lab = labels.long()
    counted = lab != IGNORE_INDEX
    onehot = torch.zeros_like(p)
    onehot[torch.arange(len(lab), device=p.device)[counted], lab[counted]] = 1.0
    dz = (p - onehot) * wide(d) * counted[:, None]
    return dz * (1 - (z / cap) ** 2) if cap else dz


def linear_cross_entropy_grad_h(h, w, labels, d, lse, cap=0.0):
    return _linear_dz(h, w, labels, d, lse, cap) @ wide(w)


def linear_cross_entropy_dh(h, w, labels, d, cap=0.0):
    # [S, H + 2] fp32: d h, then each row's loss and logsumexp
    stats = linear_cross_entropy_stats(h, w, labels, cap)
    dh = linear_cross_entropy_grad_h(h, w, labels, d, stats[:, 1:], cap)
    return torch.cat([dh, stats], 1)


def linear_cross_entropy_grad_w(h, w, labels, d, lse, cap=0.0):
    return _linear_dz(h, w, labels, d, lse, cap).T @ wide(h)


# ---- mixture of experts ---------------------------------------------------------------------
# A token's route is one fp32 row [w_0 .. w_{k-1} | e_0 .. e_{k-1}]: the k chosen experts'
# weights, then their indices (exact as floats below 2^24), highest probability first.


def moe_route(logits, expert_scale, top_k):
    """softmax over every expert in fp32, the top_k kept and renormalized to sum 1, times the
    chosen experts' `expert_scale`: [rows, 2 top_k] fp32. Ties go to the lower index (a
    stable descending sort), a rule the kernels keep on every device."""
    p = torch.softmax(wide(logits), dim=-1)
    w, idx = torch.sort(p, dim=-1, descending=True, stable=True)
    w, idx = w[:, :top_k], idx[:, :top_k]
    w = w / w.sum(dim=-1, keepdim=True) * wide(expert_scale)[idx]
    return torch.cat([w, idx.to(w.dtype)], dim=1)


def route_parts(route) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [rows, k] fp32, expert indices [rows, k] int64) of a route."""
    k = route.shape[1] // 2
    return wide(route[:, :k]), route[:, k:].long()


def expert_rows(x, route) -> torch.Tensor:
    """x's row read by each (token, slot) pair, pairs in token-major order: x's rows are the
    tokens (each read by its k slots) or already the pairs."""
    k = route.shape[1] // 2
    return x.repeat_interleave(k, dim=0) if x.shape[0] == route.shape[0] else x


def expert_matmul(x, route, w):
    """Row p = (token t, slot j) of the output: x's row of the pair @ w[e_tj]^T, w [E, N, K]
    stored as a checkpoint's linear weights: [tokens * k, N]. One product per expert used,
    over the pairs routed to it."""
    _, idx = route_parts(route)
    rows, flat = expert_rows(x, route), idx.reshape(-1)
    out = torch.zeros(rows.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    for e in flat.unique().tolist():
        at = (flat == e).nonzero().squeeze(1)
        out[at] = rows[at] @ w[e].to(x.dtype).T
    return out


def expert_glu(x, route, w, act):
    """act(gate) * up of each pair's expert product, w = [gate | up] by rows: [tokens * k,
    N / 2]."""
    g, u = halves(expert_matmul(x, route, w))
    return glu(g, u, act)


def expert_combine(y, route):
    """Each token's k pair rows of y summed with their route weights: [tokens, N]."""
    wts, _ = route_parts(route)
    k = wts.shape[1]
    return (wide(y).reshape(-1, k, y.shape[1]) * wts[:, :, None]).sum(dim=1).to(y.dtype)


def expert_matmul_combine(a, route, w):
    """expert_combine(expert_matmul(a, route, w), route) in one pass, the products' sum in
    fp32 (not rounded between): [tokens, N]."""
    wts, _ = route_parts(route)
    k = wts.shape[1]
    parts = expert_matmul(wide(a), route, wide(w))
    return (parts.reshape(-1, k, parts.shape[1]) * wts[:, :, None]).sum(dim=1).to(a.dtype)
