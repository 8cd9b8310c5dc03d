"""The fused linear + soft-cap + cross-entropy kernels: logits are never stored.

    z = softcap(h @ W^T)                 (softcap optional: cap * tanh(x / cap))
    forward:  lse[t] = logsumexp(z[t, :]),  loss[t] = lse[t] - z[t, label[t]]  (0 where ignored)
              (both strided: the plan's stats op writes them as the two columns of one
              tensor, lse at column LSE_AT of the loss's row)
    dh:       dh[t, :] = sum_v dx[t, v] W[v, :]
    dW:       dW[v, :] = sum_t dx[t, v] h[t, :]
    where dz = scale[t] (softmax(z)[t, v] - [v == label[t]]) on counted rows, and
    dx = dz (1 - (z / cap)^2) through the soft-cap.

The gradient kernels read each row's logsumexp from the forward's. Each kernel walks the
vocabulary in tiles and recomputes the logits tile it needs from h and
W (a K loop over the hidden width): the forward keeps a running max and sum per row (an
online logsumexp) and picks the label's logit as its tile passes; the dh kernel owns a block
of rows and adds each vocabulary tile's contribution into them; the dW kernel owns a tile of
the vocabulary and adds each row block's contribution. Nothing is shared between programs,
so the sums are deterministic. Products accumulate in fp32 (inputs in the plan dtype).

bytes: each kernel reads h and W once per tile pass; FLOPs: 2 T V H per logits recompute
(three of them) plus 2 T V H for each of the two gradient products
"""

from __future__ import annotations

from .common import HEADER, indent, softcap_lines

ENTRY_FORWARD, ENTRY_DH, ENTRY_DW = "ce_forward_kernel", "ce_dh_kernel", "ce_dw_kernel"
IGNORE = -100


def _logits(precision: str) -> str:
    """Lines computing the soft-capped logits tile z [BLOCK_M, BLOCK_V] of rows rm and
    vocabulary ids rv (masks row_ok, v_ok), columns outside the vocabulary at -inf."""
    cap = "\n".join(softcap_lines("z", "cap"))
    return f"""
acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
for k0 in range(0, H, BLOCK_K):
    rk = k0 + tl.arange(0, BLOCK_K)
    k_ok = rk < H
    a = tl.load(h_ptr + rm[:, None] * stride_h + rk[None, :], mask=row_ok[:, None] & k_ok[None, :],
                other=0.0)
    b = tl.load(w_ptr + rv[:, None] * stride_w + rk[None, :], mask=v_ok[:, None] & k_ok[None, :],
                other=0.0)
    acc += tl.dot(a, tl.trans(b), input_precision="{precision}")
z = acc
if HAS_CAP:
{indent(cap, 4)}
z = tl.where(v_ok[None, :], z, float("-inf"))
"""


def _dz() -> str:
    """Lines turning z into dx, the gradient at the logits before the soft-cap."""
    return f"""
p = tl.exp(z - lse[:, None])
dz = p - tl.where(rv[None, :] == lab[:, None], 1.0, 0.0)
dz = tl.where((lab != {IGNORE})[:, None] & v_ok[None, :], dz, 0.0) * scale
if HAS_CAP:
    zc = tl.where(v_ok[None, :], z / cap, 0.0)  # (z is -inf outside the vocabulary)
    dz = dz * (1.0 - zc * zc)
"""


def _add_product(dst: str, dst_ids: str, dst_ok: str, src: str, src_ids: str, src_ok: str,
                 lhs: str, precision: str) -> str:
    """Lines adding lhs @ src[src_ids, :] into dst[dst_ids, :], a BLOCK_K column tile at a
    time: the gradient products (dh = dz W, dW = dz^T h), each program owning its rows."""
    return f"""
for k0 in range(0, H, BLOCK_K):
    rk = k0 + tl.arange(0, BLOCK_K)
    k_ok = rk < H
    x = tl.load({src}_ptr + {src_ids}[:, None] * stride_{src} + rk[None, :],
                mask={src_ok}[:, None] & k_ok[None, :], other=0.0)
    at = {dst}_ptr + {dst_ids}[:, None] * stride_{dst} + rk[None, :]
    mask = {dst_ok}[:, None] & k_ok[None, :]
    acc_k = tl.load(at, mask=mask, other=0.0)
    acc_k += tl.dot({lhs}.to(x.dtype), x, input_precision="{precision}")
    tl.store(at, acc_k, mask=mask)
"""


_PARAMS = ["h_ptr", "w_ptr", "lab_ptr", "lse_ptr"]
_TAIL = ["T", "V", "H", "stride_h", "stride_w"]
_CONST = ["HAS_CAP: tl.constexpr", "BLOCK_M: tl.constexpr", "BLOCK_V: tl.constexpr",
          "BLOCK_K: tl.constexpr"]
_ROWS = """
rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
row_ok = rm < T
lab = tl.load(lab_ptr + rm, mask=row_ok, other=-100)
"""


def forward_source(precision: str) -> str:
    body = f"""
m0 = tl.program_id(0) * BLOCK_M
{_ROWS}
m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
picked = tl.zeros((BLOCK_M,), dtype=tl.float32)
for v0 in range(0, V, BLOCK_V):
    rv = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
    v_ok = rv < V
{indent(_logits(precision), 4)}
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
    m_i = m_new
    picked += tl.sum(tl.where(rv[None, :] == lab[:, None], z, 0.0), axis=1)
lse = m_i + tl.log(l_i)
tl.store(lse_ptr + LSE_AT + rm * stride_lse, lse, mask=row_ok)
tl.store(loss_ptr + rm * stride_loss, tl.where(lab != {IGNORE}, lse - picked, 0.0), mask=row_ok)
"""
    params = _PARAMS + ["loss_ptr"] + _TAIL + ["stride_lse", "stride_loss", "cap"] + _CONST + \
        ["LSE_AT: tl.constexpr"]
    return HEADER + f"def {ENTRY_FORWARD}({', '.join(params)}):\n" + indent(body, 4) + "\n"


def dh_source(precision: str) -> str:
    body = f"""
m0 = tl.program_id(0) * BLOCK_M
{_ROWS}
lse = tl.load(lse_ptr + rm * stride_lse, mask=row_ok, other=0.0)
scale = tl.load(scale_ptr + rm, mask=row_ok, other=0.0)[:, None]
for v0 in range(0, V, BLOCK_V):
    rv = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
    v_ok = rv < V
{indent(_logits(precision), 4)}
{indent(_dz(), 4)}
{indent(_add_product("dh", "rm", "row_ok", "w", "rv", "v_ok", "dz", precision), 4)}
"""
    params = _PARAMS + ["dh_ptr", "scale_ptr"] + _TAIL + ["stride_lse", "stride_dh", "cap"] + _CONST
    return HEADER + f"def {ENTRY_DH}({', '.join(params)}):\n" + indent(body, 4) + "\n"


def dw_source(precision: str) -> str:
    body = f"""
rv = (tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
v_ok = rv < V
for m0 in range(0, T, BLOCK_M):
{indent(_ROWS, 4)}
    lse = tl.load(lse_ptr + rm * stride_lse, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + rm, mask=row_ok, other=0.0)[:, None]
{indent(_logits(precision), 4)}
{indent(_dz(), 4)}
{indent(_add_product("dw", "rv", "v_ok", "h", "rm", "row_ok", "tl.trans(dz)", precision), 4)}
"""
    params = _PARAMS + ["dw_ptr", "scale_ptr"] + _TAIL + ["stride_lse", "stride_dw", "cap"] + _CONST
    return HEADER + f"def {ENTRY_DW}({', '.join(params)}):\n" + indent(body, 4) + "\n"
